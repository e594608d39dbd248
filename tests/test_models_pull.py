"""`flashmem models pull` against a local server that answers as the Hugging Face Hub does: the
tree listing, HEAD and GET on /resolve/ (with the CDN redirect of LFS files), Range requests,
and the Hub's error codes. Nothing reaches the network."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest

from flashmem_cli import models, pull
from flashmem_cli.pull import PullError, PullSpec, choose_file, parse_spec
from flashmem_cli.store.files import try_lock

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "owner/Tiny-GGUF"
NAME = "Tiny-Q4_K_M.gguf"
SIZE = 2 * 1024 * 1024 + 12345
CHUNK = 256 * 1024


def gguf_bytes(size: int, seed: int = 0) -> bytes:
    return b"GGUF" + random.Random(seed).randbytes(size - 4)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


@dataclass
class FakeHub:
    """What the server serves and what it was asked."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    cdn: bool = False  # LFS files answer with a redirect to another origin, as on the Hub
    cut_next_get_after: int | None = None  # drop the connection after that many body bytes
    requests: list[Request] = field(default_factory=list)
    port: int = 0

    def gets(self, name: str) -> list[Request]:
        """GETs of a file's bytes, on /resolve/ or on the CDN."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(name)]


class HubHandler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the subclass each server gets
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        del format, args

    def do_HEAD(self) -> None:
        self.answer(head=True)

    def do_GET(self) -> None:
        self.answer(head=False)

    def answer(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(
            Request(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        )
        if tree := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/main", path):
            self.tree(tree.group(1))
        elif resolve := re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", path):
            self.resolve(resolve.group(1), resolve.group(2), head)
        elif cdn := re.fullmatch(r"/cdn/([^/]+/[^/]+)/(.+)", path):
            self.content(self.hub.repos[cdn.group(1)][cdn.group(2)], head)
        else:
            self.error(404, "")

    def tree(self, repo: str) -> None:
        if repo not in self.hub.repos:
            self.error(404, "RepoNotFound")
            return
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": "0" * 40}
            for name, data in sorted(self.hub.repos[repo].items())
        ]
        self.send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def resolve(self, repo: str, name: str, head: bool) -> None:
        if repo not in self.hub.repos:
            self.error(404, "RepoNotFound")
        elif repo in self.hub.gated:
            self.error(401, "GatedRepo")
        elif name not in self.hub.repos[repo]:
            self.error(404, "EntryNotFound")
        elif self.hub.cdn:
            data = self.hub.repos[repo][name]
            headers = {
                "Location": f"http://localhost:{self.hub.port}/cdn/{repo}/{name}",
                "X-Repo-Commit": COMMIT,
                "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Linked-Size": str(len(data)),
            }
            self.send(302, b"", headers, head=True)
        else:
            self.content(self.hub.repos[repo][name], head)

    def content(self, data: bytes, head: bool) -> None:
        """The file, or its tail for `Range: bytes=N-`, with the headers the Hub sends."""
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
        }
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        cut = None if head else self.hub.cut_next_get_after
        if cut is not None:
            self.hub.cut_next_get_after = None
        self.send(206 if start else 200, body, headers, head=head, cut=cut)

    def error(self, status: int, code: str) -> None:
        headers = {"X-Error-Code": code, "X-Repo-Commit": COMMIT} if code else {}
        body = json.dumps({"error": f"{code or 'Not found'}"}).encode()
        self.send(status, body, {"Content-Type": "application/json", **headers})

    def send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        head: bool = False,
        cut: int | None = None,
    ) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-body (the interrupted pulls) is expected here."""


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hub on 127.0.0.1 serving REPO; the Hub client pointed at it, with its own cache,
    no token, and 256 KiB chunks (so progress has several steps)."""
    fake = FakeHub(repos={REPO: {NAME: gguf_bytes(SIZE), "README.md": b"# tiny\n"}})
    handler = type("Handler", (HubHandler,), {"hub": fake})
    server = QuietServer(("127.0.0.1", 0), handler)
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{fake.port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture()
def dest(tmp_path: Path) -> Path:
    return tmp_path / "models"


def leftovers(directory: Path) -> list[str]:
    """What a pull left in the models folder besides its lock files."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


# -- parse_spec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("owner/name", PullSpec("owner/name")),
        (" owner/name-GGUF ", PullSpec("owner/name-GGUF")),
        ("owner/name:q4_k_m", PullSpec("owner/name", quant="Q4_K_M")),
        ("unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL", PullSpec("unsloth/Qwen3-8B-GGUF", quant="UD-Q4_K_XL")),
        ("owner/name/model-Q8_0.gguf", PullSpec("owner/name", filename="model-Q8_0.gguf")),
        ("owner/name/sub/model.GGUF", PullSpec("owner/name", filename="sub/model.GGUF")),
        ("owner/name:model-Q8_0.gguf", PullSpec("owner/name", filename="model-Q8_0.gguf")),
    ],
)
def test_parse_spec(text: str, spec: PullSpec) -> None:
    assert parse_spec(text) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "name",
        "owner/",
        "/name",
        "owner/name:",
        "owner/name:Q4 K",
        "owner/name/README.md",
        "owner/na..me",
        "owner/name/sub:Q4_K_M",
        "https://huggingface.co/owner/name",
    ],
)
def test_parse_spec_refuses(text: str) -> None:
    with pytest.raises(PullError) as error:
        parse_spec(text)
    assert "\n" not in str(error.value)


# -- choose_file ------------------------------------------------------------------------------

BARTOWSKI = [
    ".gitattributes",
    "README.md",
    "Qwen2.5-0.5B-Instruct-IQ4_XS.gguf",
    "Qwen2.5-0.5B-Instruct-Q4_0.gguf",
    "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf",
    "Qwen2.5-0.5B-Instruct-Q8_0.gguf",
    "Qwen2.5-0.5B-Instruct-f16.gguf",
    "Qwen2.5-0.5B-Instruct.imatrix",
    "mmproj-Qwen2.5-0.5B-Instruct-Q4_K_M.gguf",
]


def choose(files: list[str], text: str) -> str:
    return choose_file(files, parse_spec(text))


def test_choose_quant_case_insensitive() -> None:
    assert choose(BARTOWSKI, "o/r:q8_0") == "Qwen2.5-0.5B-Instruct-Q8_0.gguf"
    assert choose(BARTOWSKI, "o/r:F16") == "Qwen2.5-0.5B-Instruct-f16.gguf"
    assert choose(["qwen2.5-0.5b-instruct.q4_k_m.gguf"], "o/r:Q4_K_M") == (
        "qwen2.5-0.5b-instruct.q4_k_m.gguf"
    )


def test_choose_quant_needs_a_separator_before_it() -> None:
    assert choose(BARTOWSKI, "o/r:IQ4_XS") == "Qwen2.5-0.5B-Instruct-IQ4_XS.gguf"
    with pytest.raises(PullError, match="no Q4_XS GGUF"):
        choose(BARTOWSKI, "o/r:Q4_XS")


def test_choose_default_is_q4_k_m_then_q8_0_then_the_first_model() -> None:
    assert choose(BARTOWSKI, "o/r") == "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"
    without_q4_k_m = [f for f in BARTOWSKI if not f.endswith("-Q4_K_M.gguf")]
    assert choose(without_q4_k_m, "o/r") == "Qwen2.5-0.5B-Instruct-Q8_0.gguf"
    assert choose(["README.md", "b-F16.gguf", "a-BF16.gguf"], "o/r") == "a-BF16.gguf"
    assert choose(["README.md", "model.gguf"], "o/r") == "model.gguf"


def test_choose_excludes_projectors_and_sidecars() -> None:
    files = ["mmproj-model-Q4_K_M.gguf", "model-Q8_0.gguf", "mtp-model-Q4_K_M.gguf"]
    assert choose(files, "o/r") == "model-Q8_0.gguf"
    with pytest.raises(PullError, match="no Q4_K_M GGUF; available: Q8_0$"):
        choose(files, "o/r:Q4_K_M")
    with pytest.raises(PullError, match="not a model"):
        choose(files, "o/r:mmproj-model-Q4_K_M.gguf")


def test_choose_exact_file() -> None:
    assert choose(BARTOWSKI, "o/r:qwen2.5-0.5b-instruct-q4_0.gguf") == (
        "Qwen2.5-0.5B-Instruct-Q4_0.gguf"
    )
    assert choose(["Q4_K_M/model-Q4_K_M.gguf"], "o/r/model-Q4_K_M.gguf") == (
        "Q4_K_M/model-Q4_K_M.gguf"
    )
    with pytest.raises(PullError, match="no file other.gguf; models: Qwen2.5"):
        choose(BARTOWSKI, "o/r/other.gguf")


def test_choose_refuses_split_ggufs() -> None:
    files = [
        "big-Q4_K_M-00001-of-00002.gguf",
        "big-Q4_K_M-00002-of-00002.gguf",
        "big-Q2_K.gguf",
    ]
    with pytest.raises(PullError) as error:
        choose(files, "o/r:Q4_K_M")
    message = str(error.value)
    assert "split GGUF" in message and "not support" in message and "\n" not in message
    assert "available: Q2_K, Q4_K_M (split)" in message
    with pytest.raises(PullError, match="split GGUF"):
        choose(files, "o/r")
    assert choose(files, "o/r:Q2_K") == "big-Q2_K.gguf"


def test_choose_lists_what_is_there() -> None:
    with pytest.raises(PullError) as error:
        choose(BARTOWSKI, "o/r:Q5_K_M")
    assert str(error.value) == (
        "o/r has no Q5_K_M GGUF; available: IQ4_XS, Q4_0, Q4_K_M, Q8_0, F16"
    )
    with pytest.raises(PullError, match=r"has no GGUF model files \(it has: README.md, x.bin\)"):
        choose(["README.md", "x.bin"], "o/r")


# -- pull -------------------------------------------------------------------------------------


def test_pull_downloads_with_progress(hub: FakeHub, models_home: Path) -> None:
    progress: list[tuple[int, int | None]] = []
    path = pull.pull(
        f"{REPO}:q4_k_m", models_home, lambda done, total: progress.append((done, total))
    )
    assert path == models_home / NAME
    assert path.read_bytes() == hub.repos[REPO][NAME]
    assert progress[-1] == (SIZE, SIZE)
    assert len(progress) > SIZE // CHUNK
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert not list(models_home.glob(".*.part"))
    assert models.resolve(NAME.removesuffix(".gguf")).path == path.resolve()


def test_second_pull_does_not_download(hub: FakeHub, dest: Path) -> None:
    pull.pull(REPO, dest)
    assert len(hub.gets(NAME)) == 1
    progress: list[tuple[int, int | None]] = []
    assert pull.pull(REPO, dest, lambda *p: progress.append(p)) == dest / NAME
    assert len(hub.gets(NAME)) == 1
    assert progress == [(SIZE, SIZE)]
    remote = pull.resolve(REPO)
    assert pull.is_present(remote, dest)


def test_a_changed_file_is_downloaded_again(hub: FakeHub, dest: Path) -> None:
    pull.pull(REPO, dest)
    hub.repos[REPO][NAME] = gguf_bytes(SIZE + 1, seed=1)
    pull.pull(REPO, dest)
    assert (dest / NAME).read_bytes() == hub.repos[REPO][NAME]


def test_a_dropped_connection_resumes(
    hub: FakeHub, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub >= 1.20 resumes within the pull; before, the pull fails saying to run it
    again, and that one resumes."""
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda _: None)
    hub.cut_next_get_after = 3 * CHUNK + 100
    try:
        path = pull.pull(REPO, dest)
    except PullError as error:
        assert str(error).endswith(pull.RESUME)
        path = pull.pull(REPO, dest)
    assert path.read_bytes() == hub.repos[REPO][NAME]
    first, second = hub.gets(NAME)
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={3 * CHUNK}-"


def test_an_interrupted_pull_resumes_next_time(hub: FakeHub, dest: Path) -> None:
    def interrupt(done: int, total: int | None) -> None:
        if done >= 3 * CHUNK:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull.pull(REPO, dest, interrupt)
    (part,) = leftovers(dest)
    assert part.startswith(f".{NAME}.") and part.endswith(".part")
    assert not list(dest.glob("*.gguf"))
    kept = (dest / part).stat().st_size
    assert kept == 2 * CHUNK  # progress counts a chunk before writing it

    progress: list[tuple[int, int | None]] = []
    path = pull.pull(REPO, dest, lambda *p: progress.append(p))
    assert path.read_bytes() == hub.repos[REPO][NAME]
    assert hub.gets(NAME)[-1].headers["range"] == f"bytes={kept}-"
    assert progress[0] == (kept, SIZE) and progress[-1] == (SIZE, SIZE)
    assert leftovers(dest) == [NAME]


def test_cdn_redirect_keeps_the_token_on_the_hub(
    hub: FakeHub, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub.cdn = True
    assert pull.pull(REPO, dest).read_bytes() == hub.repos[REPO][NAME]
    hub_calls = [r for r in hub.requests if not r.path.startswith("/cdn/")]
    assert all(r.headers.get("authorization") == "Bearer hf_test_token" for r in hub_calls)
    (cdn_get,) = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert "authorization" not in cdn_get.headers


def test_corrupted_bytes_are_refused(hub: FakeHub, dest: Path) -> None:
    hub.cdn = True  # the etag is the sha256 of these bytes, the CDN then serves others
    good = hub.repos[REPO][NAME]
    remote = pull.resolve(REPO)
    hub.repos[REPO][NAME] = good[:-1] + b"x"
    with pytest.raises(PullError, match="sha256"):
        pull.download(remote, dest)
    assert leftovers(dest) == []


def test_missing_repository(hub: FakeHub, dest: Path) -> None:
    with pytest.raises(PullError) as error:
        pull.pull("owner/missing-GGUF:Q4_K_M", dest)
    assert str(error.value) == (
        f"repository owner/missing-GGUF not found on http://127.0.0.1:{hub.port} "
        "(a private one needs HF_TOKEN)"
    )


def test_gated_repository(hub: FakeHub, dest: Path) -> None:
    hub.gated.add(REPO)
    with pytest.raises(PullError, match=f"repository {REPO} is gated: accept its terms"):
        pull.pull(REPO, dest)


def test_missing_quant_names_the_ones_there(hub: FakeHub, dest: Path) -> None:
    with pytest.raises(PullError, match="has no Q8_0 GGUF; available: Q4_K_M$"):
        pull.pull(f"{REPO}:Q8_0", dest)


def test_not_a_gguf(hub: FakeHub, dest: Path) -> None:
    hub.repos["owner/html"] = {"page-Q4_K_M.gguf": b"<html>" + bytes(CHUNK * 2)}
    with pytest.raises(PullError) as error:
        pull.pull("owner/html", dest)
    assert "is not a GGUF file" in str(error.value) and "\n" not in str(error.value)
    assert leftovers(dest) == []


def test_unreachable_hub(dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda _: None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(PullError, match=rf"^cannot reach http://127.0.0.1:{port}: "):
        pull.pull(REPO, dest)


def test_a_whole_part_is_finished_without_downloading(hub: FakeHub, dest: Path) -> None:
    """A pull killed between its last byte and the rename."""
    remote = pull.resolve(REPO)
    dest.mkdir()
    pull.part_path(remote, dest).write_bytes(hub.repos[REPO][NAME])
    assert pull.download(remote, dest).read_bytes() == hub.repos[REPO][NAME]
    assert hub.gets(NAME) == []
    assert leftovers(dest) == [NAME]


def test_a_part_of_an_older_version_is_dropped(hub: FakeHub, dest: Path) -> None:
    dest.mkdir()
    stale = dest / f".{NAME}.0123456789abcdef.part"
    stale.write_bytes(b"GGUF old")
    pull.pull(REPO, dest)
    assert not stale.exists()
    assert "range" not in hub.gets(NAME)[0].headers


def test_one_pull_of_a_file_at_a_time(hub: FakeHub, dest: Path) -> None:
    remote = pull.resolve(REPO)
    dest.mkdir()
    held = try_lock(dest / f".{NAME}.lock")
    assert held is not None
    try:
        with pytest.raises(PullError, match=f"another flashmem is already pulling {NAME}"):
            pull.download(remote, dest)
    finally:
        held.release()


def test_offline_mode(hub: FakeHub, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PullError, match=f"^HF_HUB_OFFLINE is set: cannot pull {REPO} from "):
        pull.pull(REPO, dest)
    assert hub.requests == []


# -- the command ------------------------------------------------------------------------------


def test_models_pull_command_downloads_then_says_it_is_there(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from flashmem_cli.cli import app

    monkeypatch.setenv("FLASHMEM_MODELS_DIR", str(tmp_path / "models"))
    runner = CliRunner()
    first = runner.invoke(app, ["models", "pull", f"{REPO}:Q4_K_M"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "models" / NAME).read_bytes() == hub.repos[REPO][NAME]
    assert f"flashmem chat -m {NAME.removesuffix('.gguf')}" in first.output
    again = runner.invoke(app, ["models", "pull", f"{REPO}:Q4_K_M"])
    assert again.exit_code == 0 and "already in" in again.output
    assert len(hub.gets(NAME)) == 1


def test_models_pull_command_fails_in_one_line(hub: FakeHub, tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "FLASHMEM_MODELS_DIR": str(tmp_path / "models")}
    proc = subprocess.run(
        [sys.executable, "-m", "flashmem_cli", "models", "pull", "owner/missing-GGUF"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: repository owner/missing-GGUF not found")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
