"""The classic API: /generate, /agenerate, /embeddings."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from app import service
from app.auth.deps import MeterDep
from app.deps import PoolDep, SettingsDep
from app.errors import InvalidParams, as_domain_error, sse_error
from app.scheduler import JobStream
from app.schemas import EmbeddingsRequest, GenerateRequest

router = APIRouter(tags=["native"])


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, pool: PoolDep,
                   meter: MeterDep) -> str:
    """Complete `prompt` and return the completion as a JSON string."""
    stream = await service.start_generation(pool.get(body.model), body.to_request(), meter)
    text, _ = await service.unless_disconnected(request, stream, service.collect(stream))
    return text


@router.post("/agenerate", response_class=EventSourceResponse)
async def agenerate(body: GenerateRequest, pool: PoolDep, settings: SettingsDep,
                    meter: MeterDep) -> EventSourceResponse:
    """Stream the completion as server-sent events: one `data:` event per piece of text.

    Keep-alives are SSE comments; the stream ends by closing; a failure after the stream
    began arrives as an `event: error` frame carrying the JSON error body.
    """
    stream = await service.start_generation(pool.get(body.model), body.to_request(), meter)
    return EventSourceResponse(_pieces(stream), sep="\n",
                               ping=settings.server.sse_ping_seconds)


async def _pieces(stream: JobStream) -> AsyncIterator[dict[str, str]]:
    try:
        async for chunk in stream:
            if chunk.text:
                yield {"data": chunk.text}
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error frame
        yield sse_error(as_domain_error(exc))
    finally:
        stream.close()


@router.post("/embeddings")
async def embeddings(body: EmbeddingsRequest, pool: PoolDep, settings: SettingsDep,
                     meter: MeterDep) -> list[float] | list[list[float]]:
    """Embed one text (→ one vector) or a list of texts (→ one vector per text)."""
    texts = body.texts()
    limit = settings.server.max_embedding_inputs
    if len(texts) > limit:
        raise InvalidParams(f"'text' holds {len(texts)} texts; at most {limit} per request.",
                            param="text")
    vectors = await service.embed(pool.get(body.model), texts, meter)
    return vectors[0] if isinstance(body.text, str) else vectors
