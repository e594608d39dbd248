"""Benchmark: what in-reply latent insertion does to the likelihood of a reference continuation.

    python -m flashmem_cli.bench.insertion [-m MODEL] [--tau T] [--continuation 48]

For each paragraph of the calibration corpus (and of the recall example's assistant turns),
its first 60% is the context and the next tokens the reference continuation. The continuation
is scored teacher-forced twice: plainly, and with the Cognitive Monitor on - wherever a
continuation token's entropy passes τ (at most --max-consolidations times, 16 tokens apart), K
latents from the consolidator are inserted before the next token. Reported: mean log-prob per
continuation token with and without, and how many insertions happened.
"""

from __future__ import annotations

import argparse
import statistics

from flashmem_cli import models
from flashmem_cli.bench.recall_cases import example_path, parse_cases
from flashmem_cli.chat.conversation import log_softmax_at
from flashmem_cli.chat.memory import ConversationMemory, MemoryOptions
from flashmem_cli.config import default_threads
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.calibration import builtin_corpus


def passages() -> list[str]:
    texts = [p.strip() for p in builtin_corpus().split("\n\n") if p.strip()]
    for case in parse_cases(example_path().read_text("utf-8").splitlines()):
        texts += [t["content"] for t in case.turns if t["role"] == "assistant"][:2]
    return texts


def score(
    model: Model, file: models.ModelFile, options: MemoryOptions, text: str, n_cont: int
) -> tuple[float, int]:
    """Mean log-prob of the continuation, and the number of insertions made."""
    tokens = [model.bos] + model.tokenize(text)
    split = int(len(tokens) * 0.6)
    prefix, continuation = tokens[:split], tokens[split : split + n_cont]
    memory = ConversationMemory(model, file, options)
    params = ContextParams(1024, n_threads=default_threads(), tap=memory.capture.tap)
    with Context(model, params) as ctx:
        memory.attach(ctx.n_ctx)
        seq = KVSequence(ctx)
        seq.feed(prefix)
        memory.note_decode()
        memory.begin_reply()
        logprobs = []
        for step, token in enumerate(continuation):
            logprobs.append(log_softmax_at(ctx.logits_view(), token))
            seq.feed([token])
            memory.note_decode()
            if memory.observe_token(step) and options.inject_in_reply:
                memory.inject(seq, step)
    memory.close()
    return statistics.fmean(logprobs), len(memory.events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--continuation", type=int, default=48)
    parser.add_argument("--latents", type=int, default=8)
    args = parser.parse_args()
    file = models.resolve(args.model)
    with Model(file.path) as model:
        base = MemoryOptions(tau=args.tau, n_latents=args.latents, inject_in_reply=False)
        with_latents = MemoryOptions(tau=args.tau, n_latents=args.latents, inject_in_reply=True)
        rows = []
        for text in passages():
            plain, _ = score(model, file, base, text, args.continuation)
            inserted, n = score(model, file, with_latents, text, args.continuation)
            rows.append((plain, inserted, n))
    touched = [(p, i) for p, i, n in rows if n]
    print(
        f"{len(rows)} passages, {len(touched)} with insertions, {sum(n for *_, n in rows)} in all"
    )
    print(
        f"mean log-prob per continuation token: without {statistics.fmean(r[0] for r in rows):.4f}, "
        f"with {statistics.fmean(r[1] for r in rows):.4f}"
    )
    if touched:
        print(
            f"passages with insertions only: without {statistics.fmean(p for p, _ in touched):.4f}, "
            f"with {statistics.fmean(i for _, i in touched):.4f}; "
            f"worse in {sum(i < p for p, i in touched)} of {len(touched)}"
        )


if __name__ == "__main__":
    main()
