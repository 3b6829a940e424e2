"""Per-request accounting: model check, rate limits, quota reservation, settlement, record.

A route gets its request's `Meter` from the router-level dependency (`app.auth.deps`) and
hands it to the service function that does the work (`app.service.start_generation`,
`app.service.embed`). Admission reserves prompt + max_tokens tokens; settlement turns the
reservation into the real count when the request ends, however it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from anyio import to_thread

from app.auth.keys import now
from app.auth.limits import Grant, Limiter
from app.auth.schemas import KeyInfo
from app.auth.store import KeyStore, Usage
from app.errors import KeyRevoked, ModelNotAllowed, QuotaExceeded, spec_for
from backends.base import Chunk
from backends.errors import LLMAPIError

log = logging.getLogger(__name__)


@dataclass
class Accounts:
    """The server's key store and rate-limit counters (`app.state.accounts`)."""

    store: KeyStore
    limiter: Limiter
    enabled: bool


def status_of(exc: BaseException) -> int:
    """The HTTP status a request that ended with `exc` gets."""
    if isinstance(exc, LLMAPIError):
        return spec_for(exc).status
    if isinstance(exc, Exception):
        return 500
    return 499  # cancelled: the client went away or the server stopped


class Meter:
    """One request's accounting. `settle` is idempotent and runs shielded from cancellation."""

    def __init__(self, accounts: Accounts, key: KeyInfo | None, endpoint: str) -> None:
        self.accounts = accounts
        self.key = key
        self.endpoint = endpoint
        self.model: str | None = None
        self.words = 0
        self.reserved = 0
        self.prompt_tokens = 0
        self.completion_tokens: int | None = None
        self.pieces = 0
        self.running = False  # the backend accepted the work
        self._grant = Grant()
        self._admitted = False
        self._settled = False
        self._started = time.monotonic()

    @property
    def needs_token_count(self) -> bool:
        """Whether admission must know the tokens up front (token quota or tpm)."""
        return self.key is not None and (self.key.max_tokens is not None
                                         or self.key.tpm is not None)

    def allow(self, model: str) -> None:
        """403 unless the key may use `model`. Routes that use a model without generating
        (e.g. tokenizing) call this alone; nothing is counted or recorded for them."""
        allowed = self.key.allowed_models if self.key is not None else []
        if allowed and model not in allowed:
            raise ModelNotAllowed(f"This API key may not use model '{model}'; it may use: "
                                  f"{', '.join(allowed)}.", param="model")

    async def admit(self, model: str, words: int,
                    count_tokens: Callable[[], Awaitable[int]] | None = None) -> None:
        """Check the model, the rate limits and the quotas; count and reserve on success.

        `count_tokens` gives prompt + max_tokens; it is awaited only when a limit needs it.
        A rejected request consumes nothing (the dependency records it as it leaves).
        """
        self.model = model  # from here on, the request is recorded when it ends
        self.allow(model)
        self.words = words
        if self.key is None:
            return
        tokens = await count_tokens() if count_tokens and self.needs_token_count else 0
        self._grant = await self.accounts.limiter.acquire(self.key, tokens)
        if not await to_thread.run_sync(self.accounts.store.reserve, self.key.id, tokens):
            await self.accounts.limiter.finish(self._grant, 0, rollback=True)
            self._grant = Grant()
            raise await self._quota_error(tokens)
        self.reserved, self._admitted = tokens, True

    async def refund(self) -> None:
        """Give an admission back whole when the backend refused the work (e.g. a context
        overflow): the request and its tokens count nothing. The meter may admit again."""
        if not self._admitted or self.key is None:
            return
        self._admitted = False
        with anyio.CancelScope(shield=True):
            await to_thread.run_sync(self.accounts.store.settle, self.key.id, self.reserved, 0,
                                     True, None)
            await self.accounts.limiter.finish(self._grant, 0, rollback=True)
        self.reserved, self._grant = 0, Grant()

    async def _quota_error(self, tokens: int) -> LLMAPIError:
        assert self.key is not None
        key = await to_thread.run_sync(self.accounts.store.get, self.key.id)
        if key.revoked_at is not None:
            return KeyRevoked(f"This API key was revoked on {key.revoked_at:%Y-%m-%d %H:%M} "
                              "UTC.")
        if key.max_requests is not None and key.used_requests >= key.max_requests:
            return QuotaExceeded(
                f"Request quota used up: {key.used_requests} of {key.max_requests} requests.",
                headers={"X-RateLimit-Limit": str(key.max_requests),
                         "X-RateLimit-Remaining": "0"})
        limit = key.max_tokens or 0
        left = max(0, limit - key.used_tokens - key.reserved_tokens)
        return QuotaExceeded(
            f"Token quota exceeded: {key.used_tokens} of {limit} tokens used and "
            f"{key.reserved_tokens} reserved by running requests; this request needs {tokens} "
            f"(prompt + max_tokens), {left} are left.",
            retry_after=1 if key.reserved_tokens else None,
            headers={"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(left)})

    def observe(self, chunk: Chunk) -> None:
        """Note a chunk of the stream: token counts when the backend reports them."""
        if chunk.prompt_tokens is not None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self.completion_tokens = chunk.completion_tokens
        elif chunk.text:
            self.pieces += 1

    @property
    def used_tokens(self) -> int:
        if not self.running:
            return 0
        completion = self.pieces if self.completion_tokens is None else self.completion_tokens
        return self.prompt_tokens + completion

    async def settle(self, status: int) -> None:
        """Settle the reservation to the real count and record the request (once)."""
        if self._settled or self.model is None:
            return
        self._settled = True
        with anyio.CancelScope(shield=True):
            try:
                await self._settle(status)
            except Exception:  # noqa: BLE001 - accounting must never break a response
                log.exception("could not settle the usage of a request")

    async def _settle(self, status: int) -> None:
        used = self.used_tokens
        usage = Usage(
            key_id=self.key.id if self.key else None, model=self.model or "",
            endpoint=self.endpoint, status=status, prompt_tokens=self.prompt_tokens
            if self.running else 0, completion_tokens=used - self.prompt_tokens
            if self.running else 0, prompt_words=self.words,
            latency_ms=(time.monotonic() - self._started) * 1000, created_at=now())
        key_id = self.key.id if self.key is not None and self._admitted else None
        await to_thread.run_sync(self.accounts.store.settle, key_id, self.reserved, used,
                                 not self.running, usage)
        if self._admitted:
            await self.accounts.limiter.finish(self._grant, used)
