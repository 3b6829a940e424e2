"""What the routes call: generation and embeddings on a model's scheduler."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from fastapi import Request

from app.errors import ClientDisconnected
from app.scheduler import JobStream, ModelScheduler
from backends.base import (
    CHAT,
    EMBED,
    GENERATE,
    JSON_OUTPUT,
    LOGPROBS,
    TOKENIZE,
    Backend,
    Chunk,
    GenerationRequest,
    TokenLogprob,
)
from backends.errors import CapabilityNotSupported, ContextLengthExceeded

T = TypeVar("T")


def _require(scheduler: ModelScheduler, capability: str, what: str) -> None:
    backend = scheduler.backend
    if backend is not None and capability not in backend.capabilities:
        raise CapabilityNotSupported(f"Model '{scheduler.name}' does not support {what}.",
                                     param="model")


async def start_generation(scheduler: ModelScheduler, request: GenerationRequest) -> JobStream:
    """Queue a generation and return its stream once the prompt was accepted."""
    _require(scheduler, GENERATE, "text generation")
    if request.messages is not None:
        _require(scheduler, CHAT, "chat messages (it has no chat template)")
    if request.params.json_mode or request.params.json_schema is not None:
        _require(scheduler, JSON_OUTPUT, "constrained JSON output (response_format)")
    if request.params.logprobs is not None:
        _require(scheduler, LOGPROBS, "logprobs")
    if request.params.max_tokens is None and scheduler.default_max_tokens is not None:
        params = replace(request.params, max_tokens=scheduler.default_max_tokens)
        request = replace(request, params=params)
    return await scheduler.generate(request)


async def start_clamped(scheduler: ModelScheduler,
                        request: GenerationRequest) -> tuple[JobStream, int | None]:
    """Like start_generation, but a max_tokens the context has no room for is lowered to
    what it leaves instead of failing; returns the stream and the lowered max_tokens (or
    None when the request fit)."""
    try:
        return await start_generation(scheduler, request), None
    except ContextLengthExceeded as exc:
        room = exc.context_length - exc.prompt_tokens
        if room <= 0:  # the prompt alone fills the context
            raise
        clamped = replace(request, params=replace(request.params, max_tokens=room))
        return await start_generation(scheduler, clamped), room


@dataclass
class Completed:
    """One finished generation: its text, final chunk and (if asked) token logprobs."""

    text: str = ""
    final: Chunk | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def generate_choices(http: Request, scheduler: ModelScheduler,
                           requests: list[GenerationRequest]) -> list[Completed]:
    """Run each request to completion in turn (the `n` choices of one API request)."""
    results = []
    for request in requests:
        stream = await start_generation(scheduler, request)
        results.append(await unless_disconnected(http, stream, _complete(stream)))
    return results


async def _complete(stream: JobStream) -> Completed:
    done, parts = Completed(), []
    async for chunk in stream:
        parts.append(chunk.text)
        done.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            done.final = chunk
    done.text = "".join(parts)
    return done


async def stream_choices(scheduler: ModelScheduler, requests: list[GenerationRequest]
                         ) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) of each request in turn. The first one is started (and its
    prompt accepted) before this returns, so early errors are plain errors."""
    first = await start_generation(scheduler, requests[0])

    async def chunks() -> AsyncIterator[tuple[int, Chunk]]:
        for index, request in enumerate(requests):
            stream = first if index == 0 else await start_generation(scheduler, request)
            try:
                async for chunk in stream:
                    yield index, chunk
            finally:
                stream.close()

    return chunks()


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


async def embed_inputs(scheduler: ModelScheduler,
                       inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
    """Embed texts or token-id lists (detokenized by the model); also the input tokens
    (the ids given, or the texts' tokens; 0 for a family that does not tokenize)."""
    _require(scheduler, EMBED, "embeddings")
    ids = [i for i in inputs if isinstance(i, list)]
    texts = [i for i in inputs if isinstance(i, str)]
    if ids:
        _require(scheduler, TOKENIZE, "token-id input")
        texts = await scheduler.call(lambda b: [b.detokenize(one) for one in ids])
        tokens = sum(len(one) for one in ids)
    elif TOKENIZE in _capabilities(scheduler):
        tokens = await scheduler.call(lambda b: sum(len(b.tokenize(t)) for t in texts))
    else:
        tokens = 0
    return await scheduler.embed(texts), tokens


async def tokenize(scheduler: ModelScheduler, text: str | None,
                   messages: list[dict[str, str]] | None, add_special: bool = True) -> list[int]:
    """Token ids of a text, or of chat messages as the chat template renders them."""
    _require(scheduler, TOKENIZE, "tokenization")
    if messages is not None:
        _require(scheduler, CHAT, "chat messages (it has no chat template)")

    def run(backend: Backend) -> list[int]:
        if messages is not None:  # the template writes the special tokens itself
            return backend.tokenize(backend.apply_chat_template(messages), add_special=False)
        return backend.tokenize(text or "", add_special=add_special)

    ids: list[int] = await scheduler.call(run)
    return ids


async def detokenize(scheduler: ModelScheduler, ids: list[int]) -> str:
    _require(scheduler, TOKENIZE, "detokenization")
    text: str = await scheduler.call(lambda b: b.detokenize(ids))
    return text


def _capabilities(scheduler: ModelScheduler) -> frozenset[str]:
    return scheduler.backend.capabilities if scheduler.backend is not None else frozenset()


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
