"""The one error table: domain exceptions → HTTP status + `{"error": {...}}` and SSE frames."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.telemetry import note_error
from backends.errors import (
    BackendFailure,
    CapabilityNotSupported,
    ContextLengthExceeded,
    InvalidRequest,
    LLMAPIError,
    ModelLoadError,
)
from engine.errors import ClientDisconnected as ClientDisconnected  # the engine's, mapped here
from engine.errors import EngineRestarted as EngineRestarted
from engine.errors import ModelNotReady as ModelNotReady
from engine.errors import NoWorkers as NoWorkers
from engine.errors import Overloaded as Overloaded
from engine.errors import RequestTimeout as RequestTimeout
from engine.errors import as_domain_error as as_domain_error

log = logging.getLogger(__name__)


class ModelNotFound(LLMAPIError):
    pass


class UnsupportedParameter(InvalidRequest):
    """A known parameter with a value this server cannot honour (400)."""


class InvalidParams(LLMAPIError):
    """A request field is out of range or unknown (422)."""


class PayloadTooLarge(LLMAPIError):
    pass


class Unauthorized(LLMAPIError):
    """No valid API key (401)."""

    headers = {"WWW-Authenticate": "Bearer"}


class MissingKey(Unauthorized):
    pass


class KeyNotValidNow(Unauthorized):
    """Expired, or not valid yet."""


class KeyRevoked(Unauthorized):
    pass


class Forbidden(LLMAPIError):
    pass


class ModelNotAllowed(Forbidden):
    pass


class AdminOnly(Forbidden):
    pass


class QuotaExceeded(LLMAPIError):
    """A key's lifetime quota is used up (429), with X-RateLimit-* headers."""

    def __init__(self, message: str, retry_after: int | None = None,
                 headers: dict[str, str] | None = None, reason: str = "quota") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers or {}
        self.reason = reason  # which limit (metrics): requests, tokens, rpm, tpm, max_parallel


class RateLimited(QuotaExceeded):
    """Over a key's rpm, tpm or max_parallel (429 with Retry-After)."""


class TooManyFailedAuthentications(RateLimited):
    """A client address over auth.failed_auth_limit (429 with Retry-After)."""


class ServerShuttingDown(LLMAPIError):
    """The server is draining for a shutdown (503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BodyReadTimeout(LLMAPIError):
    """The request body did not arrive within server.body_read_timeout (408)."""

    headers = {"Connection": "close"}  # a client that slow is not worth keeping


class KeyNotFound(LLMAPIError):
    pass


class StoreUnavailable(LLMAPIError):
    """The key/usage database or the Redis counters cannot be reached (503)."""

    retry_after = 5


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str
    code: str | None = None


# Most specific first: the first entry the exception is an instance of wins.
ERROR_TABLE: tuple[tuple[type[LLMAPIError], ErrorSpec], ...] = (
    (ContextLengthExceeded, ErrorSpec(400, "invalid_request_error", "context_length_exceeded")),
    (CapabilityNotSupported, ErrorSpec(400, "invalid_request_error", "unsupported_capability")),
    (UnsupportedParameter, ErrorSpec(400, "invalid_request_error", "unsupported_parameter")),
    (InvalidRequest, ErrorSpec(400, "invalid_request_error", "invalid_request")),
    (InvalidParams, ErrorSpec(422, "invalid_request_error", "invalid_parameter")),
    (MissingKey, ErrorSpec(401, "authentication_error", "missing_api_key")),
    (KeyNotValidNow, ErrorSpec(401, "authentication_error", "api_key_not_valid_now")),
    (KeyRevoked, ErrorSpec(401, "authentication_error", "api_key_revoked")),
    (Unauthorized, ErrorSpec(401, "authentication_error", "invalid_api_key")),
    (ModelNotAllowed, ErrorSpec(403, "permission_error", "model_not_allowed")),
    (AdminOnly, ErrorSpec(403, "permission_error", "admin_required")),
    (Forbidden, ErrorSpec(403, "permission_error", "forbidden")),
    (ModelNotFound, ErrorSpec(404, "invalid_request_error", "model_not_found")),
    (KeyNotFound, ErrorSpec(404, "invalid_request_error", "key_not_found")),
    (BodyReadTimeout, ErrorSpec(408, "invalid_request_error", "request_body_timeout")),
    (PayloadTooLarge, ErrorSpec(413, "invalid_request_error", "payload_too_large")),
    (TooManyFailedAuthentications, ErrorSpec(429, "rate_limit_error",
                                             "too_many_failed_authentications")),
    (RateLimited, ErrorSpec(429, "rate_limit_error", "rate_limit_exceeded")),
    (QuotaExceeded, ErrorSpec(429, "rate_limit_error", "quota_exceeded")),
    (Overloaded, ErrorSpec(503, "overloaded_error", "queue_full")),
    (ModelNotReady, ErrorSpec(503, "overloaded_error", "model_not_ready")),
    (NoWorkers, ErrorSpec(503, "overloaded_error", "no_workers")),
    (EngineRestarted, ErrorSpec(503, "server_error", "engine_restarted")),
    (ServerShuttingDown, ErrorSpec(503, "server_error", "server_shutting_down")),
    (StoreUnavailable, ErrorSpec(503, "server_error", "store_unavailable")),
    (ClientDisconnected, ErrorSpec(499, "invalid_request_error", "client_closed_request")),
    (RequestTimeout, ErrorSpec(504, "timeout_error", "request_timeout")),
    (ModelLoadError, ErrorSpec(500, "server_error", "model_load_failed")),
    (BackendFailure, ErrorSpec(500, "server_error", "backend_failure")),
    (LLMAPIError, ErrorSpec(500, "server_error", None)),
)


def spec_for(exc: LLMAPIError) -> ErrorSpec:
    return next(spec for cls, spec in ERROR_TABLE if isinstance(exc, cls))


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong, and what is allowed.")
    type: str = Field(description="The class of error, e.g. invalid_request_error.")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="The error's code, e.g. context_length_exceeded.")


class ErrorBody(BaseModel):
    """Every error response's body (documented in the OpenAPI schema by app.api.docs)."""

    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def body_for(exc: LLMAPIError) -> dict[str, Any]:
    spec = spec_for(exc)
    return error_body(exc.message, spec.type, exc.param, spec.code)


def response_for(exc: LLMAPIError) -> JSONResponse:
    _note(exc)
    headers: dict[str, str] = dict(getattr(exc, "headers", {}))
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(body_for(exc), status_code=spec_for(exc).status, headers=headers)


def _note(exc: LLMAPIError) -> None:
    note_error(spec_for(exc).code, getattr(exc, "reason", None))


def sse_error(exc: LLMAPIError) -> dict[str, str]:
    """The frame that ends a stream which fails after it began."""
    _note(exc)
    return {"event": "error", "data": json.dumps(body_for(exc))}


def sse_error_data(exc: LLMAPIError) -> dict[str, str]:
    """OpenAI's streaming style: a plain `data:` event with the error body (the SDK raises
    APIError on it); the stream then ends without `[DONE]`."""
    _note(exc)
    return {"data": json.dumps(body_for(exc))}


def _validation_message(err: dict[str, Any]) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "json_invalid":  # the reason is app.json_body's, for the client
        reason = (err.get("ctx") or {}).get("error")
        return f"The request body is not valid JSON: {reason}." if reason else \
            "The request body is not valid JSON.", None
    if err.get("type") == "missing":
        return f"'{param}' is required.", param
    return (f"'{param}': {msg}" if param else msg), param


_NOT_AN_OBJECT = frozenset({"model_attributes_type", "model_type", "dict_type"})


def _not_an_object(request: Request) -> str:
    """The body is not a JSON object: often `curl -d` without a JSON Content-Type, whose
    body FastAPI does not parse at all, so say which Content-Type arrived."""
    sent = request.headers.get("content-type", "")
    if "json" in sent.lower():
        return "The request body must be a JSON object ({...})."
    how = f"was sent as '{sent[:100]}'" if sent else "had no Content-Type header"
    return (f"The request body must be a JSON object sent with 'Content-Type: "
            f"application/json'; this one {how}.")


def effective_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """The app's routes one by one, with the prefix and dependencies of the router that
    included them (FastAPI >= 0.160 keeps included routers as one entry of `app.routes`)."""
    contexts: Callable[[Iterable[Any]], Iterator[Any]] = getattr(
        fastapi.routing, "iter_route_contexts", iter)
    return contexts(list(routes))


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's own 405 lists only the
    methods of the first route whose path matched (GET /admin/keys and POST /admin/keys are
    two routes)."""
    methods: set[str] = set()
    for route in effective_routes(request.app.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LLMAPIError)
    async def _domain(request: Request, exc: LLMAPIError) -> JSONResponse:
        if spec_for(exc).status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        response = response_for(exc)
        request_id = getattr(request.state, "request_id", None)
        if request_id is not None:  # a route named the request (e.g. a queue job_id)
            response.headers["X-Request-ID"] = request_id
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(tuple(e.get("loc", ())) in ((), ("body",)) and e.get("type") in _NOT_AN_OBJECT
               for e in errors):
            return response_for(InvalidParams(_not_an_object(request)))
        messages, params = zip(*(_validation_message(e) for e in errors), strict=True)
        return response_for(InvalidParams("; ".join(messages), param=params[0]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: "No such route."}.get(exc.status_code, str(exc.detail))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed on this route; allowed: " \
                f"{', '.join(allowed)}."
        note_error(kind)
        return JSONResponse(error_body(message, "invalid_request_error", None, kind),
                            status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return response_for(as_domain_error(exc))
