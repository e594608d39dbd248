"""FlashMem memory on the real default model: the attention tap's mass, moving latents into
place, int8 consolidator weights, bounded context in chat, resume, and the CLI surface."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from conftest import run_cli, run_json

from flashmem_cli.chat.conversation import ChatOptions, open_conversation
from flashmem_cli.chat.memory import MemoryOptions
from flashmem_cli.config import sessions_dir
from flashmem_cli.engine.attention import AttentionCapture
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.engine.sequence import LATENT, KVSequence
from flashmem_cli.errors import EngineError
from flashmem_cli.memory.architecture import describe
from flashmem_cli.memory.gguf_tensors import GGUFTensors
from flashmem_cli.store.sessions import SessionStore

TEXT = "<bos>The old lighthouse keeper climbed the stairs every night to light the lamp, and"
FACTS = [
    "My sister Oriane lives in Tromsø and keeps a parrot called Pimento.",
    "Our boat is painted mustard yellow and is moored at berth 19.",
]
# Long enough that the turns fill -c 512 however soon the base model ends its reply.
FILLER = [
    f"Tell me something about {topic}, in a few sentences. I have been reading about {topic} "
    f"all week and would like to hear what you know, from the basics to the odd details about "
    f"{topic} that most people never learn."
    for topic in ("bread", "rivers", "bicycles", "tea", "glaciers", "printing", "owls", "maps")
]


def memory_options(**overrides):
    base = {
        "n_ctx": 512,
        "n_threads": 2,
        "n_predict": 32,
        "sampling": SamplingParams(temperature=0),
        "memory": MemoryOptions(enabled=True, n_latents=8),
    }
    return ChatOptions(**{**base, **overrides})


@pytest.mark.model
def test_tap_mass_sums_to_one_per_query_head_and_global_layer(model_path):
    with Model(model_path, n_gpu_layers=0) as model:
        info = model.info()
        layers = list(describe(info).global_layers)
        assert layers == [5, 11, 17] and describe(info).mass_layers == (5, 11, 17)
        capture = AttentionCapture(info.n_layer - 1, layers, 256)
        params = ContextParams(n_ctx=256, n_threads=2, tap=capture.tap)
        with Context(model, params) as ctx:
            seq = KVSequence(ctx)
            tokens = model.tokenize(TEXT, parse_special=True)
            seq.feed(tokens)
            seq.feed(model.tokenize(" then"))
            capture.check()
        with Context(model, ContextParams(n_ctx=256, n_threads=2, hidden_states=True)) as ctx:
            same = KVSequence(ctx)  # decoded as above: batch shapes pick llama.cpp's kernels
            same.feed(tokens)
            same.feed(model.tokenize(" then"))
            hidden = ctx.hidden_state()
    assert capture.last_hidden is not None  # read from the graph, without embeddings mode
    np.testing.assert_allclose(capture.last_hidden, hidden, rtol=1e-3, atol=1e-3)
    queries = len(tokens) + 1
    assert capture.cell_mass.sum() == pytest.approx(queries * info.n_head * len(layers), rel=1e-4)
    assert list(capture.visible_cells) == list(range(queries))
    assert capture.last_rows is not None and capture.last_rows.shape[0] == info.n_head


@pytest.mark.model
def test_a_block_moved_into_the_middle_and_removed_leaves_the_sequence_as_it_was(model_path):
    """move_tail's shifts add up: park a block mid-sequence, remove it, and the next token's
    logits are those of a sequence that never had it (up to re-roping in f16)."""
    with Model(model_path, n_gpu_layers=0) as model:
        tokens = model.tokenize(TEXT, parse_special=True)
        nxt = model.tokenize(" the")
        with Context(model, ContextParams(n_ctx=256, n_threads=2)) as ctx:
            seq = KVSequence(ctx)
            seq.feed(tokens)
            seq.feed(nxt)
            expected = ctx.logits()
        with Context(model, ContextParams(n_ctx=256, n_threads=2)) as ctx:
            seq = KVSequence(ctx)
            seq.feed(tokens)
            seq.feed(model.tokenize(" stormy seas"))
            seq.move_tail(2, 5)
            assert seq.tokens[5:7] == model.tokenize(" stormy seas")
            seq.drop(5, 7)
            assert seq.tokens == tokens
            seq.feed(nxt)
            got = ctx.logits()
    assert got.argmax() == expected.argmax()
    assert np.corrcoef(got, expected)[0, 1] > 0.999


@pytest.mark.model
def test_int8_consolidator_layer_reproduces_the_float_layer(model_path, tmp_path):
    from flashmem_cli.chat.memory import layer_spec
    from flashmem_cli.memory.consolidator import layer_weights, untrained_weights
    from flashmem_cli.memory.layer import DecoderLayer
    from flashmem_cli.memory.weights import load_weights, save_weights

    with Model(model_path, n_gpu_layers=0) as model, GGUFTensors(model_path) as tensors:
        info = model.info()
        spec = layer_spec(info)
        exact = untrained_weights(tensors, info.n_layer - 1, spec, info.n_embd, "fp")
        save_weights(tmp_path / "w.npz", exact)
        stored = load_weights(tmp_path / "w.npz")
    assert not stored.trained and stored.model_fingerprint == "fp"

    def layer(weights):
        return DecoderLayer(spec, layer_weights(weights))

    rng = np.random.default_rng(0)
    x = rng.standard_normal(info.n_embd).astype(np.float32) * 20
    keys = rng.standard_normal((40, info.head_dim)).astype(np.float32)
    values = rng.standard_normal((40, info.head_dim)).astype(np.float32)
    a = layer(exact).forward(x, 40, keys, values)
    b = layer(stored).forward(x, 40, keys, values)
    assert np.corrcoef(a, b)[0, 1] > 0.999  # stated tolerance for int8 per-channel weights
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def feed_turns(conversation, messages):
    return [conversation.send(text) for text in messages]


@pytest.mark.model
def test_a_chat_consolidates_at_the_budget_and_resumes(home, model_path, capsys):
    store = SessionStore(sessions_dir())
    with open_conversation(store, "long", memory_options()) as conversation:
        results = feed_turns(conversation, FACTS + FILLER)
        layout, seq = conversation.layout, conversation.seq
        budget = conversation.memory.budget_tokens
        events = [e for r in results for e in r.memory.consolidations]
        assert events, "a 512-token context must have consolidated"
        assert layout.consolidated >= 2 and layout.dropped == 0
        assert layout.n_tokens == len(seq)
        assert seq.tokens.count(LATENT) >= 8
        assert len(conversation.memory.latent_rows) == seq.tokens.count(LATENT)
        for event in events:
            assert event.kept + event.latents <= math.ceil(event.span_tokens * 0.25)
        before_close = list(seq.tokens)
        mass = conversation.memory.capture.cell_mass[conversation.memory.capture.visible_cells]
        assert len(seq) <= conversation.n_ctx
        assert all(len(r.memory.entropy) == r.generated_tokens for r in results)
        assert budget == int(0.85 * conversation.n_ctx)

    records = [json.loads(line) for line in (home / "sessions/long/transcript.jsonl").open()]
    assert sum(r.get("event") == "memory" for r in records) == len(events)
    assert [r["content"] for r in records if r.get("role") == "user"] == FACTS + FILLER

    with open_conversation(store, "long", memory_options()) as conversation:
        assert conversation.seq.tokens == before_close
        restored = conversation.memory.capture.cell_mass[: len(before_close)]
        np.testing.assert_allclose(restored, mass)
        result = conversation.send("What is the parrot called?")
        assert result.reply
        assert conversation.layout.n_tokens == len(conversation.seq)
        report = conversation.memory_report()
        assert report.latent_blocks and report.events
        shipped = report.settings["consolidator"]  # the default model's weights ship trained
        assert shipped.startswith("TRAINED") and "shipped with flashmem" in shipped

    from flashmem_cli.repl import print_memory

    print_memory(report)  # what /memory shows in the REPL
    shown = capsys.readouterr().out
    assert "latent block" in shown and "consolidated" in shown and "TRAINED" in shown


def is_subsequence(part, whole):
    remaining = iter(whole)
    return all(token in remaining for token in part)


@pytest.mark.model
@pytest.mark.parametrize("keep_score", ["attention", "reconstruction"])
def test_keep_only_keeps_the_spans_own_tokens_in_order(home, model_path, monkeypatch, keep_score):
    from flashmem_cli.chat.memory import ConversationMemory

    checked = []
    original = ConversationMemory.consolidate

    def consolidate(self, seq, start, end, kind, turns=0):
        span = list(seq.tokens[start:end])
        event = original(self, seq, start, end, kind, turns)
        kept = seq.tokens[start : start + event.kept]
        checked.append(len(kept) > 0 and is_subsequence(kept, span) and len(set(kept)) > 1)
        return event

    monkeypatch.setattr(ConversationMemory, "consolidate", consolidate)
    memory = MemoryOptions(enabled=True, n_latents=0, keep_score=keep_score)
    with open_conversation(
        SessionStore(sessions_dir()), "keep", memory_options(memory=memory)
    ) as conversation:
        feed_turns(conversation, FACTS + FILLER)
        assert conversation.layout.consolidated >= 1
        assert conversation.layout.n_tokens == len(conversation.seq)
        assert LATENT not in conversation.seq.tokens
        assert conversation.memory_report().settings["keep_score"] == keep_score
    assert checked and all(checked)


@pytest.mark.model
def test_reconstruction_scoring_reads_the_span_and_leaves_the_cache_as_it_was(home, model_path):
    """KVzip's pass: the span fed again after a prompt, into free cells, and removed."""
    options = memory_options(n_ctx=1024, memory=MemoryOptions(enabled=True, n_latents=0))
    with open_conversation(SessionStore(sessions_dir()), "rebuild", options) as conversation:
        feed_turns(conversation, FACTS + FILLER[:2])
        memory, seq = conversation.memory, conversation.seq
        start, end = conversation.layout.oldest_turn_span()
        before = conversation.score_reply("Where is the boat moored?", "At berth 19.")
        tokens, cells = list(seq.tokens), memory.capture.visible_cells.copy()
        mass = memory.capture.cell_mass.copy()

        rebuilt = memory._reconstruction_mass(seq, memory._full_cache(seq), start, end)

        assert seq.tokens == tokens and len(seq) == len(tokens)
        np.testing.assert_array_equal(memory.capture.visible_cells, cells)
        np.testing.assert_array_equal(memory.capture.cell_mass, mass)
        after = conversation.score_reply("Where is the boat moored?", "At berth 19.")
        np.testing.assert_allclose(after, before, atol=1e-3)
        assert rebuilt is not None and rebuilt.shape == (len(seq),)
        # repeating the span, the model reads the span: more per position than what follows
        assert rebuilt[max(start, 4) : end].mean() > 1.5 * rebuilt[end:].mean()

        def failing_check():
            raise EngineError("the tap failed")

        mass = memory.capture.cell_mass.copy()  # the probe's own reading added to it
        memory.capture.check = failing_check  # a failure mid-pass leaves no copy behind
        with pytest.raises(EngineError):
            memory._reconstruction_mass(seq, memory._full_cache(seq), start, end)
        del memory.capture.check
        assert seq.tokens == tokens
        np.testing.assert_array_equal(memory.capture.visible_cells, cells)
        np.testing.assert_array_equal(memory.capture.cell_mass, mass)


def test_an_unknown_keep_score_is_a_usage_error(home):
    for command in (["eval", "recall", "/nonexistent.jsonl", "-c", "256"], ["chat", "-p", "hi"]):
        proc = run_cli(*command, "--keep-score", "magic")
        assert proc.returncode == 2 and "unknown keep score 'magic'" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.model
def test_in_reply_insertion_puts_latents_inside_the_reply(home, model_path):
    memory = MemoryOptions(enabled=True, tau=0.0, inject_in_reply=True, max_insertions=2)
    with open_conversation(
        SessionStore(sessions_dir()), "inject", memory_options(memory=memory)
    ) as conversation:
        result = conversation.send("Tell me a story about a lighthouse.")
        kinds = [e.kind for e in result.memory.consolidations]
        assert kinds == ["monitor", "monitor"]
        assert result.memory.triggers == [0, 16]
        assert conversation.seq.tokens.count(LATENT) == 16
        assert "\ufffd" not in result.reply and result.generated_tokens == 32
        second = conversation.send("And then?")
        assert second.cached_tokens > 32 and second.generated_tokens > 0
        assert conversation.layout.n_tokens == len(conversation.seq)


@pytest.mark.model
def test_cli_json_reports_memory_and_no_memory(home, model_path):
    flags = ["--temp", "0", "-n", "8", "-c", "512", "-t", "2"]
    on = run_json("chat", "-s", "m", *flags, "-p", "Hello there")
    assert on["memory"]["enabled"] is True
    assert len(on["memory"]["entropy"]) == on["tokens"]["generated"]
    assert on["memory"]["consolidations"] == []
    off = run_json("chat", "-s", "n", *flags, "--no-memory", "-p", "Hello there")
    assert off["memory"] == {"enabled": False, "consolidations": [], "entropy": [], "triggers": []}
    assert off["reply"] == on["reply"]  # the tap and hidden states change nothing


def test_cli_rejects_bad_memory_flags(home):
    proc = run_cli("chat", "-s", "x", "--keep-ratio", "1.5", "-p", "hi")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    proc = run_cli("eval", "recall", "/nonexistent.jsonl", "-c", "256")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.model
def test_calibrate_stores_tau_beside_the_model(home, models_home, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "The river bends twice before the town.\n\nBread rises when yeast eats sugar.\n\n"
        "Maps were drawn by hand for centuries."
    )
    result = run_json("calibrate", "--corpus", str(corpus))
    assert result["tokens"] >= 16 and result["tau"] > 0
    stored = json.loads((models_home / "gemma-3-270m-q4_k_m.calibration.json").read_text())
    assert stored["tau"] == pytest.approx(result["tau"], abs=1e-3)
    assert np.percentile(stored["entropies"], 85) == pytest.approx(result["tau"], abs=1e-3)
    info = run_json("models", "info")
    assert info["monitor_tau"] == pytest.approx(result["tau"], abs=1e-3)
    assert info["consolidator"].startswith("TRAINED")  # shipped for the default model
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    proc = run_cli("calibrate", "--corpus", str(bad))
    assert proc.returncode == 1 and "not UTF-8" in proc.stderr


@pytest.mark.model
def test_eval_recall_scores_every_policy(home, models_home, tmp_path):
    filler = " ".join(f"Paragraph {i} is about nothing in particular." for i in range(3))
    turns = [{"role": "user", "content": "My locker code is 7052 and my cat is Tamsk."}]
    turns.append({"role": "assistant", "content": "Noted: locker 7052, cat Tamsk."})
    for i in range(14):
        turns.append({"role": "user", "content": f"Question {i}: {filler}"})
        turns.append({"role": "assistant", "content": f"Answer {i}: {filler}"})
    case = {
        "id": "c1",
        "turns": turns,
        "probes": [{"question": "What is my cat's name?", "answer": "Tamsk"}],
    }
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(case) + "\n")
    result = run_json("eval", "recall", str(path), "-c", "512")
    policies = result["cases"][0]["policies"]
    assert set(policies) == {"full", "truncate", "flashmem", "keep-only", "latents-only"}
    assert policies["full"]["n_ctx"] > 512 and policies["full"]["consolidations"] == 0
    assert policies["truncate"]["turns_consolidated"] >= 1
    assert policies["flashmem"]["compression"] >= 3.9
    assert policies["full"]["mean"] > policies["truncate"]["mean"]
    summary = result["summary"]
    assert set(summary) >= {"mean_logprob", "gap_recovered", "gap_recovered_keep-only"}
    # the shipped trained weights were used: no untrained file was made beside the model
    assert not os.path.exists(models_home / "gemma-3-270m-q4_k_m.consolidator.npz")


@pytest.mark.model
def test_a_session_made_without_memory_consolidates_once_memory_is_on(home, model_path):
    store = SessionStore(sessions_dir())
    plain = memory_options(memory=MemoryOptions(enabled=False), n_ctx=1024)
    with open_conversation(store, "late", plain) as conversation:
        feed_turns(conversation, FACTS + FILLER)
        assert len(conversation.seq) > 400
    assert not list((home / "sessions/late").glob("memory.*.npz"))
    with open_conversation(store, "late", memory_options(n_ctx=1024)) as conversation:
        conversation.memory.budget_tokens = 350
        result = conversation.send("One more thing about owls?")
        assert result.memory.consolidations
        assert conversation.layout.n_tokens == len(conversation.seq) <= 350 + 64


@pytest.mark.model
def test_a_message_longer_than_one_batch_keeps_the_hidden_state(home, model_path):
    """Prompt chunks that want no logits have no outputs: h_t comes from the last one."""
    options = memory_options(n_ctx=2048, n_predict=4)
    with open_conversation(SessionStore(sessions_dir()), "big", options) as conversation:
        result = conversation.send("word " * 700)
        assert result.new_prompt_tokens > 512
        assert conversation.memory.last_hidden is not None
        assert conversation.memory.last_hidden.shape == (conversation.model.n_embd,)


@pytest.mark.model
def test_a_full_cache_is_trimmed_before_its_latents_are_written(model_path):
    from flashmem_cli.chat.memory import ConversationMemory
    from flashmem_cli.models import describe

    file = describe(model_path)
    with Model(model_path, n_gpu_layers=0) as model:
        memory = ConversationMemory(model, file, MemoryOptions(n_latents=8))
        params = ContextParams(n_ctx=256, n_threads=2, tap=memory.capture.tap)
        with Context(model, params) as ctx:
            memory.attach(ctx.n_ctx)
            seq = KVSequence(ctx)
            tokens = (model.tokenize(TEXT, parse_special=True) * 40)[: ctx.n_ctx]
            seq.feed(tokens)
            memory.note_decode()
            assert seq.free == 0
            event = memory.consolidate(seq, 4, 200, "turns")
            assert event.latents == 8 and event.kept == 49 - 8
            assert len(seq) == ctx.n_ctx - 196 + 49
            assert seq.tokens[4:12] == [LATENT] * 8
            assert seq.tokens[-56:] == tokens[-56:]
            seq.feed(model.tokenize(" and"))  # the cache goes on
        memory.close()


@pytest.mark.model
def test_untrained_weights_write_no_latents_at_the_budget_unless_asked(
    models_home, model_path, no_shipped_weights
):
    from flashmem_cli.chat.memory import latents_at_budget
    from flashmem_cli.memory.weights import ConsolidatorWeights, save_weights, weights_path
    from flashmem_cli.models import describe

    file = describe(model_path)
    assert latents_at_budget(file, None) == 0  # no weights yet: they would be untrained
    assert latents_at_budget(file, 8) == 8
    path = weights_path(models_home, file.path.stem)
    tensors = {"w_q": np.eye(4, dtype=np.float32)}
    save_weights(path, ConsolidatorWeights(tensors, False, file.fingerprint, 17))
    assert latents_at_budget(file, None) == 0
    save_weights(path, ConsolidatorWeights(tensors, True, file.fingerprint, 17))
    assert latents_at_budget(file, None) == 8
    save_weights(path, ConsolidatorWeights(tensors, True, "another model", 17))
    assert latents_at_budget(file, None) == 0


@pytest.mark.model
def test_a_message_too_big_beside_the_memory_region_pushes_memory_out(home, model_path):
    options = memory_options(memory=MemoryOptions(enabled=True, keep_ratio=0.5), n_predict=8)
    with open_conversation(SessionStore(sessions_dir()), "crowded", options) as conversation:
        feed_turns(conversation, [f"Short note {i} about the garden." for i in range(20)])
        assert conversation.layout.memory > 0
        result = conversation.send("word " * 450)
        assert result.new_prompt_tokens > 450 and result.generated_tokens > 0
        layout = conversation.layout
        assert layout.memory == 0 and layout.n_tokens == len(conversation.seq)
        conversation.send("And now?")
        assert conversation.layout.n_tokens == len(conversation.seq)


@pytest.mark.model
def test_inject_with_no_latents_does_nothing(home, model_path):
    memory = MemoryOptions(enabled=True, tau=0.0, inject_in_reply=True, n_latents=0)
    with open_conversation(
        SessionStore(sessions_dir()), "none", memory_options(memory=memory)
    ) as conversation:
        result = conversation.send("Tell me a story.")
        assert result.memory.triggers and not result.memory.consolidations
        assert LATENT not in conversation.seq.tokens


@pytest.mark.model
def test_a_damaged_memory_file_is_set_aside_not_fatal(home, model_path):
    store = SessionStore(sessions_dir())
    with open_conversation(store, "damaged", memory_options()) as conversation:
        feed_turns(conversation, FACTS)
    (memory_file,) = (home / "sessions/damaged").glob("memory.*.npz")
    memory_file.write_bytes(b"not a zip")
    with open_conversation(store, "damaged", memory_options()) as conversation:
        assert conversation.memory.capture.cell_mass.sum() == 0  # mass starts over
        assert conversation.send("And?").generated_tokens > 0


def test_an_infinite_budget_is_a_clear_error(home):
    proc = run_cli("chat", "-s", "x", "--budget", "inf", "-p", "hi")
    assert proc.returncode == 2 and "--budget" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.model
def test_tau_percentile_without_a_calibration_is_a_clear_error(
    home, models_home, model_path, no_shipped_weights
):
    from flashmem_cli.chat.memory import MemoryOptions, resolve_tau
    from flashmem_cli.errors import FlashmemError
    from flashmem_cli.models import describe

    file = describe(model_path)
    with pytest.raises(FlashmemError, match="--tau-percentile needs a calibration of .*calibrate"):
        resolve_tau(file, MemoryOptions(tau_percentile=90))


@pytest.mark.model
def test_the_default_model_is_calibrated_out_of_the_box(home, models_home):
    info = run_json("models", "info")
    assert info["monitor_tau"] == pytest.approx(4.15, abs=0.01)  # the shipped calibration
    proc = run_cli("chat", "-s", "x", "--tau-percentile", "90", "-n", "4", "-p", "hi")
    assert proc.returncode == 0, proc.stderr
