"""The served models: one scheduler each, looked up by name."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from app.errors import ModelNotFound
from app.scheduler import ModelScheduler
from app.settings import ModelEntry
from backends.base import Backend, ModelSpec
from backends.errors import ModelLoadError
from backends.grammar import GrammarLimits
from backends.hub import fetch_file, fetch_snapshot

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


class ModelPool:
    """Starts, finds and stops the schedulers of every configured model."""

    def __init__(self, entries: list[ModelEntry], models_dir: Path) -> None:
        self.entries = {e.name: e for e in entries}
        self.schedulers = {
            e.name: ModelScheduler(
                e.name, partial(load_model, e, models_dir),
                max_queue=e.max_queue, request_timeout=e.request_timeout,
                default_max_tokens=e.default_max_tokens,
                prompt_chars_per_token=e.prompt_chars_per_token,
                grammar_limits=GrammarLimits(e.max_grammar_repeat, e.max_grammar_bytes))
            for e in entries
        }

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    def stop(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.stop()

    def get(self, name: str | None,
            may_use: Callable[[str], bool] = lambda _: True) -> ModelScheduler:
        """The scheduler of model `name` (the first model when None); `may_use` says which
        names the caller may see in the 404's list (a restricted key sees only its own)."""
        if name is None:
            return next(iter(self.schedulers.values()))
        try:
            return self.schedulers[name]
        except KeyError:
            raise self.not_found(name, may_use) from None

    def not_found(self, name: str, may_use: Callable[[str], bool]) -> ModelNotFound:
        usable = [served for served in self.schedulers if may_use(served)]
        return ModelNotFound(f"Model '{name}' is not available here; available: "
                             f"{', '.join(usable) or 'none to this key'}.", param="model")

    def all_ready(self) -> bool:
        return all(s.state == "ready" for s in self.schedulers.values())
