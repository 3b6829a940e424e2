"""Rate limits (rpm, tpm) and concurrent-request limits per key.

Windows are fixed, aligned to the minute of the wall clock (UTC): a key with rpm=60 may send
60 requests between 12:00:00 and 12:00:59, and the counters start again at 12:01:00. rpm
counts every authenticated HTTP request once, when it arrives (`count_request`), and never
gives it back: a request the model refuses still cost its turn. tpm counts the tokens
reserved at admission (prompt + max_tokens), corrected to the real count when the request
ends; max_parallel counts the generations running. The counters live in this process
(`LocalLimiter`) or, with `redis_url`, in Redis (`RedisLimiter`) so that replicas share them.

In Redis, each replica keeps its own share of a key's running requests (one hash field per
replica) and a liveness deadline it renews while it holds any; a replica that dies (kill -9,
OOM, a lost host) never settles its requests, and its share stops counting once its deadline
has passed (LIVENESS_SECONDS), instead of holding the key's slots until the counter expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.auth.schemas import KeyInfo
from app.errors import RateLimited

WINDOW_SECONDS = 60
log = logging.getLogger(__name__)

PARALLEL_TTL = 3600  # (Redis) a key's running counts, untouched this long, are dropped
LIVENESS_SECONDS = 10.0  # (Redis) a replica not heard from this long holds no parallel slots
HEARTBEAT_EVERY = LIVENESS_SECONDS / 4


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
    return RateLimited(message, retry_after=reset, headers=headers,
                       reason={1: "max_parallel", 2: "rpm"}.get(kind, "tpm"))


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


# Redis's clock in ms (one clock for every replica's liveness deadline)
_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# KEYS: running (hash: replica -> count), rpm, tpm, replicas (zset: replica -> deadline)
# ARGV: max_parallel, rpm, tpm (-1: not checked), tokens, the TTLs, 1 to count a request,
# this replica, its liveness (ms)
_ACQUIRE = _NOW + """
local par_max, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, count, me = tonumber(ARGV[4]), ARGV[7] == '1', ARGV[8]
local par = 0
if par_max >= 0 then
  local held = redis.call('HGETALL', KEYS[1])
  for i = 1, #held, 2 do
    local deadline = tonumber(redis.call('ZSCORE', KEYS[4], held[i]) or '0')
    if held[i] == me or deadline > now then
      par = par + tonumber(held[i + 1])
    else
      redis.call('HDEL', KEYS[1], held[i])  -- a dead replica's share
    end
  end
  if par >= par_max then return {1, par} end
end
local req = tonumber(redis.call('GET', KEYS[2]) or '0')
if count and rpm >= 0 and req + 1 > rpm then return {2, req} end
local tok = tonumber(redis.call('GET', KEYS[3]) or '0')
if tpm >= 0 and tok + tokens > tpm then return {3, tok} end
if par_max >= 0 then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[9]), me)
  redis.call('HINCRBY', KEYS[1], me, 1)
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

# KEYS: running, rpm, tpm; ARGV: this replica, 1 to release its slot, 1 to give the request
# back, the token correction, the window TTL. A share dropped meanwhile (this replica was
# taken for dead) is not taken below 0.
_FINISH = """
if ARGV[2] == '1' and redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if ARGV[3] == '1' then redis.call('DECR', KEYS[2]) end
redis.call('INCRBY', KEYS[3], tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[3], ARGV[5])
"""

# KEYS: replicas; ARGV: this replica, its liveness (ms). Also forgets replicas long dead.
_HEARTBEAT = _NOW + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
"""


class RedisLimiter:
    """Counters in Redis, checked and counted by one Lua script (atomic across replicas)."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time,
                 namespace: str = "llm-api") -> None:
        import redis.asyncio as redis

        self.clock = clock
        self.namespace = namespace
        self.client: Any = redis.Redis.from_url(url)
        self.replica = uuid.uuid4().hex  # this process's share of the running counts
        self.replicas = f"{namespace}:replicas"
        self._acquire = self.client.register_script(_ACQUIRE)
        self._finish = self.client.register_script(_FINISH)
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._beating: asyncio.Task[None] | None = None

    def _names(self, slot: str, window: int) -> list[str]:
        base = f"{self.namespace}:{slot}"
        return [f"{base}:running", f"{base}:rpm:{window}", f"{base}:tpm:{window}"]

    def _keep_alive(self) -> None:
        """Renew this replica's liveness from now on (it holds running requests)."""
        if self._beating is None or self._beating.done():
            self._beating = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        liveness = round(LIVENESS_SECONDS * 1000)
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            try:
                await self._heartbeat(keys=[self.replicas], args=[self.replica, liveness])
            except Exception as exc:  # noqa: BLE001 - Redis down: the next beat retries
                log.warning("could not renew this replica's liveness in Redis: %s",
                            type(exc).__name__)

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
            keys=[*self._names(slot, window), self.replicas],
            args=[arg(parallel), arg(key.rpm), arg(tpm), tokens, PARALLEL_TTL,
                  2 * WINDOW_SECONDS, int(request), self.replica,
                  round(LIVENESS_SECONDS * 1000)])
        if kind:
            raise rejection(int(kind), int(used), key, tokens, now)
        if parallel is not None:
            self._keep_alive()
        return Grant(slot, window, tokens, parallel is not None, request)

    async def finish(self, grant: Grant, used_tokens: int, rollback: bool = False) -> None:
        if grant.slot is None:
            return
        delta = -grant.tokens if rollback else used_tokens - grant.tokens
        await self._finish(keys=self._names(grant.slot, grant.window), args=[
            self.replica, int(grant.parallel), int(rollback and grant.request), delta,
            2 * WINDOW_SECONDS])

    async def close(self) -> None:
        beating, self._beating = self._beating, None
        if beating is not None and not beating.done():
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        await self.client.aclose()


def make_limiter(redis_url: str | None) -> Limiter:
    return RedisLimiter(redis_url) if redis_url else LocalLimiter()
