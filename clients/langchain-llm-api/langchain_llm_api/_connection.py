"""What every class shares: where the server is, the API key, timeouts, retries, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from time import sleep
from typing import Any

import httpx
from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, Field, SecretStr

from langchain_llm_api.errors import (
    APIConnectionError,
    APITimeoutError,
    LLMAPIError,
    OverloadedError,
    error_from_event,
    error_from_response,
)
from langchain_llm_api.sse import ServerSentEvent, aiter_events, iter_events

DEFAULT_BASE_URL = "http://localhost:8000"
MAX_RETRY_WAIT = 30.0


class Connection(BaseModel):
    """Connection fields, mixed into the LLM, chat model and embeddings classes."""

    base_url: str = Field(default_factory=from_env("LLM_API_BASE_URL",
                                                   default=DEFAULT_BASE_URL))
    """Server address (also from `LLM_API_BASE_URL`)."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("LLM_API_KEY",
                                                                      default=None))
    """Sent as `Authorization: Bearer <key>` (also from `LLM_API_KEY`)."""
    timeout: float | None = 600.0
    """Seconds for the whole request; None waits forever."""
    max_retries: int = Field(2, ge=0)
    """Retries of refused connections and of 503 answers (queue full, model loading)."""

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key is not None and self.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        return headers

    def _client_options(self) -> dict[str, Any]:
        return {"base_url": self.base_url.rstrip("/"), "headers": self._headers(),
                "timeout": httpx.Timeout(self.timeout)}

    def _retry_wait(self, error: LLMAPIError, attempt: int) -> float | None:
        """Seconds to wait before another attempt, or None to give up."""
        if not isinstance(error, OverloadedError) or attempt >= self.max_retries:
            return None
        return min(error.retry_after if error.retry_after is not None else 2.0 ** attempt,
                   MAX_RETRY_WAIT)

    # -- sync -----------------------------------------------------------------------------

    @contextmanager
    def _open(self, path: str, body: dict[str, Any] | None,
              method: str = "POST") -> Iterator[httpx.Response]:
        """POST `body` (or GET); yields the response (2xx only, body not yet read)."""
        transport = httpx.HTTPTransport(retries=self.max_retries)
        with _translated(), httpx.Client(transport=transport,
                                         **self._client_options()) as client:
            for attempt in range(self.max_retries + 1):
                request = client.build_request(method, path, json=body)
                response = client.send(request, stream=True)
                if response.is_success:
                    try:
                        yield response
                    finally:
                        response.close()
                    return
                response.read()
                response.close()
                error = error_from_response(response)
                wait = self._retry_wait(error, attempt)
                if wait is None:
                    raise error
                sleep(wait)

    def _post(self, path: str, body: dict[str, Any] | None, method: str = "POST") -> Any:
        with self._open(path, body, method) as response:
            response.read()
            return response.json()

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[ServerSentEvent]:
        """The stream's events; an `error` event raises its exception."""
        with self._open(path, body) as response, _translated():
            for event in iter_events(response.iter_lines()):
                if event.event == "error":
                    raise error_from_event(event.data)
                yield event

    # -- async ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _aopen(self, path: str, body: dict[str, Any] | None,
                     method: str = "POST") -> AsyncIterator[httpx.Response]:
        transport = httpx.AsyncHTTPTransport(retries=self.max_retries)
        with _translated():
            async with httpx.AsyncClient(transport=transport,
                                         **self._client_options()) as client:
                for attempt in range(self.max_retries + 1):
                    request = client.build_request(method, path, json=body)
                    response = await client.send(request, stream=True)
                    if response.is_success:
                        try:
                            yield response
                        finally:
                            await response.aclose()
                        return
                    await response.aread()
                    await response.aclose()
                    error = error_from_response(response)
                    wait = self._retry_wait(error, attempt)
                    if wait is None:
                        raise error
                    await asyncio.sleep(wait)

    async def _apost(self, path: str, body: dict[str, Any] | None,
                     method: str = "POST") -> Any:
        async with self._aopen(path, body, method) as response:
            await response.aread()
            return response.json()

    async def _aevents(self, path: str, body: dict[str, Any]) -> AsyncIterator[ServerSentEvent]:
        async with self._aopen(path, body) as response:
            with _translated():
                async for event in aiter_events(response.aiter_lines()):
                    if event.event == "error":
                        raise error_from_event(event.data)
                    yield event


@contextmanager
def _translated() -> Iterator[None]:
    """httpx's transport errors become this package's exceptions."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"no answer within the timeout: {exc!r}") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(f"could not talk to the server: {exc!r}") from exc
