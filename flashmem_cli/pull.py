"""`flashmem models pull REPO[:QUANT]`: one GGUF from the Hugging Face Hub into models/.

The spec is llama.cpp's `-hf` spelling (`owner/name`, `owner/name:Q4_K_M`), plus an exact file
(`owner/name/file.gguf`, `owner/name:file.gguf`). The file is chosen as llama.cpp's
`find_best_model` (common/download.cpp) chooses it.

Why not `hf_hub_download`: since huggingface_hub 1.18 it downloads into a temporary file unique to
each call and deletes it when the call fails, so a pull stopped by Ctrl-C or a dropped connection
starts again from zero the next time; models are gigabytes. Here huggingface_hub still lists the
repository, asks for the file's metadata (HEAD, redirects, HF_TOKEN, errors) and streams it
(`http_get`, which from 1.20 also resumes within one call after a dropped connection), but the
bytes go to `.<name>.<etag>.part` in the models folder, which the next pull continues with a Range
request. A finished part is checked (the sha256 the Hub gives as etag, the GGUF magic) and renamed
to `<name>.gguf`, so a name ending in .gguf is always a whole file. Needs huggingface_hub >= 1.1
(`http_get(tqdm_class=...)`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
from tqdm import tqdm

from flashmem_cli.errors import FlashmemError
from flashmem_cli.store.files import commit_temp, try_lock

DEFAULT_ENDPOINT = "https://huggingface.co"
GGUF_MAGIC = b"GGUF"
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")  # then the first model file, as llama.cpp does
RESUME = "run the same command again to resume"
NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")

ProgressHook = Callable[[int, "int | None"], None]

_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Za-z0-9_]+)$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK = 1 << 20


class PullError(FlashmemError):
    """A pull that cannot happen: a bad spec, no such repository or file, the Hub unreachable."""


@dataclass(frozen=True)
class PullSpec:
    repo: str
    quant: str | None = None  # upper case, e.g. Q4_K_M
    filename: str | None = None  # a path in the repository


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository, resolved: where its bytes are and what they should be."""

    repo: str
    filename: str  # its path in the repository
    url: str  # the resolve URL, or the CDN URL the Hub redirects it to
    size: int | None
    etag: str | None  # the sha256 of the content for LFS and Xet files
    endpoint: str

    @property
    def local_name(self) -> str:
        return PurePosixPath(self.filename).name


def parse_spec(text: str) -> PullSpec:
    """`owner/name`, `owner/name:QUANT`, `owner/name:file.gguf` or `owner/name/path/file.gguf`."""
    text = text.strip()
    repo, colon, tail = text.partition(":")
    if not colon:
        parts = text.split("/")
        repo, tail = "/".join(parts[:2]), "/".join(parts[2:])
    _check_repo(repo, text)
    if not tail:
        if colon:
            raise PullError(f"{text!r}: nothing after ':'; expected OWNER/NAME:QUANT, e.g. :Q4_K_M")
        return PullSpec(repo)
    if tail.lower().endswith(".gguf"):
        return PullSpec(repo, filename=tail)
    if colon and _QUANT.fullmatch(tail):
        return PullSpec(repo, quant=tail.upper())
    raise PullError(
        f"{text!r}: expected OWNER/NAME, OWNER/NAME:QUANT (e.g. :Q4_K_M) or a .gguf file "
        "(OWNER/NAME/FILE.gguf)"
    )


def _check_repo(repo: str, text: str) -> None:
    if not _REPO.fullmatch(repo) or ".." in repo or "--" in repo or len(repo) > 96:
        raise PullError(
            f"{text!r} is not a Hugging Face repository: expected OWNER/NAME[:QUANT], "
            "e.g. bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"
        )


def choose_file(filenames: Iterable[str], spec: PullSpec) -> str:
    """The repository file to download: the exact file, else the model GGUF whose name carries
    the quant tag, else (no quant) Q4_K_M, then Q8_0, then the first model GGUF."""
    files = sorted(filenames)
    models = [f for f in files if is_model_gguf(f)]
    if spec.filename is not None:
        return _single_file(_exact_file(files, models, spec), models, spec)
    if not models:
        raise PullError(f"{spec.repo} has no GGUF model files (it has: {_sample(files)})")
    for quant in (spec.quant,) if spec.quant else DEFAULT_QUANTS:
        tagged = [f for f in models if _has_tag(f, quant)]
        if tagged:
            return _single_file(tagged, models, spec)
    if spec.quant:
        raise PullError(f"{spec.repo} has no {spec.quant} GGUF; available: {_quants(models)}")
    return _single_file(models, models, spec)


def is_model_gguf(path: str) -> bool:
    """A .gguf that holds a model, not a projector, an imatrix or a draft-model sidecar."""
    name = PurePosixPath(path).name.lower()
    return name.endswith(".gguf") and not any(marker in name for marker in NOT_MODELS)


def available_quants(models: Iterable[str]) -> list[str]:
    """Each model file's quant tag (its file name when it has none), split ones marked."""
    labels: dict[str, None] = {}
    for path in models:
        stem, parts = _split_stem(path)
        match = _TAG.search(stem)
        label = match.group(1).upper() if match else PurePosixPath(path).name
        labels[f"{label} (split)" if parts > 1 else label] = None
    return list(labels)


def _exact_file(files: list[str], models: list[str], spec: PullSpec) -> list[str]:
    """The file the spec names, matched as llama.cpp does (case-insensitive), or by its name
    alone when it sits in a folder of the repository."""
    wanted = (spec.filename or "").lower()
    found = [f for f in files if f.lower() == wanted] or [
        f for f in files if PurePosixPath(f).name.lower() == wanted
    ]
    if len(found) != 1:
        what = "several files named" if found else "no file"
        raise PullError(f"{spec.repo} has {what} {spec.filename}; models: {_sample(models)}")
    if not is_model_gguf(found[0]):
        raise PullError(f"{found[0]} in {spec.repo} is not a model (a projector or a sidecar)")
    return found


def _single_file(candidates: list[str], models: list[str], spec: PullSpec) -> str:
    """The first candidate that is one whole file; split GGUFs are refused."""
    for path in candidates:
        if _split_stem(path)[1] == 1:
            return path
    raise PullError(
        f"{PurePosixPath(candidates[0]).name} in {spec.repo} is a split GGUF, which flashmem "
        f"does not support yet; available: {_quants(models)}"
    )


def _has_tag(path: str, quant: str) -> bool:
    """llama.cpp's `QUANT[.-]` search, anchored at a separator so Q4_XS does not match IQ4_XS."""
    name = PurePosixPath(path).name
    return re.search(rf"(?:^|[-._]){re.escape(quant)}[-.]", name, re.IGNORECASE) is not None


def _split_stem(path: str) -> tuple[str, int]:
    """A GGUF's name without `.gguf` and `-0000i-of-0000n`, and n (1 when it is not split)."""
    stem = PurePosixPath(path).name[: -len(".gguf")]
    match = _SPLIT.match(stem)
    return (match.group(1), int(match.group(3))) if match else (stem, 1)


def _quants(models: list[str]) -> str:
    return ", ".join(available_quants(models)) or "none"


def _sample(files: list[str], limit: int = 12) -> str:
    if not files:
        return "none"
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more


# -- the Hub ----------------------------------------------------------------------------------


def hub_endpoint() -> str:
    """`HF_ENDPOINT` as it is now: huggingface_hub reads it once, when it is first imported."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve(spec: PullSpec | str) -> RemoteFile:
    """List the repository, choose the file, and ask the Hub where its bytes are (HEAD)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    endpoint = hub_endpoint()
    with _quiet_hub_logs(), _hub_errors(endpoint, spec.repo):
        files = HfApi(endpoint=endpoint).list_repo_files(spec.repo)
    filename = choose_file(files, spec)
    url = hf_hub_url(spec.repo, filename, endpoint=endpoint)
    with _quiet_hub_logs(), _hub_errors(endpoint, spec.repo, filename):
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    return RemoteFile(
        repo=spec.repo,
        filename=filename,
        url=meta.location or url,
        size=meta.size,
        etag=meta.etag,
        endpoint=endpoint,
    )


def pull(spec: PullSpec | str, dest_dir: Path, on_progress: ProgressHook | None = None) -> Path:
    """Resolve `spec` and download the file into `dest_dir`; the path of the .gguf there."""
    return download(resolve(spec), dest_dir, on_progress)


def is_present(remote: RemoteFile, dest_dir: Path) -> bool:
    """Already pulled: a file of that name and size (any size when the Hub gives none)."""
    target = dest_dir / remote.local_name
    return target.is_file() and remote.size in (None, target.stat().st_size)


def download(remote: RemoteFile, dest_dir: Path, on_progress: ProgressHook | None = None) -> Path:
    """Download `remote` into `dest_dir` unless it is already there, continuing a part left by
    an interrupted pull; a file of that name but another size is replaced once the new one is
    whole. `on_progress(done, total)` gets the bytes so far (total None if the Hub gives none)."""
    report = on_progress or _ignore_progress
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / remote.local_name
    lock = try_lock(dest_dir / f".{remote.local_name}.lock")
    if lock is None:
        raise PullError(f"another flashmem is already pulling {remote.local_name} into {dest_dir}")
    try:
        if is_present(remote, dest_dir):
            size = target.stat().st_size
            report(size, size)
            return target
        part = part_path(remote, dest_dir)
        _remove_stale_parts(part, remote.local_name)
        _fetch(remote, part, report)
        _check(remote, part)
        commit_temp(part, target)
    finally:
        lock.release()
    return target


def part_path(remote: RemoteFile, dest_dir: Path) -> Path:
    """Where the bytes go until they are whole: hidden, not .gguf, tied to the content's etag
    so that a part of an older version of the file is never continued."""
    version = re.sub(r"[^A-Za-z0-9]", "", remote.etag or "")[:16] or f"size{remote.size}"
    return dest_dir / f".{remote.local_name}.{version}.part"


def _remove_stale_parts(part: Path, name: str) -> None:
    """Parts of earlier versions of the file (the lock is held, so none is being written)."""
    for stale in part.parent.glob(f".{glob.escape(name)}.*.part"):
        if stale != part:
            stale.unlink(missing_ok=True)


def _fetch(remote: RemoteFile, part: Path, report: ProgressHook) -> None:
    """Stream the file onto the end of `part` (a Range request when it already has bytes)."""
    done = part.stat().st_size if part.exists() else 0
    if remote.size is not None and done > remote.size:
        part.unlink()
        done = 0
    report(done, remote.size)
    try:
        with (
            _quiet_hub_logs(),
            _hub_errors(remote.endpoint, remote.repo, remote.filename),
            open(part, "ab") as f,
        ):
            http_get(
                remote.url,
                f,
                resume_size=done,
                headers=_download_headers(remote),
                expected_size=remote.size,
                displayed_filename=remote.local_name,
                tqdm_class=_progress_class(report),
            )
    except PullError as exc:
        raise PullError(f"{exc}; {RESUME}") from exc.__cause__
    except OSError as exc:  # a body shorter than announced, a full disk
        raise PullError(
            f"downloading {remote.local_name} failed: {_one_line(exc)}; {RESUME}"
        ) from exc


def _download_headers(remote: RemoteFile) -> dict[str, str]:
    """huggingface_hub's headers (HF_TOKEN included) for the Hub itself; none of the token for
    the CDN a file redirects to, whose URL is signed. No compression: Range counts raw bytes."""
    headers = build_hf_headers()
    if _origin(remote.url) != _origin(remote.endpoint):
        headers.pop("authorization", None)
    headers["Accept-Encoding"] = "identity"
    return headers


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _progress_class(report: ProgressHook) -> type[tqdm]:
    """huggingface_hub reports download progress through a tqdm class that it instantiates
    itself (total, and initial = the bytes already on disk); this one draws nothing and calls
    `report(done, total)` instead. The Hub client updates it once per 10 MiB chunk."""

    class Report(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = int(kwargs.get("initial") or 0)
            self.expected = kwargs.get("total")
            report(self.done, self.expected)

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            report(self.done, self.expected)
            return None

    return Report


def _check(remote: RemoteFile, part: Path) -> None:
    """A whole part is a GGUF with the sha256 the Hub gave; a bad one is removed."""
    problem = _problem(remote, part)
    if problem:
        part.unlink(missing_ok=True)
        raise PullError(f"{remote.filename} from {remote.repo} {problem}; nothing was saved")


def _problem(remote: RemoteFile, part: Path) -> str | None:
    with open(part, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            return "is not a GGUF file (it does not start with GGUF)"
    etag = (remote.etag or "").lower()
    if _SHA256.fullmatch(etag) and _sha256_of(part) != etag:
        return "arrived corrupted (its sha256 differs from the Hub's)"
    return None


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _ignore_progress(done: int, total: int | None) -> None:
    del done, total


# -- errors -----------------------------------------------------------------------------------


@contextmanager
def _hub_errors(endpoint: str, repo: str, filename: str | None = None) -> Iterator[None]:
    """huggingface_hub's exceptions (multi-line, with request ids) as one-line PullErrors."""
    try:
        yield
    except GatedRepoError as exc:
        raise PullError(
            f"repository {repo} is gated: accept its terms at {endpoint}/{repo} and set HF_TOKEN "
            "to a token of that account"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise PullError(
            f"repository {repo} not found on {endpoint} (a private one needs HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise PullError(f"repository {repo} has no main branch on {endpoint}") from exc
    except EntryNotFoundError as exc:
        raise PullError(f"{filename} not found in {repo} on {endpoint}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise PullError(
            f"{endpoint} answered HTTP {status} for {filename or repo}: {_one_line(exc)}"
        ) from exc
    except OfflineModeIsEnabled as exc:
        raise PullError(f"HF_HUB_OFFLINE is set: cannot pull {repo} from {endpoint}") from exc
    except _request_errors() as exc:
        raise PullError(f"cannot reach {endpoint}: {_one_line(exc)}") from exc


def _request_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's transport errors (refused, timed out, cut, bad proxy, too many
    redirects): httpx2 in huggingface_hub 2, httpx in 1."""
    errors: list[type[Exception]] = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).RequestError)
        except ImportError:
            continue
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub logs each retry as a warning on stderr, across the CLI's progress bar;
    the outcome reaches the user as a PullError instead."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
