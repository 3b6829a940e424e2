"""What the routes call: generation and embeddings on a model's scheduler, metered.

Every generation and embedding goes through `start_generation` / `embed` with the request's
`Meter` (the `MeterDep` dependency): that is where the key's model access, rate limits and
quotas are checked, tokens reserved and settled, and the request recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import Request

from app.auth.meter import Meter, Ticket, status_of
from app.errors import ClientDisconnected
from app.scheduler import JobStream, ModelScheduler
from backends.base import CHAT, EMBED, GENERATE, TOKENIZE, Backend, Chunk, GenerationRequest
from backends.errors import CapabilityNotSupported

T = TypeVar("T")


def _require(scheduler: ModelScheduler, capability: str, what: str) -> None:
    backend = scheduler.backend
    if backend is not None and capability not in backend.capabilities:
        raise CapabilityNotSupported(f"Model '{scheduler.name}' does not support {what}.",
                                     param="model")


def prompt_words(request: GenerationRequest) -> int:
    if request.messages is not None:
        return sum(len(str(m.get("content", "")).split()) for m in request.messages)
    return len((request.prompt or "").split())


def reservation(backend: Backend, request: GenerationRequest) -> int:
    """Prompt tokens + the most completion tokens the request may produce (engine thread)."""
    prompt = 0
    if TOKENIZE in backend.capabilities:
        if request.messages is not None:
            if CHAT in backend.capabilities:
                text = backend.apply_chat_template(request.messages)
                prompt = len(backend.tokenize(text, add_special=False))
        else:
            prompt = len(backend.tokenize(request.prompt or ""))
            if request.params.suffix is not None:
                prompt += len(backend.tokenize(request.params.suffix, add_special=False)) + 3
    room = backend.context_length
    completion = request.params.max_tokens
    if completion is None:
        completion = max(0, room - prompt) if room is not None else 0
    return prompt + completion


async def start_generation(scheduler: ModelScheduler, request: GenerationRequest,
                           meter: Meter) -> JobStream:
    """Admit the request on `meter`, queue the generation and return its stream once the
    prompt was accepted. The stream settles its ticket when it ends, however it ends."""
    _require(scheduler, GENERATE, "text generation")
    if request.params.max_tokens is None and scheduler.default_max_tokens is not None:
        params = replace(request.params, max_tokens=scheduler.default_max_tokens)
        request = replace(request, params=params)
    final = request

    async def count() -> int:
        tokens: int = await scheduler.call(lambda backend: reservation(backend, final))
        return tokens

    ticket = await meter.admit(scheduler.name, prompt_words(request), count)
    try:
        stream = await scheduler.generate(request)
    except BaseException:
        await ticket.refund()
        raise
    ticket.running = True
    return MeteredStream(stream, ticket)


class MeteredStream(JobStream):
    """A job's stream that reports its chunks to its ticket and settles it at the end."""

    def __init__(self, inner: JobStream, ticket: Ticket) -> None:  # noqa: D107
        self._inner, self._ticket, self.first = inner, ticket, inner.first

    async def __aiter__(self) -> AsyncIterator[Any]:
        status = 200
        try:
            async for chunk in self._inner:
                if isinstance(chunk, Chunk):
                    self._ticket.observe(chunk)
                yield chunk
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            await self._ticket.settle(status)

    def close(self) -> None:
        self._inner.close()


async def collect(stream: JobStream) -> tuple[str, Chunk | None]:
    """The whole completion and its final chunk (finish reason, token counts)."""
    parts: list[str] = []
    final = None
    async for chunk in stream:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            final = chunk
    return "".join(parts), final


async def embed(scheduler: ModelScheduler, texts: list[str], meter: Meter) -> list[list[float]]:
    """Embed `texts`, metered: their tokens count as prompt tokens."""
    _require(scheduler, EMBED, "embeddings")

    counted: list[int] = []

    async def count() -> int:
        def tokens(backend: Backend) -> int:
            if TOKENIZE not in backend.capabilities:
                return 0
            return sum(len(backend.tokenize(text)) for text in texts)

        counted.append(await scheduler.call(tokens))
        return counted[-1]

    ticket = await meter.admit(scheduler.name, sum(len(t.split()) for t in texts), count)
    try:
        if meter.key is not None and not counted:
            await count()
        vectors = await scheduler.embed(texts)
    except BaseException:
        await ticket.refund()
        raise
    ticket.running, ticket.completion_tokens = True, 0
    ticket.prompt_tokens = counted[-1] if counted else 0
    await ticket.settle(200)
    return vectors


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
