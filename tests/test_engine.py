"""The engine against llama-cpp-python's own high-level `Llama`, on the real default model."""

from __future__ import annotations

import pytest
from llama_cpp import Llama

from flashmem_cli.chat.conversation import ChatOptions, open_conversation
from flashmem_cli.config import sessions_dir
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.generate import generate
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.store.sessions import SessionStore

pytestmark = pytest.mark.model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def llama(model_path):
    llm = Llama(str(model_path), n_ctx=1024, n_threads=2, n_batch=512, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_reply_equals_llama_completion(home, llama, prompt):
    options = ChatOptions(n_ctx=1024, n_threads=2, n_predict=24, sampling=GREEDY)
    with open_conversation(SessionStore(sessions_dir()), "eq", options) as conversation:
        result = conversation.send(prompt)
        fed = conversation.seq.tokens[: result.new_prompt_tokens]

    prompt_tokens = llama.tokenize(result.prompt_text.encode(), add_bos=False, special=True)
    assert fed == prompt_tokens
    llama.reset()
    completion = llama.create_completion(
        prompt_tokens,
        max_tokens=24,
        temperature=0.0,
        stop=["\nUser:"],  # the base model's stop
    )
    assert result.reply == completion["choices"][0]["text"]
    if completion["choices"][0]["finish_reason"] == "length":
        assert result.generated_tokens == completion["usage"]["completion_tokens"]
    else:  # llama-cpp-python counts the tokens that spelled the stop string too
        assert result.generated_tokens < completion["usage"]["completion_tokens"]


def test_saved_sequence_restores_the_same_next_token(model_path, tmp_path):
    with Model(model_path, n_gpu_layers=0) as model:
        tokens = model.tokenize("<bos>The quick brown fox jumps over the lazy", parse_special=True)
        with Context(model, ContextParams(n_ctx=256)) as ctx:
            seq = KVSequence(ctx)
            seq.feed(tokens)
            nbytes = seq.save(tmp_path / "state.bin")
            expected, _ = generate(seq, Sampler(GREEDY), 8)
        with Context(model, ContextParams(n_ctx=256)) as ctx:
            restored = KVSequence(ctx)
            assert restored.load(tmp_path / "state.bin")
            assert restored.tokens == tokens
            # The restored cache has no current logits: re-decode the last token only.
            last = restored.tokens.pop()
            ctx.remove(0, len(restored), -1)
            restored.feed([last])
            again, _ = generate(restored, Sampler(GREEDY), 8)
    assert nbytes > 0
    assert again == expected


def test_dropping_a_span_closes_the_position_gap(model_path):
    with (
        Model(model_path, n_gpu_layers=0) as model,
        Context(model, ContextParams(n_ctx=256)) as ctx,
    ):
        seq = KVSequence(ctx)
        head = model.tokenize("<bos>Numbers:", parse_special=True)
        middle = model.tokenize(" one two three four five six")
        tail = model.tokenize(" seven eight")
        seq.feed(head + middle + tail)
        seq.drop(len(head), len(head) + len(middle))
        assert seq.tokens == head + tail
        seq.feed(model.tokenize(" nine"))  # decodes at the next free position without error
        assert len(seq) == len(head) + len(tail) + 1


def test_feeding_past_the_context_is_refused_and_leaves_the_sequence_whole(model_path):
    from flashmem_cli.errors import EngineError

    with Model(model_path, n_gpu_layers=0) as model, Context(model, ContextParams(n_ctx=64)) as ctx:
        seq = KVSequence(ctx)
        seq.feed(model.tokenize("<bos>hello", parse_special=True))
        before = list(seq.tokens)
        with pytest.raises(EngineError, match="do not fit"):
            seq.feed([100] * ctx.n_ctx)
        assert seq.tokens == before
