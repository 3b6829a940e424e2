"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/models. The official `openai` SDK and LangChain's OpenAI classes work against it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from app import service
from app.api.docs import GENERATION_ERRORS, errors, event_stream
from app.auth.deps import MeterDep
from app.deps import PoolDep, SettingsDep
from app.errors import InvalidParams, as_domain_error, sse_error_data
from app.json_body import JSONBodyRoute
from app.pool import ModelPool
from app.responses_openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionLogprobs,
    Embedding,
    EmbeddingList,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    TextChoice,
    Usage,
    new_id,
    now,
)
from app.schemas_openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.sse import EventStream, data_event
from app.tools import AnswerDeltas, Parsing
from backends.base import Chunk
from engine.client import ModelInfo
from engine.jobs import JobStream

router = APIRouter(prefix="/v1", tags=["openai"], route_class=JSONBodyRoute)
log = logging.getLogger(__name__)

Frame = bytes | dict[str, str]
_json_string = json.JSONEncoder(ensure_ascii=False).encode  # built once: per token
Choices = AsyncIterator[tuple[int, JobStream]]


@router.post("/chat/completions", response_model=ChatCompletion, responses={
    **event_stream("With `stream: true`: `chat.completion.chunk` events, then `[DONE]`."),
    **errors(*GENERATION_ERRORS)})
async def chat_completions(body: ChatCompletionRequest, request: Request, pool: PoolDep,
                           settings: SettingsDep,
                           meter: MeterDep) -> ChatCompletion | EventStream:
    """Chat completion; with `"stream": true`, `chat.completion.chunk` server-sent events
    ending with `data: [DONE]`."""
    scheduler = pool.get(body.model, meter.may_use)
    requests = body.to_requests()
    if body.user:
        log.info("chat completion for user %r on %s", body.user, body.model)
    parsing = _parsing(body, scheduler.info)
    if body.stream:
        choices = await service.stream_choices(scheduler, requests, meter)
        frames = _chat_frames(choices, body.model, body.include_usage(), bool(body.logprobs),
                              parsing)
        return _sse(frames, settings)
    results = await service.generate_choices(request, scheduler, requests, meter)
    usage = Usage.of_results([r.final for r in results], len(results))
    scored = bool(body.logprobs)
    return ChatCompletion(model=body.model, usage=usage, choices=[
        _chat_choice(i, r, scored, parsing) for i, r in enumerate(results)])


def _parsing(body: ChatCompletionRequest, info: ModelInfo) -> Parsing:
    """How this request's answers are taken apart (tool calls, reasoning)."""
    names = [t.function.name for t in body.active_tools()]
    # A forced call is all the answer is (the grammar writes it from the first token).
    reasoning = info.reasoning if body.splits_reasoning() and not body.forced_tools() \
        else None
    # Template variables may open or close the think block: then tell from the text.
    opened = None if body.template_kwargs() else bool(reasoning and reasoning.get("opened"))
    return Parsing((info.tool_format, names) if names else None, reasoning, opened,
                   forced=body.forced_tools() is not None)


def _chat_choice(index: int, result: service.Completed, scored: bool,
                 parsing: Parsing) -> ChatChoice:
    thought: str | None = None
    content: str | None = result.text
    calls: list[dict[str, Any]] | None = None
    if parsing.active:
        thought, content, calls = parsing.whole(result.text)
    message = AssistantMessage(content=content, tool_calls=calls, reasoning_content=thought)
    return ChatChoice(index=index, message=message,
                      finish_reason=_finish_with(calls is not None, result.final),
                      logprobs=ChoiceLogprobs.of(result.logprobs, scored))


@router.post("/completions", response_model=Completion, responses={
    **event_stream("With `stream: true`: `text_completion` events, then `[DONE]`."),
    **errors(*GENERATION_ERRORS)})
async def completions(body: CompletionRequest, request: Request, pool: PoolDep,
                      settings: SettingsDep, meter: MeterDep) -> Completion | EventStream:
    """Text completion of `prompt` (a text or a list: `n` choices each, in order)."""
    scheduler = pool.get(body.model, meter.may_use)
    requests = body.to_requests()
    if body.stream:
        choices = await service.stream_choices(scheduler, requests, meter)
        frames = _text_frames(choices, body.model, body.include_usage(), body.choices(),
                              body.logprobs is not None)
        return _sse(frames, settings)
    results = await service.generate_choices(request, scheduler, requests, meter)
    usage = Usage.of_results([r.final for r in results], body.choices())
    scored = body.logprobs is not None
    return Completion(model=body.model, usage=usage, choices=[
        TextChoice(index=i, text=r.text, finish_reason=_finish(r.final),
                   logprobs=CompletionLogprobs.of(r.logprobs, scored, _echoed(body, i)))
        for i, r in enumerate(results)])


@router.post("/embeddings", response_model=EmbeddingList, responses=errors(*GENERATION_ERRORS))
async def embeddings(body: EmbeddingRequest, pool: PoolDep, settings: SettingsDep,
                     meter: MeterDep) -> EmbeddingList:
    """Embed a text, a list of texts, token ids or a list of token-id lists."""
    body.check_supported()
    inputs = body.inputs()
    limit = settings.server.max_embedding_inputs
    if len(inputs) > limit:
        raise InvalidParams(f"'input' holds {len(inputs)} items; at most {limit} per request "
                            "(server.max_embedding_inputs).", param="input")
    scheduler = pool.get(body.model, meter.may_use)
    vectors, tokens = await service.embed_inputs(scheduler, inputs, meter)
    return EmbeddingList(model=body.model,
                         data=[Embedding.of(i, v, body.encoding_format)
                               for i, v in enumerate(vectors)],
                         usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


@router.get("/models")
async def list_models(request: Request, pool: PoolDep, meter: MeterDep) -> ModelList:
    """Every configured model the key may use, with its capabilities and state."""
    return ModelList(data=[_card(request, pool, name) for name in pool.clients
                           if meter.may_use(name)])


@router.get("/models/{model:path}", responses=errors(403, 404))
async def retrieve_model(model: str, request: Request, pool: PoolDep,
                         meter: MeterDep) -> ModelCard:
    """One model; 404 `model_not_found` for a name that is not served or that the key may
    not use (the message lists only the models the key may use)."""
    if model not in pool.clients or not meter.may_use(model):
        raise pool.not_found(model, meter.may_use)
    return _card(request, pool, model)


def _card(request: Request, pool: ModelPool, name: str) -> ModelCard:
    info = pool.clients[name].info
    return ModelCard(id=name, created=request.app.state.started, family=pool.entries[name].family,
                     state=info.state, capabilities=sorted(info.capabilities),
                     context_length=info.context_length)


def _echoed(body: CompletionRequest, index: int) -> int:
    """Characters of echoed prompt before choice `index`'s completion."""
    return len(body.prompts()[index // body.choices()]) if body.echo else 0


def _finish(final: Chunk | None) -> Any:
    return final.finish_reason if final is not None and final.finish_reason else "stop"


def _finish_with(called: bool, final: Chunk | None) -> Any:
    """`tool_calls` when the answer made calls, unless max_tokens cut it (`length`)."""
    reason = _finish(final)
    return "tool_calls" if called and reason != "length" else reason


def _sse(frames: AsyncIterator[Frame], settings: Any) -> EventStream:
    return EventStream(frames, ping=settings.server.sse_ping_seconds)


def _text_event(build: Callable[[str], BaseModel],
                exclude: set[str] | None) -> Callable[[str], bytes | dict[str, str]]:
    """The `data:` event of `build(text)` dumped as JSON, for any text. The model is dumped
    once with a marker for the text; each event is then the JSON before the marker, the text
    as a JSON string and the JSON after it (a pydantic dump per token costs ~10x more)."""
    mark = new_id("text")
    head, *tail = build(mark).model_dump_json(exclude=exclude).split(json.dumps(mark))
    if len(tail) != 1:  # the marker is not where the text goes: dump every event
        return lambda text: data_event(build(text).model_dump_json(exclude=exclude))
    before, after = b"data: " + head.encode(), tail[0].encode() + b"\n\n"
    return lambda text: before + _json_string(text).encode() + after


def _text_events(build: Callable[[int, str], BaseModel],
                 exclude: set[str] | None) -> Callable[[int, str], Frame]:
    """`(choice index, text) -> event`: each choice's `_text_event`, made on first use."""
    made: dict[int, Callable[[str], Frame]] = {}

    def event(index: int, text: str) -> Frame:
        if index not in made:
            made[index] = _text_event(lambda piece: build(index, piece), exclude)
        return made[index](text)

    return event


async def _framed(choices: Choices,
                  frame: Callable[[int, Chunk], Frame | list[Frame] | None],
                  usage: Callable[[list[Chunk]], Frame] | None) -> AsyncIterator[Frame]:
    """Shared framing: a frame per chunk, the usage frame, `[DONE]`; an error frame (and no
    `[DONE]`) when the generation fails after the stream began."""
    finals: list[Chunk] = []
    try:
        async for index, stream in choices:
            try:
                async for chunk in stream:
                    if chunk.finish_reason is not None:
                        finals.append(chunk)
                    out = frame(index, chunk)
                    if isinstance(out, list):  # several deltas (tool calls)
                        for one in out:
                            yield one
                    elif out is not None:
                        yield out
            finally:
                stream.close()
        if usage is not None:
            yield usage(finals)
        yield {"data": "[DONE]"}
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error frame
        yield sse_error_data(as_domain_error(exc))


def _chat_frames(choices: Choices, model: str, include_usage: bool, scored: bool,
                 parsing: Parsing) -> AsyncIterator[Frame]:
    cid, created = new_id("chatcmpl"), now()
    started: set[int] = set()
    exclude = None if include_usage else {"usage"}

    def dump(choice: list[ChunkChoice], usage: Usage | None = None) -> Frame:
        chunk = ChatCompletionChunk(id=cid, created=created, model=model, choices=choice,
                                    usage=usage)
        return {"data": chunk.model_dump_json(exclude=exclude)}

    content = _text_events(lambda index, text: ChatCompletionChunk(
        id=cid, created=created, model=model, choices=[ChunkChoice(
            index=index, delta={"content": text}, logprobs=ChoiceLogprobs.of([], scored))]),
        exclude)  # plain content deltas

    answers: dict[int, AnswerDeltas] = {}

    def parsed_frame(index: int, chunk: Chunk) -> list[Frame]:
        out: list[Frame] = []
        if index not in answers:  # the first delta of a choice carries the role
            answers[index] = parsing.stream()
            out.append(dump([ChunkChoice(index=index, delta={"role": "assistant",
                                                             "content": ""})]))
        deltas = answers[index]
        finished = chunk.finish_reason is not None
        parts = deltas.feed(chunk.text) if chunk.text else []
        if finished:
            parts += deltas.close()
        out += [dump([ChunkChoice(index=index, delta=d)]) for d in parts]
        if finished:
            reason = _finish_with(deltas.called, chunk)
            out.append(dump([ChunkChoice(index=index, delta={}, finish_reason=reason)]))
        return out

    def frame(index: int, chunk: Chunk) -> Frame | list[Frame] | None:
        if parsing.active:
            return parsed_frame(index, chunk)
        if chunk.finish_reason is not None:
            return dump([ChunkChoice(index=index, delta={},
                                     finish_reason=_finish(chunk))])
        if index not in started:  # the first delta of a choice carries the role
            started.add(index)
            return dump([ChunkChoice(index=index, logprobs=ChoiceLogprobs.of(
                list(chunk.logprobs), scored), delta={"role": "assistant",
                                                      "content": chunk.text})])
        if chunk.logprobs:
            return dump([ChunkChoice(index=index, delta={"content": chunk.text},
                                     logprobs=ChoiceLogprobs.of(list(chunk.logprobs), scored))])
        return content(index, chunk.text) if chunk.text else None

    def usage(finals: list[Chunk]) -> Frame:
        return dump([], Usage.of_results(list(finals), len(finals)))

    return _framed(choices, frame, usage if include_usage else None)


def _text_frames(choices: Choices, model: str, include_usage: bool, n: int,
                 scored: bool) -> AsyncIterator[Frame]:
    cid, created = new_id("cmpl"), now()
    exclude = None if include_usage else {"usage"}

    def dump(choice: list[TextChoice], usage: Usage | None = None) -> Frame:
        chunk = Completion(id=cid, created=created, model=model, choices=choice, usage=usage)
        return {"data": chunk.model_dump_json(exclude=exclude)}

    pieces = _text_events(lambda index, text: Completion(
        id=cid, created=created, model=model, choices=[TextChoice(
            index=index, text=text, finish_reason=None,
            logprobs=CompletionLogprobs.of([], scored))]), exclude)  # plain text pieces

    def frame(index: int, chunk: Chunk) -> Frame | None:
        if chunk.finish_reason is not None:
            return dump([TextChoice(index=index, text="", finish_reason=_finish(chunk))])
        if chunk.logprobs:
            return dump([TextChoice(index=index, text=chunk.text, finish_reason=None,
                                    logprobs=CompletionLogprobs.of(list(chunk.logprobs),
                                                                   scored))])
        return pieces(index, chunk.text) if chunk.text else None

    def usage(finals: list[Chunk]) -> Frame:
        return dump([], Usage.of_results(list(finals), n))

    return _framed(choices, frame, usage if include_usage else None)
