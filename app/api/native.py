"""The classic API: /generate, /agenerate, /embeddings, /tokenize, /detokenize, and the
queue-style shapes (/chat_completion, the {job_id, meta, content} body of /generate)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from app import service, telemetry
from app.api.docs import GENERATION_ERRORS, MODEL_ERRORS, errors, event_stream
from app.auth.deps import MeterDep
from app.deps import PoolDep, SettingsDep
from app.errors import ClientDisconnected, InvalidParams, as_domain_error, sse_error
from app.json_body import BodyNotJSON, JSONBodyRoute, parse_body
from app.schemas import EmbeddingsRequest, GenerateRequest
from app.schemas_queue import (
    DetokenizeRequest,
    QueueChatRequest,
    QueueGenerateRequest,
    QueueJob,
    TokenizeRequest,
)
from app.sse import EventStream, data_event
from backends.base import GenerationRequest
from engine.jobs import JobStream

router = APIRouter(tags=["native"], route_class=JSONBodyRoute)
log = logging.getLogger(__name__)


class QueueAnswer(BaseModel):
    content: str


class TokenizeAnswer(BaseModel):
    tokens: list[int]
    count: int
    model: str


class DetokenizeAnswer(BaseModel):
    text: str
    model: str


async def generate_body(request: Request) -> GenerateRequest | QueueGenerateRequest:
    """The classic body, or the queue-style one when it has job_id/meta/content."""
    try:
        data = parse_body(await request.body())
    except ClientDisconnect:  # the client left before its body arrived: a 499, not a 500
        raise ClientDisconnected("The client closed the connection before sending its "
                                 "body.") from None
    except BodyNotJSON as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                       "msg": "JSON decode error",
                                       "ctx": {"error": exc.msg}}]) from None
    schema = QueueGenerateRequest if QueueGenerateRequest.matches(data) else GenerateRequest
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


GenerateBody = Annotated[GenerateRequest | QueueGenerateRequest, Depends(generate_body)]

def _queue_body_schema() -> dict[str, Any]:
    """QueueGenerateRequest inline (its QueueMeta is in the components via /chat_completion)."""
    schema = QueueGenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


_BODIES = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "oneOf": [{"$ref": "#/components/schemas/GenerateRequest"}, _queue_body_schema()]}}}}}


@router.post("/generate", openapi_extra=_BODIES, response_model=str | QueueAnswer,
             responses=errors(*GENERATION_ERRORS))
async def generate(body: GenerateBody, request: Request, response: Response,
                   pool: PoolDep, meter: MeterDep) -> Any:
    """Complete `prompt` and return the completion as a JSON string; the queue-style body
    `{job_id, meta, content}` gets `{"content": ...}`."""
    if isinstance(body, QueueGenerateRequest):
        return await _run_job(body, body.to_request(), request, response, pool, meter)
    scheduler = pool.get(body.model, meter.may_use)
    stream = await service.start_generation(scheduler, body.to_request(), meter)
    text, _ = await service.unless_disconnected(request, stream, service.collect(stream))
    return text


@router.post("/chat_completion", responses=errors(*GENERATION_ERRORS))
async def chat_completion(body: QueueChatRequest, request: Request, response: Response,
                          pool: PoolDep, meter: MeterDep) -> QueueAnswer:
    """Queue-style chat: `{job_id, meta, messages}` → `{"content": ...}`."""
    return await _run_job(body, body.to_request(), request, response, pool, meter)


async def _run_job(job: QueueJob, generation: GenerationRequest, request: Request,
                   response: Response, pool: PoolDep, meter: MeterDep) -> QueueAnswer:
    request.state.request_id = response.headers["X-Request-ID"] = job.job_id
    telemetry.rename(job.job_id)
    scheduler = pool.get(job.meta.model, meter.may_use)
    log.info("job %s (source %r, priority %s) on model %s", job.job_id, job.source,
             job.priority, scheduler.name)
    stream, clamped = await service.start_clamped(scheduler, generation, meter)
    if clamped is not None:
        log.warning("job %s: tokens_limit %s clamped to %s", job.job_id,
                    job.meta.tokens_limit, clamped)
        asked = job.meta.tokens_limit or "the default"
        response.headers["Warning"] = (f'299 llm-api "tokens_limit {asked} is more than the '
                                       f'context leaves; clamped to {clamped}"')
    text, _ = await service.unless_disconnected(request, stream, service.collect(stream))
    log.info("job %s done", job.job_id)
    return QueueAnswer(content=text)


@router.post("/agenerate", response_class=EventStream, responses={
    **event_stream("One `data:` event per piece of text."), **errors(*GENERATION_ERRORS)})
async def agenerate(body: GenerateRequest, pool: PoolDep, settings: SettingsDep,
                    meter: MeterDep) -> EventStream:
    """Stream the completion as server-sent events: one `data:` event per piece of text.

    Keep-alives are SSE comments; the stream ends by closing; a failure after the stream
    began arrives as an `event: error` frame carrying the JSON error body.
    """
    scheduler = pool.get(body.model, meter.may_use)
    stream = await service.start_generation(scheduler, body.to_request(), meter)
    return EventStream(_pieces(stream), ping=settings.server.sse_ping_seconds)


async def _pieces(stream: JobStream) -> AsyncIterator[bytes | dict[str, str]]:
    try:
        async for chunk in stream:
            if chunk.text:
                yield data_event(chunk.text)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error frame
        yield sse_error(as_domain_error(exc))
    finally:
        stream.close()


@router.post("/embeddings", responses=errors(*GENERATION_ERRORS))
async def embeddings(body: EmbeddingsRequest, pool: PoolDep, settings: SettingsDep,
                     meter: MeterDep) -> list[float] | list[list[float]]:
    """Embed one text (→ one vector) or a list of texts (→ one vector per text)."""
    texts = body.texts()
    limit = settings.server.max_embedding_inputs
    if len(texts) > limit:
        raise InvalidParams(f"'text' holds {len(texts)} texts; at most {limit} per request.",
                            param="text")
    vectors = await service.embed(pool.get(body.model, meter.may_use), texts, meter)
    return vectors[0] if isinstance(body.text, str) else vectors


@router.post("/tokenize", responses=errors(400, *MODEL_ERRORS, 500))
async def tokenize(body: TokenizeRequest, pool: PoolDep, meter: MeterDep) -> TokenizeAnswer:
    """Token ids of `text`, or of `messages` as the model's chat template renders them."""
    scheduler = pool.get(body.model, meter.may_use)
    meter.allow(scheduler.name)
    ids = await service.tokenize(scheduler, body.text, body.message_dicts(), body.add_special)
    return TokenizeAnswer(tokens=ids, count=len(ids), model=scheduler.name)


@router.post("/detokenize", responses=errors(400, *MODEL_ERRORS, 500))
async def detokenize(body: DetokenizeRequest, pool: PoolDep,
                     meter: MeterDep) -> DetokenizeAnswer:
    """The text of token ids."""
    scheduler = pool.get(body.model, meter.may_use)
    meter.allow(scheduler.name)
    return DetokenizeAnswer(text=await service.detokenize(scheduler, body.tokens),
                            model=scheduler.name)
