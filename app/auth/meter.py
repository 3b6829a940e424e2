"""Per-request accounting: model check, rate limits, quota reservation, settlement, record.

A route gets its request's `Meter` from the router-level dependency (`app.auth.deps`) and
hands it to the service function that does the work (`app.service.start_generation`,
`app.service.embed`). Each generation or embedding call is one `Ticket`: admission reserves
prompt + max_tokens tokens, settlement turns the reservation into the real count when the
work ends, however it ends, and records it. (A request with `n` choices holds n tickets.)
The HTTP request itself was counted against rpm once, when it arrived (`app.auth.deps`).

Admission takes two things, a limiter slot (max_parallel, tpm) and a store reservation
(request and token quotas), and settlement gives both back: each of these runs to its end
even when the request is cancelled halfway (`run_to_end`), or a slot would stay taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from anyio import to_thread

from app import telemetry
from app.auth.keys import now
from app.auth.limits import Grant, Limiter
from app.auth.schemas import KeyInfo
from app.auth.store import KeyStore, Usage
from app.errors import KeyRevoked, ModelNotAllowed, QuotaExceeded, spec_for
from app.metrics import Metrics, StreamClock
from backends.base import Chunk
from backends.errors import LLMAPIError

log = logging.getLogger(__name__)

TokenCount = Callable[[], Awaitable[int]]
T = TypeVar("T")


@dataclass
class Accounts:
    """The server's key store and rate-limit counters (`app.state.accounts`)."""

    store: KeyStore
    limiter: Limiter
    enabled: bool


async def run_to_end(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even if the caller is cancelled meanwhile, then let the
    cancellation through. An anyio shield alone is not enough: it defers cancel scopes (a
    client that left) but not a native `Task.cancel()` (a server cutting requests short)."""
    task = asyncio.ensure_future(work)  # its own task: nothing cancels it
    interrupted: BaseException | None = None
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError as exc:  # native: remembered, raised after
                interrupted = exc
    if interrupted is not None:
        raise interrupted
    return task.result()


def status_of(exc: BaseException) -> int:
    """The HTTP status a request that ended with `exc` gets."""
    if isinstance(exc, LLMAPIError):
        return spec_for(exc).status
    if isinstance(exc, Exception):
        return 500
    return 499  # cancelled: the client went away or the server stopped


class Meter:
    """One HTTP request's accounting: the caller's key and the tickets of its work."""

    def __init__(self, accounts: Accounts, key: KeyInfo | None, endpoint: str,
                 metrics: Metrics | None = None, log_prompts: bool = False,
                 charge_cached: bool = True, cache_scope: str = "key") -> None:
        self.accounts = accounts
        self.charge_cached = charge_cached  # auth.charge_cached_prompt_tokens
        # auth.prefix_cache_scope: the engines share cached prefixes within one scope
        self.cache_scope = f"key:{key.id}" if key is not None and cache_scope == "key" \
            else None
        self.key = key
        self.endpoint = endpoint
        self.metrics = metrics
        self.log_prompts = log_prompts  # server.log_prompts
        self.tickets: list[Ticket] = []
        self.record = telemetry.current()  # the access line's

    def may_use(self, model: str) -> bool:
        allowed = self.key.allowed_models if self.key is not None else []
        return not allowed or model in allowed

    def allow(self, model: str) -> None:
        """403 unless the key may use `model`. Routes that use a model without generating
        (e.g. tokenizing) call this alone; nothing is counted or recorded for them."""
        if not self.may_use(model):
            assert self.key is not None
            raise ModelNotAllowed(f"This API key may not use model '{model}'; it may use: "
                                  f"{', '.join(self.key.allowed_models)}.", param="model")

    async def admit(self, model: str, words: int, count_tokens: TokenCount | None = None
                    ) -> Ticket:
        """Check the model, the rate limits and the quotas; count and reserve on success.

        `count_tokens` gives prompt + max_tokens; it is awaited only when a limit needs it.
        A rejected ticket consumes nothing (`close` records it as the request leaves).
        """
        ticket = Ticket(self, model, words)
        self.tickets.append(ticket)
        self.allow(model)
        await ticket.admit(count_tokens)
        return ticket

    @property
    def needs_token_count(self) -> bool:
        """Whether admission must know the tokens up front (token quota or tpm)."""
        return self.key is not None and (self.key.max_tokens is not None
                                         or self.key.tpm is not None)

    async def close(self, error: BaseException | None) -> None:
        """Settle what the work left open as the request leaves: the last ticket gets the
        request's error status; a stream that never ran is a 499; a ticket that was refunded
        and retried is dropped."""
        if error is not None and self.tickets:
            await self.tickets[-1].settle(status_of(error))
        for ticket in self.tickets:
            if not ticket.refunded:
                await ticket.settle(499)


class Ticket:
    """One generation's or embedding's accounting; `settle` is idempotent and shielded."""

    def __init__(self, meter: Meter, model: str, words: int) -> None:
        self.meter = meter
        self.model = model
        self.words = words
        self.reserved = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens: reused KV cells
        self.completion_tokens: int | None = None
        self.pieces = 0
        self.running = False  # the backend accepted the work
        self.refunded = False
        self._grant = Grant()
        self._lease = ""  # the store lease the reservation is held under
        self._admitted = False
        self._settled = False
        self._started = time.monotonic()
        metrics = meter.metrics
        self.clock = StreamClock(metrics, model, self._started) if metrics else None

    async def admit(self, count_tokens: TokenCount | None) -> None:
        key = self.meter.key
        if key is None:
            return
        needed = count_tokens is not None and self.meter.needs_token_count
        tokens = await count_tokens() if count_tokens is not None and needed else 0
        if not await run_to_end(self._take(key, tokens)):
            raise await self._quota_error(key, tokens)

    async def _take(self, key: KeyInfo, tokens: int) -> bool:
        """Take a limiter slot, then the store's reservation; all or nothing (False: the
        quotas refused). The request was counted against rpm as it arrived."""
        accounts = self.meter.accounts
        grant = await accounts.limiter.acquire(key, tokens, count_request=False)
        try:
            lease = await to_thread.run_sync(accounts.store.reserve, key.id, tokens)
        except BaseException:
            await accounts.limiter.finish(grant, 0, rollback=True)
            raise
        if lease is None:
            await accounts.limiter.finish(grant, 0, rollback=True)
            return False
        self._grant, self._lease, self.reserved, self._admitted = grant, lease, tokens, True
        return True

    async def refund(self) -> None:
        """Give the tokens and the quota back when the backend refused the work (e.g. a
        context overflow); the request keeps its rpm count (it cost the server its work)."""
        self.refunded = True
        if not self._admitted or self.meter.key is None:
            return
        self._admitted = False
        await run_to_end(self._give_back(self.meter.key.id))

    async def _give_back(self, key_id: int) -> None:
        accounts = self.meter.accounts
        await to_thread.run_sync(accounts.store.settle, key_id, self._lease, self.reserved, 0,
                                 True, None)
        await accounts.limiter.finish(self._grant, 0, rollback=True)
        self.reserved, self._grant = 0, Grant()

    async def _quota_error(self, stale: KeyInfo, tokens: int) -> LLMAPIError:
        key = await to_thread.run_sync(self.meter.accounts.store.get, stale.id)
        if key.revoked_at is not None:
            return KeyRevoked(f"This API key was revoked on {key.revoked_at:%Y-%m-%d %H:%M} "
                              "UTC.")
        if key.max_requests is not None and key.used_requests >= key.max_requests:
            return QuotaExceeded(
                f"Request quota used up: {key.used_requests} of {key.max_requests} requests.",
                headers={"X-RateLimit-Limit": str(key.max_requests),
                         "X-RateLimit-Remaining": "0"}, reason="requests")
        limit = key.max_tokens or 0
        left = max(0, limit - key.used_tokens - key.reserved_tokens)
        return QuotaExceeded(
            f"Token quota exceeded: {key.used_tokens} of {limit} tokens used and "
            f"{key.reserved_tokens} reserved by running requests; this request needs {tokens} "
            f"(prompt + max_tokens), {left} are left.",
            retry_after=1 if key.reserved_tokens else None,
            headers={"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(left)},
            reason="tokens")

    def observe(self, chunk: Chunk) -> None:
        """Note a chunk of the stream: token counts when the backend reports them."""
        if chunk.prompt_tokens is not None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.cached_tokens is not None:
            self.cached_tokens = chunk.cached_tokens
        if chunk.completion_tokens is not None:
            self.completion_tokens = chunk.completion_tokens
        elif chunk.text:
            self.pieces += 1
        if chunk.text and self.clock is not None:
            self.clock.piece()

    @property
    def charged_prompt_tokens(self) -> int:
        """The prompt tokens this work is charged: all of them, or (with
        auth.charge_cached_prompt_tokens false) those that were computed."""
        if not self.running:
            return 0
        if self.meter.charge_cached:
            return self.prompt_tokens
        return max(0, self.prompt_tokens - self.cached_tokens)

    @property
    def used_tokens(self) -> int:
        if not self.running:
            return 0
        completion = self.pieces if self.completion_tokens is None else self.completion_tokens
        return self.charged_prompt_tokens + completion

    async def settle(self, status: int) -> None:
        """Settle the reservation to the real count and record the work (once)."""
        if self._settled:
            return
        self._settled = True
        try:
            await run_to_end(self._settle(status))
        except Exception:  # noqa: BLE001 - accounting must never break a response
            log.exception("could not settle the usage of a request")

    async def _settle(self, status: int) -> None:
        key, accounts = self.meter.key, self.meter.accounts
        used = self.used_tokens
        prompt = self.charged_prompt_tokens
        usage = Usage(
            key_id=key.id if key else None, model=self.model, endpoint=self.meter.endpoint,
            status=status, prompt_tokens=prompt, completion_tokens=used - prompt,
            prompt_words=self.words, latency_ms=(time.monotonic() - self._started) * 1000,
            created_at=now())
        key_id = key.id if key is not None and self._admitted else None
        self._report(usage)
        await to_thread.run_sync(accounts.store.settle, key_id, self._lease, self.reserved,
                                 used, not self.running, usage)
        if self._admitted:
            await accounts.limiter.finish(self._grant, used)

    def _report(self, usage: Usage) -> None:
        """Tell the access line and the metrics what this work was."""
        record, metrics = self.meter.record, self.meter.metrics
        if record is not None:
            record.model = self.model
            record.prompt_tokens += usage.prompt_tokens
            record.completion_tokens += usage.completion_tokens
        if metrics is not None:
            metrics.settled(self.model, self.meter.endpoint, usage.status, usage.key_id,
                            usage.prompt_tokens, usage.completion_tokens,
                            usage.latency_ms / 1000)
