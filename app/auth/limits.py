"""Rate limits (rpm, tpm) and concurrent-request limits per key.

Windows are fixed, aligned to the minute of the wall clock (UTC): a key with rpm=60 may send
60 requests between 12:00:00 and 12:00:59, and the counters start again at 12:01:00. rpm
counts every authenticated HTTP request once, when it arrives (`count_request`), and never
gives it back: a request the model refuses still cost its turn. tpm counts the tokens
reserved at admission (prompt + max_tokens), corrected to the real count when the request
ends; max_parallel counts the generations running. The counters live in this process
(`LocalLimiter`) or, with `redis_url`, in Redis (`RedisLimiter`) so that replicas share them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.auth.schemas import KeyInfo
from app.errors import RateLimited

WINDOW_SECONDS = 60
PARALLEL_TTL = 3600  # (Redis) a crashed replica's in-flight counts expire after an idle hour


@dataclass
class Grant:
    """What an admission counted, so that settlement or a rollback can give it back."""

    slot: str | None = None  # the key's counter name; None when the key has no limits
    window: int = 0
    tokens: int = 0
    parallel: bool = False
    request: bool = False  # counted one request against rpm (a rollback gives it back)


class Limiter(Protocol):
    async def count_request(self, key: KeyInfo) -> None: ...

    async def acquire(self, key: KeyInfo, tokens: int, count_request: bool = True
                      ) -> Grant: ...

    async def finish(self, grant: Grant, used_tokens: int, rollback: bool = False) -> None: ...

    async def close(self) -> None: ...


def has_limits(key: KeyInfo) -> bool:
    return key.rpm is not None or key.tpm is not None or key.max_parallel is not None


def slot_of(key: KeyInfo) -> str:
    return f"{key.id}:{key.prefix}"


def rejection(kind: int, used: int, key: KeyInfo, tokens: int, now: float) -> RateLimited:
    """The 429 for limit `kind` (1 parallel, 2 rpm, 3 tpm) with its headers."""
    reset = math.ceil(WINDOW_SECONDS - now % WINDOW_SECONDS)
    if kind == 1:
        limit = key.max_parallel or 0
        message = (f"Too many requests at once for this key: {used} running, max_parallel is "
                   f"{limit}. Retry when one finishes.")
        reset = 1
    elif kind == 2:
        limit = key.rpm or 0
        message = (f"Rate limit reached: {used} of {limit} requests per minute (rpm) used; "
                   f"the window resets in {reset} s.")
    else:
        limit = key.tpm or 0
        message = (f"Rate limit reached: {used} of {limit} tokens per minute (tpm) used and "
                   f"this request reserves {tokens} (prompt + max_tokens); the window resets "
                   f"in {reset} s.")
    headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(
        max(0, limit - used)), "X-RateLimit-Reset": str(reset)}
    return RateLimited(message, retry_after=reset, headers=headers)


class LocalLimiter:
    """Counters in this process (one event loop: no locking needed)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._windows: dict[str, tuple[int, int, int]] = {}  # slot -> (window, requests, tokens)
        self._parallel: dict[str, int] = {}

    async def count_request(self, key: KeyInfo) -> None:
        """Count one HTTP request against rpm (429 when the window is full)."""
        if key.rpm is not None:
            self._take(key, 0, parallel=False, request=True, tpm=False)

    async def acquire(self, key: KeyInfo, tokens: int, count_request: bool = True) -> Grant:
        """Take a parallel slot and `tokens` of tpm (and a request of rpm unless the HTTP
        request was already counted), all or nothing."""
        if not has_limits(key):
            return Grant()
        return self._take(key, tokens, parallel=True, request=count_request, tpm=True)

    def _take(self, key: KeyInfo, tokens: int, parallel: bool, request: bool,
              tpm: bool) -> Grant:
        slot, now = slot_of(key), self.clock()
        window = int(now // WINDOW_SECONDS)
        running = self._parallel.get(slot, 0)
        seen, requests, used = self._windows.get(slot, (window, 0, 0))
        if seen != window:
            requests, used = 0, 0
        parallel = parallel and key.max_parallel is not None
        if parallel and key.max_parallel is not None and running >= key.max_parallel:
            raise rejection(1, running, key, tokens, now)
        if request and key.rpm is not None and requests + 1 > key.rpm:
            raise rejection(2, requests, key, tokens, now)
        if tpm and key.tpm is not None and used + tokens > key.tpm:
            raise rejection(3, used, key, tokens, now)
        self._windows[slot] = (window, requests + int(request), used + tokens)
        if parallel:
            self._parallel[slot] = running + 1
        return Grant(slot, window, tokens, parallel, request)

    async def finish(self, grant: Grant, used_tokens: int, rollback: bool = False) -> None:
        if grant.slot is None:
            return
        if grant.parallel:
            self._parallel[grant.slot] = max(0, self._parallel.get(grant.slot, 1) - 1)
        window, requests, used = self._windows.get(grant.slot, (grant.window, 0, 0))
        if window == grant.window:
            delta = -grant.tokens if rollback else used_tokens - grant.tokens
            given_back = int(rollback and grant.request)
            self._windows[grant.slot] = (window, requests - given_back, max(0, used + delta))

    async def close(self) -> None:
        return None


# ARGV: max_parallel, rpm, tpm (-1: not checked), tokens, the TTLs, 1 to count a request
_ACQUIRE = """
local par_max, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, count = tonumber(ARGV[4]), ARGV[7] == '1'
local par = tonumber(redis.call('GET', KEYS[1]) or '0')
if par_max >= 0 and par >= par_max then return {1, par} end
local req = tonumber(redis.call('GET', KEYS[2]) or '0')
if count and rpm >= 0 and req + 1 > rpm then return {2, req} end
local tok = tonumber(redis.call('GET', KEYS[3]) or '0')
if tpm >= 0 and tok + tokens > tpm then return {3, tok} end
if par_max >= 0 then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
if count then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
if tokens > 0 then
  redis.call('INCRBY', KEYS[3], tokens)
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
return {0, 0}
"""


class RedisLimiter:
    """Counters in Redis, checked and counted by one Lua script (atomic across replicas)."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time,
                 namespace: str = "llm-api") -> None:
        import redis.asyncio as redis

        self.clock = clock
        self.namespace = namespace
        self.client: Any = redis.Redis.from_url(url)
        self._acquire = self.client.register_script(_ACQUIRE)

    def _names(self, slot: str, window: int) -> list[str]:
        base = f"{self.namespace}:{slot}"
        return [f"{base}:parallel", f"{base}:rpm:{window}", f"{base}:tpm:{window}"]

    async def count_request(self, key: KeyInfo) -> None:
        """Count one HTTP request against rpm (429 when the window is full)."""
        if key.rpm is not None:
            await self._take(key, 0, None, None, request=True)

    async def acquire(self, key: KeyInfo, tokens: int, count_request: bool = True) -> Grant:
        """Take a parallel slot and `tokens` of tpm (and a request of rpm unless the HTTP
        request was already counted), all or nothing (one script)."""
        if not has_limits(key):
            return Grant()
        return await self._take(key, tokens, key.max_parallel, key.tpm, count_request)

    async def _take(self, key: KeyInfo, tokens: int, parallel: int | None, tpm: int | None,
                    request: bool) -> Grant:
        slot, now = slot_of(key), self.clock()
        window = int(now // WINDOW_SECONDS)

        def arg(limit: int | None) -> int:
            return -1 if limit is None else limit

        kind, used = await self._acquire(
            keys=self._names(slot, window),
            args=[arg(parallel), arg(key.rpm), arg(tpm), tokens, PARALLEL_TTL,
                  2 * WINDOW_SECONDS, int(request)])
        if kind:
            raise rejection(int(kind), int(used), key, tokens, now)
        return Grant(slot, window, tokens, parallel is not None, request)

    async def finish(self, grant: Grant, used_tokens: int, rollback: bool = False) -> None:
        if grant.slot is None:
            return
        parallel, requests, tokens = self._names(grant.slot, grant.window)
        async with self.client.pipeline(transaction=True) as pipe:
            if grant.parallel:
                pipe.decr(parallel)
            if rollback and grant.request:
                pipe.decr(requests)
            pipe.incrby(tokens, -grant.tokens if rollback else used_tokens - grant.tokens)
            pipe.expire(tokens, 2 * WINDOW_SECONDS)
            await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()


def make_limiter(redis_url: str | None) -> Limiter:
    return RedisLimiter(redis_url) if redis_url else LocalLimiter()
