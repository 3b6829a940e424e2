"""Loading a configured model: its files fetched from the hub into the models volume, then
its family's `load`. Runs where the model runs (a worker process, or the engine thread of
an in-process model)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from backends.base import Backend, ModelSpec
from backends.errors import ModelLoadError
from backends.hub import fetch_file, fetch_snapshot

if TYPE_CHECKING:
    from app.settings import ModelEntry

log = logging.getLogger(__name__)


def resolve_weights(entry: ModelEntry, models_dir: Path) -> Path | None:
    """The model's local weights, downloaded from the hub when needed."""
    setup, where = entry.setup, entry.setup_key
    if setup.model_path is not None:
        if not setup.model_path.exists():
            raise ModelLoadError(f"{where}.model_path '{setup.model_path}' does not exist")
        return setup.model_path
    if entry.backend.weights is None:
        return None
    if entry.backend.weights == "snapshot":
        assert setup.repo_id is not None  # model_entries() checked there is a source
        return fetch_snapshot(models_dir, setup.repo_id, setup.revision, where,
                              weights=setup.filename, code=_trusts_code(entry))
    if not setup.filename:
        raise ModelLoadError(f"{where}.filename is required for model_family "
                             f"'{entry.family}': name the weights file in {setup.repo_id}")
    assert setup.repo_id is not None  # model_entries() checked there is a source
    return fetch_file(models_dir, setup.repo_id, setup.filename, setup.revision, where)


def resolve_tokenizer(entry: ModelEntry, models_dir: Path) -> Path | None:
    """The tokenizer files of `setup_params.tokenizer_repo_id`, when it is set."""
    repo = entry.setup.tokenizer_repo_id
    if repo is None:
        return None
    return fetch_snapshot(models_dir, repo, None, entry.setup_key,
                          tokenizer_only=True, code=_trusts_code(entry))


def _trusts_code(entry: ModelEntry) -> bool:
    """The repository's own Python files are fetched only for trust_remote_code models."""
    return bool(getattr(entry.params, "trust_remote_code", False))


def load_model(entry: ModelEntry, models_dir: Path) -> Backend:
    path = resolve_weights(entry, models_dir)
    tokenizer = resolve_tokenizer(entry, models_dir)
    log.info("loading model %s (%s) from %s", entry.name, entry.family, path)
    return entry.backend.load(ModelSpec(name=entry.name, params=entry.params, path=path,
                                        setup_params=entry.setup.model_dump(),
                                        tokenizer_path=tokenizer))
