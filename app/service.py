"""What the routes call: generation and embeddings on a model (its `EngineClient`), metered.

Every generation and embedding goes through `start_generation` / `embed` with the request's
`Meter` (the `MeterDep` dependency): that is where the key's model access, rate limits and
quotas are checked, tokens reserved and settled, and the request recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import Request

from app.auth.meter import Meter, Ticket, status_of
from app.errors import ClientDisconnected
from app.prompts import PreparedPrompt, bound_chars, bound_texts, prompt_chars, reusing_ids
from app.telemetry import log_prompt
from backends.base import (
    CHAT,
    EMBED,
    GENERATE,
    JSON_OUTPUT,
    LOGPROBS,
    TOKENIZE,
    TOOLS,
    Chunk,
    GenerationRequest,
    TokenLogprob,
)
from backends.errors import CapabilityNotSupported, ContextLengthExceeded
from engine.client import EngineClient
from engine.jobs import JobStream

T = TypeVar("T")


def _require(model: EngineClient, capability: str, what: str) -> None:
    if model.info.state == "ready" and capability not in model.info.capabilities:
        raise CapabilityNotSupported(f"Model '{model.name}' does not support {what}.",
                                     param="model")


def prompt_words(request: GenerationRequest) -> int:
    if request.messages is not None:
        return sum(len(str(m.get("content", "")).split()) for m in request.messages)
    return len((request.prompt or "").split())


async def start_generation(model: EngineClient, request: GenerationRequest,
                           meter: Meter, *, clamp: bool = False) -> MeteredStream:
    """Admit the request on `meter`, queue the generation and return its stream once the
    prompt was accepted. The stream settles its ticket when it ends, however it ends.

    The prompt is bounded in characters first, then readied once by the model
    (`PreparedPrompt`); with `clamp`, see there."""
    _require(model, GENERATE, "text generation")
    if request.messages is not None:
        _require(model, CHAT, "chat messages (it has no chat template)")
    if request.params.json_mode or request.params.json_schema is not None:
        _require(model, JSON_OUTPUT, "constrained JSON output (response_format)")
    if request.tools:
        _require(model, TOOLS, "tools (its chat template cannot render them)")
    if request.params.tool_choice is not None:
        _require(model, JSON_OUTPUT, "a forced tool_choice (constrained output); use "
                 "tool_choice auto")
    if request.params.logprobs is not None:
        _require(model, LOGPROBS, "logprobs")
    bound_chars(model, prompt_chars(request),
                "messages" if request.messages is not None else "prompt")
    if meter.cache_scope is not None:
        request = replace(request, cache_scope=meter.cache_scope)
    prompt = PreparedPrompt(model, request, clamp)

    ticket = await meter.admit(model.name, prompt_words(request), prompt.reservation)
    try:
        request = await prompt.request()
        submitted = time.monotonic()
        stream = await model.generate(request)
    except BaseException:
        await ticket.refund()
        raise
    if meter.metrics is not None:
        meter.metrics.queue_wait.labels(model.name).observe(time.monotonic() - submitted)
    ticket.running = True
    log_prompt(meter.log_prompts, "prompt",
               request.messages if request.messages is not None else request.prompt)
    return MeteredStream(stream, ticket, request, prompt.clamped)


class MeteredStream(JobStream):
    """A job's stream that reports its chunks to its ticket and settles it at the end."""

    def __init__(self, inner: JobStream, ticket: Ticket, request: GenerationRequest,
                 clamped: int | None = None) -> None:  # noqa: D107
        super().__init__(inner._job, inner.first)
        self._ticket = ticket
        self.request = request  # as the engine got it (prompt_ids set when tokenized)
        self.clamped = clamped  # the lowered max_tokens, when start_generation clamped it
        self._text: list[str] | None = [] if ticket.meter.log_prompts else None

    def observe(self, item: Any) -> None:
        if isinstance(item, Chunk):
            self._ticket.observe(item)
            if self._text is not None:
                self._text.append(item.text)

    async def ended(self, error: BaseException | None) -> None:
        if self._text is not None:
            log_prompt(True, "completion", "".join(self._text))
        await self._ticket.settle(200 if error is None else status_of(error))


async def start_clamped(model: EngineClient, request: GenerationRequest,
                        meter: Meter) -> tuple[JobStream, int | None]:
    """Like start_generation, but a max_tokens the context has no room for is lowered to
    what it leaves instead of failing; returns the stream and the lowered max_tokens (or
    None when the request fit)."""
    try:
        stream = await start_generation(model, request, meter, clamp=True)
        return stream, stream.clamped
    except ContextLengthExceeded as exc:  # from a backend that tokenizes on its engine thread
        room = exc.context_length - exc.prompt_tokens
        if room <= 0:  # the prompt alone fills the context
            raise
        clamped = replace(request, params=replace(request.params, max_tokens=room))
        return await start_generation(model, clamped, meter), room


@dataclass
class Completed:
    """One finished generation: its text, final chunk and (if asked) token logprobs."""

    text: str = ""
    final: Chunk | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def generate_choices(http: Request, model: EngineClient,
                           requests: list[GenerationRequest], meter: Meter) -> list[Completed]:
    """Run each request to completion in turn (the `n` choices of one API request)."""
    results, previous = [], None
    for request in requests:
        stream = await start_generation(model, reusing_ids(previous, request), meter)
        previous = stream.request
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


async def stream_choices(model: EngineClient, requests: list[GenerationRequest],
                         meter: Meter) -> AsyncIterator[tuple[int, JobStream]]:
    """Each request's stream in turn, with its choice index; each one is started when the
    previous one has ended, the first before this returns (so early errors are plain
    errors). The caller iterates (and closes) each stream itself: no layer per token."""
    first = await start_generation(model, requests[0], meter)

    async def streams() -> AsyncIterator[tuple[int, JobStream]]:
        yield 0, first
        previous = first.request
        for index, request in enumerate(requests[1:], start=1):
            stream = await start_generation(model, reusing_ids(previous, request), meter)
            previous = stream.request
            yield index, stream

    return streams()


async def collect(stream: JobStream) -> tuple[str, Chunk | None]:
    """The whole completion and its final chunk (finish reason, token counts)."""
    parts: list[str] = []
    final = None
    async for chunk in stream:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            final = chunk
    return "".join(parts), final


async def embed(model: EngineClient, texts: list[str], meter: Meter) -> list[list[float]]:
    """Embed `texts`, metered: their tokens count as prompt tokens."""
    bound_texts(model, texts, "text")
    vectors, _ = await _embed_metered(model, texts, meter, None)
    return vectors


async def embed_inputs(model: EngineClient, inputs: list[str] | list[list[int]],
                       meter: Meter) -> tuple[list[list[float]], int]:
    """Embed texts or token-id lists (detokenized by the model); also the input tokens
    (the ids given, or the texts' tokens; 0 for a family that does not tokenize)."""
    _require(model, EMBED, "embeddings")
    ids = [i for i in inputs if isinstance(i, list)]
    texts = [i for i in inputs if isinstance(i, str)]
    bound_texts(model, texts, "input")
    known = None
    if ids:
        _require(model, TOKENIZE, "token-id input")
        _bound_ids(model, ids)
        texts = await model.call("detokenize_all", ids)
        known = sum(len(one) for one in ids)
    return await _embed_metered(model, texts, meter, known)


def _bound_ids(model: EngineClient, ids: list[list[int]]) -> None:
    """Refuse an id list longer than the model's context before detokenizing it."""
    context = model.info.context_length
    for i, one in enumerate(ids):
        if context is not None and len(one) > context:
            raise ContextLengthExceeded(prompt_tokens=len(one), max_tokens=0,
                                        context_length=context,
                                        param=f"input[{i}]" if len(ids) > 1 else "input")


async def _embed_metered(model: EngineClient, texts: list[str], meter: Meter,
                         known: int | None) -> tuple[list[list[float]], int]:
    """Admit, embed and settle one embedding call; the texts' tokens (or `known`)."""
    _require(model, EMBED, "embeddings")
    counted = [] if known is None else [known]

    async def count() -> int:
        if not counted:
            counted.append(await model.call("count_tokens", texts))
        return counted[0]

    ticket = await meter.admit(model.name, sum(len(t.split()) for t in texts), count)
    try:
        tokens = await count()
        vectors = await model.embed(texts)
    except BaseException:
        await ticket.refund()
        raise
    ticket.running, ticket.prompt_tokens, ticket.completion_tokens = True, tokens, 0
    await ticket.settle(200)
    return vectors, tokens


async def tokenize(model: EngineClient, text: str | None,
                   messages: list[dict[str, str]] | None, add_special: bool = True) -> list[int]:
    """Token ids of a text, or of chat messages as the chat template renders them."""
    _require(model, TOKENIZE, "tokenization")
    if messages is not None:
        _require(model, CHAT, "chat messages (it has no chat template)")
        bound_chars(model, sum(len(m["content"]) for m in messages), "messages")
    else:
        bound_chars(model, len(text or ""), "text")

    ids: list[int] = await model.call("tokenize", text, messages, add_special)
    return ids


async def detokenize(model: EngineClient, ids: list[int]) -> str:
    _require(model, TOKENIZE, "detokenization")
    text: str = await model.call("detokenize", ids)
    return text


def _capabilities(model: EngineClient) -> frozenset[str]:
    return model.info.capabilities


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
