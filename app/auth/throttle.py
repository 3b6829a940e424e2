"""Throttling of failed authentications per client address: key guessing gets
`auth.failed_auth_limit` tries per `auth.failed_auth_window` seconds, then 429.

A window opens at an address's first failure and lasts `failed_auth_window` seconds; once
the address has `failed_auth_limit` failures in it, every request from it that needs a key
is refused (without looking the key up) until the window ends. Successful authentications
do not count. The counters live in this process (`LocalThrottle`, a bounded table) or, with
`redis_url`, in Redis (`RedisThrottle`) so that replicas share them.

The address is the socket peer (`scope["client"]`); X-Forwarded-For is not trusted (behind
a proxy every client shares the proxy's address — run uvicorn with --proxy-headers and
--forwarded-allow-ips for the proxy to set the peer). IPv6 peers count per /64, the block
one host usually holds.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from starlette.types import Scope

from app.errors import TooManyFailedAuthentications
from app.settings import Settings

log = logging.getLogger(__name__)

MAX_TRACKED = 65_536  # addresses LocalThrottle remembers (~10 MB at most)


class Throttle(Protocol):
    async def check(self, address: str) -> None:
        """Raise TooManyFailedAuthentications when `address` is over the limit."""

    async def failed(self, address: str) -> None:
        """Count one failed authentication from `address`."""

    async def close(self) -> None: ...


def client_address(scope: Scope) -> str:
    """The peer's address (an IPv6 one as its /64); "unknown" without one (a Unix socket)."""
    client = scope.get("client")
    host = client[0] if client else "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Limits:
    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window

    def refusal(self, seconds_left: float) -> TooManyFailedAuthentications:
        retry = max(1, math.ceil(seconds_left))
        return TooManyFailedAuthentications(
            f"Too many failed authentications from this address: {self.limit} in "
            f"{self.window:g} s (auth.failed_auth_limit, auth.failed_auth_window); every "
            f"request from it is refused for {retry} s more.", retry_after=retry)

    def blocking(self, address: str) -> None:
        log.warning("client %s reached %d failed authentications in %g s; refusing it until "
                    "the window ends", address, self.limit, self.window)


class LocalThrottle(_Limits):
    """Counters in this process: address -> (window end, failures), oldest window first.

    The table holds at most `capacity` addresses; past that the oldest window is dropped
    (windows all last as long, so the oldest is the first to end anyway)."""

    def __init__(self, limit: int, window: float, capacity: int = MAX_TRACKED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(limit, window)
        self.capacity = capacity
        self.clock = clock
        self._table: OrderedDict[str, tuple[float, int]] = OrderedDict()

    async def check(self, address: str) -> None:
        entry = self._table.get(address)
        if entry is None:
            return
        ends, failures = entry
        left = ends - self.clock()
        if left <= 0:
            del self._table[address]
        elif failures >= self.limit:
            raise self.refusal(left)

    async def failed(self, address: str) -> None:
        now = self.clock()
        while self._table and next(iter(self._table.values()))[0] <= now:
            self._table.popitem(last=False)  # windows that ended
        ends, failures = self._table.get(address, (now + self.window, 0))
        self._table[address] = (ends, failures + 1)  # a new address goes last
        if failures + 1 == self.limit:
            self.blocking(address)
        while len(self._table) > self.capacity:
            self._table.popitem(last=False)

    async def close(self) -> None:
        return None


_FAILED = """
local failures = redis.call('INCR', KEYS[1])
if failures == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return failures
"""


class RedisThrottle(_Limits):
    """Counters in Redis (one key per address, expiring with its window), shared by the
    replicas of one deployment: the key names hold a digest of the store's URL, so two
    deployments sharing a Redis do not throttle each other.

    While Redis cannot be reached the counting goes on in this process (`LocalThrottle`),
    retrying Redis every RETRY_SECONDS: an outage must not lock every key holder out."""

    RETRY_SECONDS = 5.0

    def __init__(self, url: str, limit: int, window: float, deployment: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import redis.asyncio as redis
        from redis.exceptions import ConnectionError as RedisDown
        from redis.exceptions import TimeoutError as RedisSlow

        super().__init__(limit, window)
        self.client: Any = redis.Redis.from_url(url, socket_timeout=5,
                                                socket_connect_timeout=5)
        digest = hashlib.sha256(deployment.encode()).hexdigest()[:16]
        self.prefix = f"llm-api:failed-auth:{digest}:"
        self._failed = self.client.register_script(_FAILED)
        self._unreachable: tuple[type[Exception], ...] = (RedisDown, RedisSlow)
        self.local = LocalThrottle(limit, window, clock=clock)
        self.clock = clock
        self._down_until = 0.0

    async def check(self, address: str) -> None:
        if self.clock() >= self._down_until:
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.get(self.prefix + address)
                    pipe.pttl(self.prefix + address)
                    failures, left_ms = await pipe.execute()
            except self._unreachable as exc:
                self._down(exc)
            else:
                if failures is not None and int(failures) >= self.limit and left_ms > 0:
                    raise self.refusal(int(left_ms) / 1000)
                return
        await self.local.check(address)

    async def failed(self, address: str) -> None:
        if self.clock() >= self._down_until:
            try:
                failures = await self._failed(keys=[self.prefix + address],
                                              args=[max(1, round(self.window * 1000))])
            except self._unreachable as exc:
                self._down(exc)
            else:
                if int(failures) == self.limit:
                    self.blocking(address)
                return
        await self.local.failed(address)

    def _down(self, exc: Exception) -> None:
        log.warning("Redis is unreachable (%s): failed authentications are counted in this "
                    "process for the next %g s", type(exc).__name__, self.RETRY_SECONDS)
        self._down_until = self.clock() + self.RETRY_SECONDS

    async def close(self) -> None:
        await self.client.aclose()


def make_throttle(settings: Settings) -> Throttle:
    limit, window = settings.auth.failed_auth_limit, settings.auth.failed_auth_window
    if settings.redis_url:
        return RedisThrottle(settings.redis_url, limit, window, settings.store_url())
    return LocalThrottle(limit, window)
