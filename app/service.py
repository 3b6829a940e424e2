"""What the routes call: generation and embeddings on a model's scheduler."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import replace
from typing import TypeVar

from fastapi import Request

from app.errors import ClientDisconnected
from app.scheduler import JobStream, ModelScheduler
from backends.base import EMBED, GENERATE, Chunk, GenerationRequest
from backends.errors import CapabilityNotSupported

T = TypeVar("T")


def _require(scheduler: ModelScheduler, capability: str, what: str) -> None:
    backend = scheduler.backend
    if backend is not None and capability not in backend.capabilities:
        raise CapabilityNotSupported(f"Model '{scheduler.name}' does not support {what}.",
                                     param="model")


async def start_generation(scheduler: ModelScheduler, request: GenerationRequest) -> JobStream:
    """Queue a generation and return its stream once the prompt was accepted."""
    _require(scheduler, GENERATE, "text generation")
    if request.params.max_tokens is None and scheduler.default_max_tokens is not None:
        params = replace(request.params, max_tokens=scheduler.default_max_tokens)
        request = replace(request, params=params)
    return await scheduler.generate(request)


async def collect(stream: JobStream) -> tuple[str, Chunk | None]:
    """The whole completion and its final chunk (finish reason, token counts)."""
    parts: list[str] = []
    final = None
    async for chunk in stream:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            final = chunk
    return "".join(parts), final


async def embed(scheduler: ModelScheduler, texts: list[str]) -> list[list[float]]:
    _require(scheduler, EMBED, "embeddings")
    return await scheduler.embed(texts)


async def unless_disconnected(request: Request, stream: JobStream,
                              work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel the job and raise."""

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(client_gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # e.g. the server is shutting down
        task.cancel()
        stream.close()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    stream.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected("The client closed the connection; the request was cancelled.")
