"""Token generation in layers: `generate_step` -> `stream_generate` -> `generate`."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from flashmem_cli.engine.sampling import Sampler
from flashmem_cli.engine.sequence import KVSequence


@dataclass(frozen=True)
class GenerationResponse:
    text: str  # text completed by this token ("" while a UTF-8 character is still partial)
    token: int
    finish_reason: str | None  # None while generating, then "stop" or "length"


def generate_step(
    seq: KVSequence,
    sampler: Sampler,
    max_tokens: int,
    after_feed: Callable[[int], None] | None = None,
) -> Generator[int, None, str]:
    """Yield sampled tokens, feeding each to `seq` before drawing the next.

    Expects the logits of the sequence's last token to be current. Every yielded token ends up
    in the KV cache once the caller asks for the next one or exhausts the generator. Returns the
    finish reason: "stop" at an end-of-generation token, "length" at `max_tokens` or a full context.
    `after_feed(step)` runs after each token's decode (the memory monitor; it may append latents).
    """
    model = seq.ctx.model
    produced = 0
    while max_tokens < 0 or produced < max_tokens:
        token = sampler.sample(seq.ctx)
        if model.is_eog(token):
            return "stop"
        if seq.free == 0:
            return "length"
        yield token
        seq.feed([token])
        if after_feed is not None:
            after_feed(produced)
        produced += 1
    return "length"


def stream_generate(
    seq: KVSequence,
    sampler: Sampler,
    max_tokens: int,
    after_feed: Callable[[int], None] | None = None,
) -> Iterator[GenerationResponse]:
    """Generated text piece by piece; the last response carries the finish reason."""
    model = seq.ctx.model
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    steps = generate_step(seq, sampler, max_tokens, after_feed)
    token = -1
    while True:
        try:
            token = next(steps)
        except StopIteration as done:
            tail = decoder.decode(b"", final=True)
            yield GenerationResponse(text=tail, token=token, finish_reason=done.value)
            return
        yield GenerationResponse(decoder.decode(model.token_bytes(token)), token, None)


def generate(seq: KVSequence, sampler: Sampler, max_tokens: int) -> tuple[str, str]:
    """The whole reply and its finish reason."""
    parts: list[str] = []
    reason = "stop"
    for response in stream_generate(seq, sampler, max_tokens):
        parts.append(response.text)
        reason = response.finish_reason or reason
    return "".join(parts), reason
