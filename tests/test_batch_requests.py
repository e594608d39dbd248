"""Batch input parsing and output bookkeeping: pure, no model."""

import json

import pytest

from flashmem_cli.batch.requests import BatchRequest, LineError, parse_lines, shard_of
from flashmem_cli.batch.results import read_repaired, scan_done


def parse_one(line):
    (item,) = parse_lines(line.encode() if isinstance(line, str) else line)
    return item


def test_openai_chat_line():
    item = parse_one(
        json.dumps(
            {
                "custom_id": "r1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    ],
                    "max_tokens": 5,
                    "temperature": 0,
                    "seed": 3,
                    "stop": "\n",
                },
            }
        )
    )
    assert isinstance(item, BatchRequest)
    assert (item.id, item.kind, item.max_tokens, item.temperature, item.seed, item.stop) == (
        "r1",
        "chat",
        5,
        0.0,
        3,
        ("\n",),
    )
    assert item.messages[1] == {"role": "user", "content": "Hi"}
    assert item.requested_model == "gpt-4o-mini"


def test_simple_lines_and_derived_ids():
    items = parse_lines(
        b'{"prompt": "a"}\n\n{"id": "x", "messages": [{"role": "user", "content": "b"}], "session": "s-1"}\n'
    )
    assert [(i.id, i.kind, i.line) for i in items] == [
        ("line-1", "completion", 1),
        ("x", "chat", 3),
    ]
    assert items[1].session == "s-1"


@pytest.mark.parametrize(
    "line, code",
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (b'{"id": "a"}', "invalid_request"),
        (b'{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "unknown_url"),
        (
            b'{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}',
            "invalid_request",
        ),
        (b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": 5}}', "invalid_request"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "invalid_request"),
        (b'{"prompt": "x", "max_tokens": -1}', "invalid_request"),
        (b'{"prompt": "x", "max_tokens": 0}', "invalid_request"),
        (b'{"prompt": "x", "temperature": "hot"}', "invalid_request"),
        (b'{"prompt": "x", "n": 2}', "invalid_request"),
        (b'{"prompt": "x", "session": "a b"}', "invalid_session"),
        (b'{"prompt": "caf\xe9"}', "invalid_encoding"),
        (b'{"prompt": "\\ud800"}', "invalid_encoding"),
        (b'{"prompt": "x", "max_tokens": NaN}', "invalid_json"),
        (b'{"prompt": "x", "temperature": Infinity}', "invalid_json"),
        (b'{"prompt": "x", "max_tokens": 1e999}', "invalid_request"),
        (b'{"prompt": "x", "seed": 99999999999999999999}', "invalid_request"),
        (b"[" * 100000 + b"]" * 100000, "invalid_json"),
        (b"null", "invalid_request"),
        (b'{"messages": [{"role": "system", "content": "only me"}]}', "invalid_request"),
        (
            b'{"session": "s", "messages": [{"role": "user", "content": "a"}, '
            b'{"role": "assistant", "content": "b"}]}',
            "invalid_request",
        ),
    ],
)
def test_bad_lines_become_errors_with_codes(line, code):
    item = parse_one(line)
    assert isinstance(item, LineError) and item.code == code, item


def test_a_repeated_id_is_an_error_on_its_later_lines():
    items = parse_lines(b'{"id": "a", "prompt": "1"}\n{"id": "a", "prompt": "2"}\n')
    assert isinstance(items[0], BatchRequest)
    assert isinstance(items[1], LineError) and items[1].code == "duplicate_id"


def test_an_id_that_failed_earlier_is_not_reused():
    items = parse_lines(
        b'{"custom_id": "a", "url": "/v1/embeddings", "body": {}}\n{"id": "a", "prompt": "hi"}\n'
        b'{"prompt": "no id"}\n{"id": "line-3", "prompt": "taken"}\n'
    )
    assert [(type(i).__name__, i.id) for i in items] == [
        ("LineError", "a"),
        ("LineError", "a"),
        ("BatchRequest", "line-3"),
        ("LineError", "line-3"),
    ]
    assert items[1].code == "duplicate_id" and items[3].code == "duplicate_id"


def test_shards_partition_ids():
    ids = [f"id-{i}" for i in range(200)]
    shards = [shard_of(i, 4) for i in ids]
    assert set(shards) == {0, 1, 2, 3}
    assert shards == [shard_of(i, 4) for i in ids]  # stable


def test_resume_cuts_a_torn_last_line_and_collects_what_is_done(tmp_path):
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    out.write_text('{"custom_id": "a"}\n{"custom_id": "b"}\n{"custom_id": "c", "resp')
    err.write_text('{"custom_id": "line-4", "flashmem": {"line": 4}}\n[1, 2]\n"text"\n')
    done = scan_done(out, err)
    assert done.ids == {"a", "b"} and done.error_lines == {4}
    assert out.read_text().endswith('"b"}\n')
    assert read_repaired(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", "0"),
        ("max_tokens", "-1"),
        ("max_tokens", "-2"),
        ("max_tokens", "0.0"),
        ("max_completion_tokens", "0"),
        ("max_completion_tokens", "-1"),
    ],
)
def test_max_tokens_must_be_positive(field, value):
    item = parse_one(f'{{"id": "a", "prompt": "x", "{field}": {value}}}')
    assert isinstance(item, LineError) and item.code == "invalid_request"
    assert item.message == f"{field} must be a positive integer, not {json.loads(value)}"
    assert parse_one(f'{{"prompt": "x", "{field}": 1}}').max_tokens == 1


@pytest.mark.parametrize(
    "line, code",
    [
        (b'{"prompt": "x", "temperature": NaN}', "invalid_json"),
        (b'{"prompt": "x", "temperature": -Infinity}', "invalid_json"),
        (b'{"prompt": "x", "top_p": NaN}', "invalid_json"),
        (b'{"prompt": "x", "top_p": Infinity}', "invalid_json"),
        (b'{"prompt": "x", "temperature": 1e999}', "invalid_request"),
        (b'{"prompt": "x", "top_p": -1e999}', "invalid_request"),
        (b'{"prompt": "x", "max_tokens": -1e999}', "invalid_request"),
    ],
)
def test_non_finite_numbers_are_refused(line, code):
    item = parse_one(line)
    assert isinstance(item, LineError) and item.code == code, item
