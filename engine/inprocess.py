"""The engine in the API process: the model's scheduler runs on threads of this process.

No isolation (a fault in native code ends the server); for plugins under development, for
families whose objects cannot cross a process boundary, and for tests of the API layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from backends.base import Backend
from engine.client import EngineClient, ModelInfo
from engine.jobs import Job
from engine.ops import CALLS, ModelLimits
from engine.scheduler import ModelScheduler


class InProcessClient(EngineClient):
    placement = "inprocess"

    def __init__(self, name: str, limits: ModelLimits, loader: Callable[[], Backend]) -> None:
        super().__init__(name, limits)
        self.scheduler = ModelScheduler(name, loader, max_queue=limits.max_queue)

    @property
    def info(self) -> ModelInfo:
        s = self.scheduler
        backend = s.backend
        return ModelInfo(state=s.state, error=s.error,
                         capabilities=backend.capabilities if backend else frozenset(),
                         context_length=backend.context_length if backend else None,
                         stats={**s.stats.as_dict(),
                                **(backend.engine_stats() if backend else {})},
                         load=s.load, tool_format=backend.tool_format if backend else "json",
                         reasoning=backend.reasoning if backend else None)

    @info.setter
    def info(self, value: ModelInfo) -> None:  # the base class sets it once; derived here
        pass

    @property
    def backend(self) -> Backend | None:
        return self.scheduler.backend

    def start(self) -> None:
        self.scheduler.start()
        loop = asyncio.get_running_loop()

        async def loaded() -> None:
            await asyncio.to_thread(self.scheduler.loaded.wait)
            self._loaded.set()

        self._watch = loop.create_task(loaded())

    async def stop(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)

    def submit(self, job: Job, call: tuple[str, tuple[Any, ...]] | None = None) -> None:
        if call is None:
            self.scheduler.submit(job)
            return
        name, args = call
        self.scheduler.submit_call(job, bind_call(CALLS[name], self.limits, args))


def bind_call(fn: Callable[..., Any], limits: ModelLimits,
          args: tuple[Any, ...]) -> Callable[[Backend], Any]:
    return lambda backend: fn(backend, limits, *args)
