"""The served models: one engine client each (`engine.client`), looked up by name."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from app.errors import ModelNotFound
from app.settings import ModelEntry, Settings
from engine.client import EngineClient
from engine.inprocess import InProcessClient
from engine.loading import load_model
from engine.local import LocalClient, preload
from engine.worker import limits_of

log = logging.getLogger(__name__)


def make_client(entry: ModelEntry, settings: Settings) -> EngineClient:
    """The client of a model, by its placement."""
    limits = limits_of(entry)
    if entry.placement == "inprocess":
        return InProcessClient(entry.name, limits,
                               partial(load_model, entry, settings.models_dir))
    if entry.placement == "remote":
        from engine.remote import RemoteClient

        return RemoteClient(entry.name, limits, settings)
    return LocalClient(entry.name, limits, settings)


class ModelPool:
    """Starts, finds and stops the clients of every configured model."""

    def __init__(self, entries: list[ModelEntry], settings: Settings) -> None:
        self.entries = {e.name: e for e in entries}
        preload(e.backend.__module__ for e in entries if e.placement == "local")
        self.clients: dict[str, EngineClient] = {
            e.name: make_client(e, settings) for e in entries}

    def start(self) -> None:
        for client in self.clients.values():
            client.start()

    async def stop(self) -> None:
        await asyncio.gather(*(client.stop() for client in self.clients.values()))

    def interrupt_all(self, error: BaseException) -> int:
        """End every running job of every model with `error`; how many there were."""
        return sum(client.interrupt_all(error) for client in self.clients.values())

    def get(self, name: str | None,
            may_use: Callable[[str], bool] = lambda _: True) -> EngineClient:
        """The client of model `name` (the first model when None); `may_use` says which
        names the caller may see in the 404's list (a restricted key sees only its own)."""
        if name is None:
            return next(iter(self.clients.values()))
        try:
            return self.clients[name]
        except KeyError:
            raise self.not_found(name, may_use) from None

    def not_found(self, name: str, may_use: Callable[[str], bool]) -> ModelNotFound:
        usable = [served for served in self.clients if may_use(served)]
        return ModelNotFound(f"Model '{name}' is not available here; available: "
                             f"{', '.join(usable) or 'none to this key'}.", param="model")

    def all_ready(self) -> bool:
        return all(c.info.state == "ready" for c in self.clients.values())
