"""The request a log line is about, on both sides of the process boundary.

The API sets `REQUEST_ID` for the task serving an HTTP request (`app.telemetry`); a job made
there carries it to wherever its model runs (`Job.request_id`), and engine threads, which
serve many requests at once, name it on their lines (`about`, or `extra={"request_id": ...}`).
`RequestIdFilter` on a handler gives every record a `request_id` attribute (None when the
line is about no request), so formatters can rely on it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.jobs import Job

log = logging.getLogger("engine.jobs")

#: Longest request id kept (an incoming X-Request-ID is refused past it).
MAX_REQUEST_ID = 200

REQUEST_ID: ContextVar[str | None] = ContextVar("llm_api_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` from the context unless the call named one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


@contextlib.contextmanager
def about(request_id: str | None) -> Iterator[None]:
    """Log lines made inside are about request `request_id`."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def log_outcome(job: Job, outcome: str, started: float) -> None:
    """A debug line per generation or embedding as it ends, with its request id."""
    if log.isEnabledFor(logging.DEBUG) and (job.request is not None or job.texts is not None):
        log.debug("%s %s after %.3f s", "generation" if job.request is not None else
                  "embedding", outcome, time.monotonic() - started,
                  extra={"request_id": job.request_id})
