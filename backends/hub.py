"""Fetch model weights from the Hugging Face Hub into `models_dir`.

Layout: `<models_dir>/<owner>/<repo>/<file>` (readable, by repo id). A download grows in
`<repo dir>/.cache/llm-api/<file>.<etag>.part` and is renamed into place only once its size (and
sha256, when the hub gives one) is right, so a file present under its final name is complete
and is reused without any request: a restart works with the hub unreachable or
`HF_HUB_OFFLINE=1`. A cut download resumes where it stopped, within one start (huggingface_hub
retries with Range requests) and across restarts (the .part file is kept).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from backends.errors import ModelLoadError

log = logging.getLogger(__name__)
_GLOB = re.compile(r"[*?\[]")
_DRIVE = re.compile(r"[A-Za-z]:")
_TRUE = {"1", "true", "yes", "on"}


def _endpoint() -> str | None:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return os.environ.get("HF_ENDPOINT") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _unsafe(name: str) -> bool:
    """Whether `name` could land outside the folder it is joined to: absolute, a drive, a
    backslash (a separator on Windows, a trap on POSIX), or an empty, `.` or `..` part."""
    return (not name or name.startswith("/") or "\\" in name or _DRIVE.match(name) is not None
            or any(part in ("", ".", "..") for part in name.split("/")))


def check_inside(name: str, context: str) -> str:
    """`name` as a path inside its repository folder, or a ModelLoadError. Names
    come from the config, from a glob matched against the hub's listing and from a snapshot's
    file list: the hub is not trusted to keep downloads inside models_dir. `context` starts
    the message."""
    if _unsafe(name):
        raise ModelLoadError(f"{context}'{name}' is not a path inside the repository (it must "
                             "be relative, with no '..', '.' or empty parts and no backslash)")
    return name


def repo_dir(models_dir: Path, repo_id: str, where: str = "setup_params") -> Path:
    """`<models_dir>/<owner>/<repo>`; a repo_id that would leave models_dir is refused."""
    if _unsafe(repo_id):
        raise ModelLoadError(f"{where}.repo_id '{repo_id}' is not a repository id such as "
                             "'owner/name' (it would leave models_dir)")
    return models_dir / Path(*repo_id.split("/"))


def local_match(folder: Path, pattern: str) -> list[Path]:
    """Complete files under `folder` matching `pattern` (huggingface_hub's temp dir excluded)."""
    if not _GLOB.search(pattern):
        path = folder / pattern
        return [path] if path.is_file() else []
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts
                  and fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern))


_LOCKS: dict[Path, threading.RLock] = {}
_HELD: dict[Path, int] = {}  # a folder's lock file, held by this process this many times
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """One lock per repository folder: two models of one repo, loading in two threads or in
    two worker processes, must not write the same .part file at once. Threads take a lock
    of this process, processes an exclusive `flock` of a file in the folder's cache."""
    folder = folder.resolve()
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(folder, threading.RLock())
    with lock:
        if _HELD.get(folder):  # this thread holds it already (a nested fetch)
            _HELD[folder] += 1
            try:
                yield
            finally:
                _HELD[folder] -= 1
            return
        cache = folder / ".cache" / "llm-api"
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            _HELD[folder] = 1
            try:
                yield
            finally:
                _HELD[folder] = 0
                fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_file(models_dir: Path, repo_id: str, filename: str, revision: str | None = None,
               where: str = "setup_params") -> Path:
    """Return the local path of `filename` from `repo_id`, downloading it if needed."""
    check_inside(filename, f"{where}.filename: ")
    with _folder_lock(repo_dir(models_dir, repo_id, where)):
        return _fetch_file(models_dir, repo_id, filename, revision, where)


def _fetch_file(models_dir: Path, repo_id: str, filename: str, revision: str | None,
                where: str) -> Path:
    folder = repo_dir(models_dir, repo_id)
    present = local_match(folder, filename)
    if len(present) == 1:
        log.info("using %s (already downloaded)", present[0])
        return present[0]
    if len(present) > 1:
        raise ModelLoadError(f"{where}.filename '{filename}' matches several files in {folder}: "
                             f"{', '.join(p.name for p in present)}; name exactly one")
    if _offline():
        raise ModelLoadError(
            f"'{filename}' of {repo_id} is not in {folder} and HF_HUB_OFFLINE is set; download "
            f"it first with `llm-api download` while online, or set {where}.model_path")
    try:
        name = _resolve_glob(repo_id, filename, revision, where) if _GLOB.search(filename) \
            else filename
        return _download(repo_id, name, revision, folder)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub failure is explained below
        raise _explain(exc, repo_id, filename, revision, where, models_dir) from exc


def _download(repo_id: str, name: str, revision: str | None, folder: Path) -> Path:
    """Download `name` into `folder`, resuming a `.part` file left by an earlier attempt."""
    meta = get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision,
                                           endpoint=_endpoint()), endpoint=_endpoint())
    etag = (meta.etag or "").strip('"')
    parts = folder / ".cache" / "llm-api"
    parts.mkdir(parents=True, exist_ok=True)
    stem = name.replace("/", "__")  # files in subfolders must not share a .part
    part = parts / f"{stem}.{re.sub(r'[^0-9A-Za-z]', '', etag)[:16]}.part"
    for stale in parts.glob(f"{glob.escape(stem)}.*.part"):
        if stale != part:  # left by an older version of the file
            stale.unlink()
    have = part.stat().st_size if part.exists() else 0
    if meta.size is not None and have > meta.size:
        part.unlink()
        have = 0
    needed = (meta.size or 0) - have
    if needed > shutil.disk_usage(parts).free:
        raise OSError(errno.ENOSPC, "not enough free space")
    log.info("downloading %s from %s into %s%s", name, repo_id, folder,
             f" (resuming at {have} of {meta.size} bytes)" if have else "")
    with part.open("ab") as out:
        if meta.size is None or have < meta.size:
            http_get(meta.location, out, resume_size=have, headers=build_hf_headers(),
                     expected_size=meta.size, displayed_filename=name)
    if meta.size is not None and part.stat().st_size != meta.size:
        raise ModelLoadError(f"download of '{name}' ended at {part.stat().st_size} of "
                             f"{meta.size} bytes; start again to resume it")
    if re.fullmatch(r"[0-9a-f]{64}", etag) and _sha256(part) != etag:
        part.unlink()
        raise ModelLoadError(f"'{name}' from {repo_id} failed its sha256 check and was "
                             "discarded; start again to download it anew")
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _resolve_glob(repo_id: str, pattern: str, revision: str | None, where: str) -> str:
    files = HfApi(endpoint=_endpoint()).list_repo_files(repo_id, revision=revision)
    matches = [f for f in files if fnmatch.fnmatch(f, pattern)]
    for name in matches:
        check_inside(name, f"{where}.filename '{pattern}' matched a file of {repo_id} whose "
                     "name ")
    if len(matches) != 1:
        ggufs = [f for f in files if f.endswith(".gguf")]
        found = "nothing" if not matches else ", ".join(matches)
        raise ModelLoadError(f"{where}.filename '{pattern}' must match exactly one file of "
                             f"{repo_id}, it matched {found}; .gguf files there: "
                             f"{', '.join(ggufs) or 'none'}")
    return matches[0]


def _explain(exc: Exception, repo_id: str, filename: str, revision: str | None, where: str,
             models_dir: Path) -> ModelLoadError:
    if isinstance(exc, GatedRepoError):
        return ModelLoadError(f"{repo_id} is gated: accept its terms on the hub and set HF_TOKEN "
                              "to a token of an account that has access")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelLoadError(f"{where}.repo_id: repository '{repo_id}' was not found on the hub "
                              "(if it is private, set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return ModelLoadError(f"{where}.revision: '{revision}' does not exist in {repo_id}")
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return ModelLoadError(f"{where}.filename: '{filename}' is not in {repo_id}; .gguf files "
                              f"there: {_list_gguf(repo_id, revision)}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ModelLoadError(f"disk full while downloading '{filename}' into {models_dir}; free "
                              "space or point models_dir at a larger volume")
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError,
                        ConnectionError)):
        return ModelLoadError(
            f"cannot reach the Hugging Face Hub to download '{filename}' of {repo_id}. To work "
            f"offline, copy the file into {repo_dir(models_dir, repo_id)} (or set "
            f"{where}.model_path to a local file) and set HF_HUB_OFFLINE=1")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return ModelLoadError(f"the hub answered HTTP {status} for '{filename}' of {repo_id}")
    if isinstance(exc, OSError):
        return ModelLoadError(f"downloading '{filename}' of {repo_id} failed: {exc}")
    return ModelLoadError(f"downloading '{filename}' of {repo_id} failed ({type(exc).__name__})")


def _list_gguf(repo_id: str, revision: str | None) -> str:
    try:
        files = HfApi(endpoint=_endpoint()).list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 - the listing only decorates the message
        return "(could not list the repository)"
    return ", ".join(f for f in files if f.endswith(".gguf")) or "none"


# -- whole repositories (transformers-style families) ---------------------------------------

_SNAPSHOT_MARKER = "snapshot.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "vocab.txt", "chat_template.jinja", "chat_template.json", "*.tiktoken")
_MODEL_FILES = ("config.json", "generation_config.json", "quantize_config.json",
                "quant_config.json", "modules.json", "sentence_bert_config.json",
                "config_sentence_transformers.json", "*_Pooling/config.json",
                "*_Normalize/*")


def select_snapshot_files(files: list[str], weights: str | None = None,
                          tokenizer_only: bool = False, code: bool = False) -> list[str]:
    """The files a transformers model needs: config, tokenizer, chat template and weights
    (one format: `weights` if given, else safetensors, else PyTorch .bin); with `code`, the
    repository's Python files too (trust_remote_code)."""
    wanted = list(_TOKENIZER_FILES) + (["*.py"] if code else [])
    if not tokenizer_only:
        wanted += _MODEL_FILES
        if weights:
            wanted.append(weights)
        elif any(f.endswith(".safetensors") and "/" not in f for f in files):
            wanted += ["*.safetensors", "model.safetensors.index.json"]
        else:
            wanted += ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    return sorted(f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in wanted))


def fetch_snapshot(models_dir: Path, repo_id: str, revision: str | None = None,
                   where: str = "setup_params", weights: str | None = None,
                   tokenizer_only: bool = False, code: bool = False) -> Path:
    """Download the needed files of `repo_id` into `<models_dir>/<owner>/<repo>/`.

    Once every file is in place a marker lists them; a later start finds the marker and the
    files and makes no request at all.
    """
    with _folder_lock(repo_dir(models_dir, repo_id, where)):
        return _fetch_snapshot(models_dir, repo_id, revision, where, weights, tokenizer_only,
                               code)


def _fetch_snapshot(models_dir: Path, repo_id: str, revision: str | None, where: str,
                    weights: str | None, tokenizer_only: bool, code: bool) -> Path:
    folder = repo_dir(models_dir, repo_id)
    marker = folder / ".cache" / "llm-api" / _SNAPSHOT_MARKER
    key = {"revision": revision or "main", "weights": weights,
           "tokenizer_only": tokenizer_only, "code": code}
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if {k: done.get(k) for k in key} == key and all((folder / f).is_file()
                                                        for f in done["files"]):
            log.info("using %s (snapshot already downloaded)", folder)
            return folder
    if _offline():
        raise ModelLoadError(
            f"{repo_id} is not (completely) in {folder} and HF_HUB_OFFLINE is set; download it "
            f"first with `llm-api download` while online, or set {where}.model_path")
    try:
        listing = HfApi(endpoint=_endpoint()).list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001 - every hub failure is explained by _explain
        raise _explain(exc, repo_id, "the file list", revision, where, models_dir) from exc
    files = select_snapshot_files(listing, weights, tokenizer_only, code)
    for name in files:
        check_inside(name, f"{where}.repo_id: the hub lists a file of {repo_id} whose name ")
    if weights and not any(fnmatch.fnmatch(f, weights) for f in files):
        raise ModelLoadError(f"{where}.filename '{weights}' is not in {repo_id}; its files: "
                             f"{', '.join(listing[:50])}")
    if not tokenizer_only and "config.json" not in files:
        raise ModelLoadError(f"{where}.repo_id: {repo_id} has no config.json, so it is not a "
                             "transformers model repository")
    for name in files:
        fetch_file(models_dir, repo_id, name, revision, where)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**key, "files": files}), encoding="utf-8")
    return folder
