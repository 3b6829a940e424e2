"""The errors the engine side raises about a model's availability and a job's fate.

They are domain errors like those of `backends.errors`: `app/errors.py` maps each one to
an HTTP status and the common error body, once.
"""

from __future__ import annotations

import logging

from backends.errors import BackendFailure, LLMAPIError

log = logging.getLogger(__name__)


class ModelNotReady(LLMAPIError):
    retry_after = 5


class Overloaded(LLMAPIError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoWorkers(LLMAPIError):
    """A remote model with no live worker (503 with Retry-After)."""

    retry_after = 5


class EngineRestarted(LLMAPIError):
    """The worker process running the request died; the model is being restarted (503)."""

    retry_after = 2


class RequestTimeout(LLMAPIError):
    pass


class ClientDisconnected(LLMAPIError):
    pass


def as_domain_error(exc: BaseException) -> LLMAPIError:
    """Domain errors pass through; anything else is logged and hidden behind a generic one."""
    if isinstance(exc, LLMAPIError):
        return exc
    log.error("unexpected failure", exc_info=exc)
    return BackendFailure()
