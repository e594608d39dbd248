"""Training the consolidator (flashmem_cli/train, the `train` extra: torch).

The torch forward is checked against llama.cpp on the real default model; the torch
consolidator against the numpy runtime through the int8 weights file; the objective's cache
surgery on small made-up caches; a few optimizer steps on one example must lower its loss.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the train extra: `make install-train` (CI installs it)

from flashmem_cli.chat.memory import layer_spec  # noqa: E402
from flashmem_cli.engine.backend import Context, ContextParams, Model  # noqa: E402
from flashmem_cli.memory.consolidator import (  # noqa: E402
    Consolidator,
    EmbeddingRows,
    output_norm,
    untrained_weights,
)
from flashmem_cli.memory.gguf_tensors import GGUFTensors  # noqa: E402
from flashmem_cli.memory.weights import load_weights, save_weights  # noqa: E402
from flashmem_cli.models import chat_template_for  # noqa: E402
from flashmem_cli.train import objective  # noqa: E402
from flashmem_cli.train.backbone import (  # noqa: E402
    Cache,
    GemmaBackbone,
    LayerCache,
    attention_mask,
    rope_neox,
)
from flashmem_cli.train.consolidator import TorchConsolidator, with_readout  # noqa: E402
from flashmem_cli.train.examples import (  # noqa: E402
    MAX_CONTEXT,
    Example,
    Target,
    build_example,
    generated_cases,
)
from flashmem_cli.train.loop import TrainConfig, example_loss, learning_rate  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

# (prompt, the least logit correlation with llama.cpp): llama.cpp multiplies quantized weights
# by activations quantized to 8 bits; measured 0.9988 on the code prompt, > 0.999 on the others
PROMPTS = [
    ("The capital of France is", 0.999),
    ("My name is Ada and I keep bees. What do bees make? They make", 0.999),
    ("def add(a, b):\n    return", 0.998),
    ("Monday, Tuesday, Wednesday,", 0.999),
]

# -- pure pieces ------------------------------------------------------------------------------


def test_rope_matches_the_numpy_layer_and_composes_like_a_shift():
    from flashmem_cli.memory.layer import rope_neox as numpy_rope

    x = torch.randn(3, 2, 8)
    positions = torch.tensor([0, 5, 17])
    ours = rope_neox(x, positions, 10_000.0)
    for i, p in enumerate(positions.tolist()):
        expected = numpy_rope(x[i].numpy(), p, 10_000.0)
        np.testing.assert_allclose(ours[i].numpy(), expected, rtol=1e-5, atol=1e-5)
    # a key roped at p then rotated by d equals the key roped at p + d (llama.cpp's shift)
    shifted = rope_neox(rope_neox(x, positions, 1e6), torch.tensor([3, 3, 3]), 1e6)
    torch.testing.assert_close(shifted, rope_neox(x, positions + 3, 1e6), rtol=1e-4, atol=1e-4)


def test_attention_mask_is_causal_by_position_and_windowed():
    mask = attention_mask(torch.tensor([4, 5]), torch.tensor([0, 3, 4, 5]), window=None)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    windowed = attention_mask(torch.tensor([5]), torch.tensor([0, 3, 4, 5]), window=2)
    assert windowed.tolist() == [[False, False, True, True]]


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = TrainConfig(steps=100, lr=1.0, warmup=10)
    rates = [learning_rate(config, s) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] == pytest.approx(0.1, abs=0.01)


def _cache(n: int, offset: float = 0.0) -> Cache:
    layers = [
        LayerCache(
            torch.full((n, 1, 2), offset) + torch.arange(n)[:, None, None], torch.zeros(n, 1, 2)
        )
    ]
    return Cache(layers, torch.arange(n))


def test_compacted_caches_keep_head_what_stays_of_the_span_and_the_recent_turns():
    example = Example(context=list(range(20)), start=4, end=12)
    mass = np.zeros(20)
    mass[[6, 9]] = 10.0  # the span's best-attended positions
    frozen = objective.Frozen(_cache(20), torch.zeros(4), mass)
    latents = Cache(
        [LayerCache(torch.full((2, 1, 2), -1.0), torch.zeros(2, 1, 2))], torch.arange(20, 22)
    )

    full = objective.compacted(frozen, example, "full", 0.5, None)
    truncate = objective.compacted(frozen, example, "truncate", 0.5, None)
    keep = objective.compacted(frozen, example, "keep-only", 0.5, None, pool=1)
    flash = objective.compacted(frozen, example, "flashmem", 0.5, latents, pool=1)
    only = objective.compacted(frozen, example, "latents-only", 0.5, latents)

    def ids(cache: Cache) -> list[float]:
        return cache.layers[0].keys[:, 0, 0].tolist()

    assert len(full) == 20
    assert ids(truncate) == [0, 1, 2, 3] + list(range(12, 20))
    assert len(keep) == 4 + 4 + 8  # half of the 8-token span stays, in position order
    assert {6, 9} <= set(ids(keep)[4:8]) and ids(keep)[4:8] == sorted(ids(keep)[4:8])
    assert ids(keep)[8:] == list(range(12, 20))
    assert ids(flash) == [0, 1, 2, 3, -1, -1, 6, 9] + list(range(12, 20))  # latents, kept, recent
    assert ids(only) == [0, 1, 2, 3, -1, -1] + list(range(12, 20))
    for cache in (truncate, keep, flash, only):
        assert cache.positions.tolist() == list(range(len(cache)))  # the gap is closed


# -- the real default model ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def backbone(model_path: Path) -> GemmaBackbone:
    torch.set_num_threads(2)
    return GemmaBackbone.from_gguf(model_path)


@pytest.fixture(scope="session")
def llama(model_path: Path):
    model = Model(model_path, n_gpu_layers=0)
    yield model
    model.close()


@pytest.mark.model
@pytest.mark.parametrize(("text", "least"), PROMPTS)
def test_torch_forward_matches_llama_cpp(backbone, llama, text, least):
    tokens = [llama.bos] + llama.tokenize(text)
    with Context(llama, ContextParams(n_ctx=128, hidden_states=True)) as ctx:
        ctx.decode(tokens, 0, 0)
        reference, hidden = ctx.logits(), ctx.hidden_state()
    with torch.no_grad():
        result = backbone.forward(backbone.embed(tokens), torch.arange(len(tokens)))
        logits = backbone.logits(result.hidden[-1:])[0].numpy()
    assert int(logits.argmax()) == int(reference.argmax())
    assert np.corrcoef(logits, reference)[0, 1] > least
    assert np.corrcoef(result.hidden[-1].numpy(), hidden)[0, 1] > 0.99


@pytest.mark.model
def test_forward_over_a_cache_equals_one_forward(backbone, llama):
    """Splitting a text into a cached prefix and the rest changes nothing (the target path)."""
    tokens = [llama.bos] + llama.tokenize(PROMPTS[1][0])
    with torch.no_grad():
        whole = backbone.forward(backbone.embed(tokens), torch.arange(len(tokens)))
        head = backbone.forward(backbone.embed(tokens[:7]), torch.arange(7))
        rest = backbone.forward(
            backbone.embed(tokens[7:]), torch.arange(7, len(tokens)), past=head.cache
        )
    torch.testing.assert_close(rest.hidden, whole.hidden[7:], rtol=1e-3, atol=1e-3)


@pytest.mark.model
def test_the_training_cache_is_llama_cpps_after_a_consolidation(backbone, llama):
    """The same consolidation done by llama.cpp (chat's calls: decode latents at the end, drop
    the span's unkept runs, move the latents to the span's start) and by objective.compacted:
    the consolidator reads the same K/V, and the next tokens get the same logits."""
    from flashmem_cli.engine.sequence import KVSequence
    from flashmem_cli.memory.budget import dropped_runs
    from flashmem_cli.memory.kv_state import parse_sequence_state

    text = "Ada keeps bees in Lisbon. Her brother Tomas fixes bicycles in Porto. " * 3
    tokens = [llama.bos] + llama.tokenize(text)
    start, end, kept = 4, 40, np.array([10, 11, 25])
    rows = backbone.embed(llama.tokenize(" honey hive Lisbon brother")).numpy()  # 4 "latents"
    target = llama.tokenize(" Where does Ada keep bees?")
    with Context(llama, ContextParams(n_ctx=256)) as ctx:
        seq = KVSequence(ctx)
        seq.feed(tokens)
        full = parse_sequence_state(ctx.sequence_state(0), 2)[0]
        seq.feed_embeddings(rows)
        for a, b in dropped_runs(start, end, kept):
            seq.drop(a, b)
        seq.move_tail(len(rows), start)
        seq.feed(target)
        reference = ctx.logits()

    example = Example(context=tokens, start=start, end=end)
    with torch.no_grad():
        read = backbone.forward(backbone.embed(tokens), torch.arange(len(tokens)))
        mass = np.zeros(len(tokens))
        mass[kept] = 1.0
        frozen = objective.Frozen(read.cache, read.hidden[-1], mass)
        keys, values = objective.consolidator_kv(backbone, frozen, len(tokens))
        n = len(tokens)
        latents = backbone.forward(
            torch.from_numpy(rows), torch.arange(n, n + len(rows)), past=read.cache
        ).cache
        keep_ratio = (len(kept) + len(rows) + 0.5) / (end - start)  # keeps exactly `kept`
        cache = objective.compacted(frozen, example, "flashmem", keep_ratio, latents, pool=1)
        assert len(cache) == len(tokens) - (end - start) + len(kept) + len(rows)
        out = backbone.forward(
            backbone.embed(target), torch.arange(len(cache), len(cache) + len(target)), past=cache
        )
        logits = backbone.logits(out.hidden[-1:])[0].numpy()
    their_keys = full.keys[-1].astype(np.float32).reshape(len(tokens), -1)
    their_values = full.values[-1].astype(np.float32).reshape(len(tokens), -1)
    # llama.cpp multiplies quantized weights by activations quantized to 8 bits, and caches
    # K/V as f16 (keys measured at 0.998 correlation here)
    match = {
        "keys": np.corrcoef(keys.numpy().ravel(), their_keys.ravel())[0, 1],
        "values": np.corrcoef(values.numpy().ravel(), their_values.ravel())[0, 1],
        "logits": np.corrcoef(logits, reference)[0, 1],
    }
    assert match["keys"] > 0.995 and match["values"] > 0.995, match
    assert int(logits.argmax()) == int(reference.argmax()), match
    assert match["logits"] > 0.999, match


def _consolidators(tmp_path: Path, model_path: Path, llama: Model):
    """The same trained-format weights (perturbed, so nothing is an identity) as the torch
    module and, through the int8 file, as the numpy runtime."""
    info = llama.info()
    spec = layer_spec(info)
    rng = np.random.default_rng(0)
    with GGUFTensors(model_path) as tensors:
        weights = untrained_weights(tensors, info.n_layer - 1, spec, info.n_embd, "fp")
        norm = output_norm(tensors)
        weights = with_readout(weights, norm, 0.001)
        for name, t in weights.tensors.items():
            weights.tensors[name] = (t + rng.normal(0, 0.02, t.shape) * np.abs(t).mean()).astype(
                np.float32
            )
        path = tmp_path / "w.npz"
        save_weights(path, weights)
        stored = load_weights(path)
        scale = math.sqrt(info.n_embd)
        numpy_side = Consolidator(stored, spec, EmbeddingRows(tensors), norm, scale)
        torch_side = TorchConsolidator(
            stored, spec.n_head, spec.head_dim, spec.rms_eps, spec.rope_base, scale
        )
        return numpy_side, torch_side, stored


@pytest.mark.model
def test_torch_and_numpy_consolidators_make_the_same_latents(tmp_path, model_path, llama):
    numpy_side, torch_side, stored = _consolidators(tmp_path, model_path, llama)
    rng = np.random.default_rng(1)
    hidden = rng.normal(0, 1, 640).astype(np.float32) * 10
    keys = rng.normal(0, 1, (50, 256)).astype(np.float32)
    values = rng.normal(0, 1, (50, 256)).astype(np.float32)
    expected = numpy_side.latents(hidden, keys, values, 50, np.arange(10), 8)
    with torch.no_grad():
        ours = torch_side(
            torch.from_numpy(hidden), torch.from_numpy(keys), torch.from_numpy(values), 50, 8
        )
    assert ours.shape == expected.shape == (8, 640)
    np.testing.assert_allclose(
        ours.numpy(), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max()
    )
    # and the export is what went in: the file round-trips through torch unchanged
    exported = torch_side.export()
    for name, tensor in stored.tensors.items():
        np.testing.assert_array_equal(exported.tensors[name], tensor)


@pytest.mark.model
def test_examples_put_a_fact_in_the_span_and_its_question_after_the_recent_turns(llama):
    template = chat_template_for(llama)
    rng = random.Random(3)
    built = []
    for case in generated_cases(5):
        example = build_example(llama, template, case, rng)
        if example is not None:
            built.append((case, example))
        if len(built) == 6:
            break
    for case, example in built:
        assert len(example.context) <= MAX_CONTEXT
        assert 0 < example.start < example.end < len(example.context)  # recent turns follow
        span = llama.detokenize(example.context[example.start : example.end]).lower()
        recent = llama.detokenize(example.context[example.end :]).lower()
        answers = [t for t in example.targets if t.kind == "answer"]
        assert answers
        for target in answers:
            answer = llama.detokenize(target.scored)
            assert answer.lower() in span and answer.lower() not in recent
            assert any(p.answer == answer for p in case.probes)
        assert {t.kind for t in example.targets} >= {"answer", "restate"}


@pytest.mark.model
def test_a_few_steps_on_one_example_lower_its_loss(tmp_path, model_path, llama, backbone):
    """Gradients reach the consolidator through the frozen backbone, and they point down."""
    _, consolidator, _ = _consolidators(tmp_path, model_path, llama)
    template = chat_template_for(llama)
    example = next(
        e for c in generated_cases(9) if (e := build_example(llama, template, c, random.Random(0)))
    )
    config = TrainConfig(mix={"answer": 1.0})
    frozen = objective.read_context(backbone, example)
    optimizer = torch.optim.Adam(consolidator.parameters(), lr=3e-4)
    losses = []
    for _ in range(6):
        loss = example_loss(backbone, consolidator, example, config, frozen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is not None for p in consolidator.parameters())


def test_a_gap_puts_the_recent_turns_beyond_the_window_of_what_stays():
    example = Example(context=list(range(20)), start=4, end=12, gap=600)
    assert objective.context_positions(example).tolist() == list(range(12)) + list(range(612, 620))
    frozen = objective.Frozen(_cache(20), torch.zeros(4), np.zeros(20))
    cache = objective.compacted(frozen, example, "truncate", 0.5, None)
    assert cache.positions.tolist() == [0, 1, 2, 3] + list(range(604, 612))


def test_a_target_without_a_prompt_scores_all_but_its_first_token():
    assert objective.scored_count(Target("continue", [], [1, 2, 3])) == 2
    assert objective.scored_count(Target("answer", [7], [1, 2, 3])) == 3


# -- the command ----------------------------------------------------------------------------------


@pytest.mark.model
def test_train_consolidator_writes_weights_a_record_and_resumes(home, tmp_path, models_home):
    out = tmp_path / "run" / "w.npz"
    first = run_cli(
        "train-consolidator", "--steps", "2", "--eval-every", "1", "--held-out", "2",
        "--out", str(out), "--json",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    record = json.loads(first.stdout)
    assert record["steps"] == 2 and [p["step"] for p in record["learning_curve"]] == [0, 1, 2]
    assert set(record["learning_curve"][0]["answer_loss"]) == {
        "full", "truncate", "keep-only", "flashmem",
    }  # fmt: skip
    weights = load_weights(out)
    assert weights.trained and "readout.w" in weights.tensors
    assert json.loads((tmp_path / "run" / "w.json").read_text())["commit"] == record["commit"]

    resumed = run_cli(
        "train-consolidator", "--steps", "3", "--eval-every", "1", "--held-out", "2",
        "--out", str(out), "--resume", "--json",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    assert again["steps"] == 3 and [p["step"] for p in again["learning_curve"]] == [0, 1, 2, 3]


def test_train_consolidator_refuses_a_resume_without_a_checkpoint(home, tmp_path):
    result = run_cli("train-consolidator", "--out", str(tmp_path / "w.npz"), "--resume")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: --resume: no checkpoint at")
