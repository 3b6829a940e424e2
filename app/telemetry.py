"""Request ids, the access line and the log format (`server.log_format`, `server.log_prompts`).

Every HTTP request gets an id: a valid incoming `X-Request-ID` (1 to 200 printable ASCII
characters without spaces; a queue-style request's job_id replaces it) or a new one. It is
returned in `X-Request-ID` and named on every log line of the request, the engine's and the
worker's too (`engine.logctx`). One access line
per request (`llm_api.access`) replaces uvicorn's: method, route, status, latency, key id,
model and tokens. Secrets, key prefixes and texts are never logged; prompts and completions
only with `server.log_prompts`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.logctx import MAX_REQUEST_ID, REQUEST_ID, RequestIdFilter

if TYPE_CHECKING:
    from app.metrics import Metrics

access_log = logging.getLogger("llm_api.access")
prompt_log = logging.getLogger("llm_api.prompts")

_VALID_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")


@dataclass
class RequestRecord:
    """What the access line says about one request; filled in as the request runs."""

    request_id: str
    method: str
    route: str
    started: float
    status: int = 0
    key_id: int | None = None
    model: str | None = None
    error: str | None = None  # the error code the client got, if any
    reason: str | None = None  # which limit refused it (a 429)
    prompt_tokens: int = 0
    completion_tokens: int = 0


RECORD: ContextVar[RequestRecord | None] = ContextVar("llm_api_request", default=None)


def current() -> RequestRecord | None:
    return RECORD.get()


def note_error(code: str | None, reason: str | None = None) -> None:
    """Remember the error the current request is answered with (access line, metrics);
    `reason`: the limit of a 429."""
    record = RECORD.get()
    if record is not None:
        record.error = code or "error"
        record.reason = reason


def note_key(key_id: int) -> None:
    """The current request was made with key `key_id` (its id only: never its secret)."""
    record = RECORD.get()
    if record is not None:
        record.key_id = key_id


def rename(request_id: str) -> None:
    """From here on the current request is `request_id` (a queue-style job_id)."""
    record = RECORD.get()
    if record is not None:
        record.request_id = request_id
    REQUEST_ID.set(request_id)


def printable(text: str, limit: int = 256) -> str:
    """`text` safe on one log line: control characters escaped (a path may hold a decoded
    %0A), bounded in length."""
    if text.isprintable() and len(text) <= limit:
        return text
    return text[:limit].encode("unicode_escape").decode("ascii")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is valid, else a new id."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _VALID_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class AccessLog:
    """Outermost ASGI middleware: the request id (context, response header) and, once the
    response is done, the access line."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id_of(scope["headers"]), printable(scope["method"]),
                               printable(scope["path"]), time.monotonic())
        scope.setdefault("state", {})["llm_api_record"] = record
        tokens = RECORD.set(record), REQUEST_ID.set(record.request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = message.get("headers", [])
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    message["headers"] = [*headers, (b"x-request-id",
                                                     record.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _log_access(record)
            if record.status == 429 and record.reason and self.metrics is not None:
                self.metrics.rejected(record.key_id, record.reason)
            RECORD.reset(tokens[0])
            REQUEST_ID.reset(tokens[1])


def _log_access(record: RequestRecord) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    latency = (time.monotonic() - record.started) * 1000
    status = record.status or 499  # no response started: the client left, or it failed
    fields = {"method": record.method, "route": record.route, "status": status,
              "latency_ms": round(latency, 1), "key_id": record.key_id, "model": record.model,
              "prompt_tokens": record.prompt_tokens,
              "completion_tokens": record.completion_tokens, "error": record.error}
    access_log.info("%s %s %d %.0f ms", record.method, record.route, status, latency,
                    extra={"fields": fields})


# -- formats ----------------------------------------------------------------------------------

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "fields",
                                                             "request_id", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, then the access
    fields or any `extra` given, and the exception's text."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(), "request_id": getattr(record, "request_id", None)}
        line.update(getattr(record, "fields", None) or {})
        for name, value in record.__dict__.items():
            if name not in _RESERVED and name not in line and not name.startswith("_"):
                line[name] = value if isinstance(value, int | float | str | bool) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [request id]: message key=value ...` (the access fields)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s%(kv)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        fields = getattr(record, "fields", None) or {}
        record.kv = "".join(f" {k}={v}" for k, v in fields.items()
                            if v is not None and k not in {"method", "route", "status",
                                                           "latency_ms"})
        return super().format(record)


def configure_logging(level: str, log_format: str = "text") -> None:
    """The process's one log handler (stderr) with the chosen format; uvicorn's loggers go
    through it too, and uvicorn's own access line is off (ours replaces it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    access.disabled = True


def log_prompt(enabled: bool, what: str, text: object) -> None:
    """`server.log_prompts`: a prompt or a completion, on its request's line."""
    if enabled:
        prompt_log.info("%s: %s", what, text)
