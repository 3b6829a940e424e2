"""Exceptions raised for the server's error answers.

Every error the server sends has the body `{"error": {"message", "type", "param", "code"}}`;
it becomes one of the classes below, chosen by HTTP status (or, for an error that arrives
inside a stream, by the error's `type`). The server's message is kept verbatim.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class LLMAPIError(Exception):
    """Base class of every error this package raises for a server answer."""

    def __init__(self, message: str, *, status_code: int | None = None,
                 type: str | None = None, code: str | None = None,  # noqa: A002
                 param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"{self.status_code} " if self.status_code is not None else ""
        code = f" ({self.code})" if self.code else ""
        return f"{where}{type(self).__name__}{code}: {self.message}"


class APIConnectionError(LLMAPIError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(LLMAPIError):
    """The request took longer than `timeout` (client side), or the server's 504."""


class BadRequestError(LLMAPIError):
    """400/413/422: the request was invalid; the message says what is allowed."""


class AuthenticationError(LLMAPIError):
    """401: the API key is missing, unknown, expired, not yet valid or revoked."""


class PermissionDeniedError(LLMAPIError):
    """403: the key may not use this model or route."""


class NotFoundError(LLMAPIError):
    """404: unknown model or route."""


class RateLimitError(LLMAPIError):
    """429: a quota is exhausted or the rate limit was hit; see `retry_after` (seconds)."""


class OverloadedError(LLMAPIError):
    """503: the model's queue is full or it is still loading; see `retry_after` (seconds)."""


class InternalServerError(LLMAPIError):
    """5xx: the server failed; the cause is in the server's log."""


_BY_STATUS: dict[int, type[LLMAPIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 413: BadRequestError, 422: BadRequestError, 429: RateLimitError,
    503: OverloadedError, 504: APITimeoutError,
}

_BY_TYPE: dict[str, type[LLMAPIError]] = {
    "invalid_request_error": BadRequestError, "authentication_error": AuthenticationError,
    "permission_error": PermissionDeniedError, "rate_limit_error": RateLimitError,
    "overloaded_error": OverloadedError, "timeout_error": APITimeoutError,
    "server_error": InternalServerError,
}


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: not sent by llm-api


def _error_fields(body: Any) -> dict[str, Any]:
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def error_from_response(response: httpx.Response) -> LLMAPIError:
    """The exception for a non-2xx answer (its body must have been read)."""
    try:
        fields = _error_fields(response.json())
    except ValueError:
        fields = {}
    status = response.status_code
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else LLMAPIError)
    message = fields.get("message") or response.text[:500] or response.reason_phrase
    return cls(str(message), status_code=status, type=fields.get("type"),
               code=fields.get("code"), param=fields.get("param"),
               retry_after=_retry_after(response.headers))


def error_from_event(data: str) -> LLMAPIError:
    """The exception for an `event: error` frame that ended a stream."""
    try:
        fields = _error_fields(json.loads(data))
    except ValueError:
        fields = {}
    cls = _BY_TYPE.get(str(fields.get("type")), LLMAPIError)
    return cls(str(fields.get("message") or data or "the stream failed"),
               type=fields.get("type"), code=fields.get("code"), param=fields.get("param"))
