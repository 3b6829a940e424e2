"""Rate limits (fixed one-minute windows) and parallel limits, in process and in Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from app.auth.limits import LocalLimiter, RedisLimiter
from app.auth.schemas import KeyInfo
from app.errors import RateLimited
from tests.auth.conftest import bearer, create_key
from tests.conftest import assert_error, wait_for
from tests.gated import gated_family


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(**limits: Any) -> KeyInfo:
    moment = datetime.now(UTC)
    return KeyInfo(id=1, prefix=uuid.uuid4().hex[:13], name="k", email=None, organisation=None,
                   role="user", valid_from=None, expires_at=None, max_requests=None,
                   max_tokens=None, rpm=limits.get("rpm"), tpm=limits.get("tpm"),
                   max_parallel=limits.get("max_parallel"), allowed_models=[],
                   revoked_at=None, revoked_reason=None, created_at=moment, last_used_at=None,
                   used_requests=0, used_tokens=0, reserved_tokens=0)


@pytest.fixture(params=["local", "redis"])
def limiter(request: pytest.FixtureRequest) -> Callable[[Clock], Any]:
    if request.param == "local":
        return LocalLimiter
    url = request.getfixturevalue("redis_url")
    return lambda clock: RedisLimiter(url, clock=clock, namespace=f"test-{uuid.uuid4().hex}")


def fresh_window() -> None:
    """Start a live test well inside a minute, so its counts share one window."""
    wait_for(lambda: time.time() % 60 < 55, timeout=10, what="a fresh minute")


def test_rpm_window_resets_at_the_minute(limiter: Callable[[Clock], Any]) -> None:
    async def scenario() -> None:
        clock = Clock(1_000_000 * 60 + 15.2)  # 15.2 s into a minute
        counters = limiter(clock)
        k = key(rpm=3)
        for _ in range(3):
            await counters.acquire(k, 0)
        with pytest.raises(RateLimited) as caught:
            await counters.acquire(k, 0)
        error = caught.value
        assert error.retry_after == 45  # ceil(60 - 15.2)
        assert error.headers == {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0",
                                 "X-RateLimit-Reset": "45"}
        assert "3 of 3 requests per minute" in error.message
        clock.now += 44.7  # 59.9 s: same window
        with pytest.raises(RateLimited):
            await counters.acquire(k, 0)
        clock.now += 0.2  # the next minute
        await counters.acquire(k, 0)
        await counters.close()

    asyncio.run(scenario())


def test_tpm_counts_reservations_and_settles_them(limiter: Callable[[Clock], Any]) -> None:
    async def scenario() -> None:
        counters = limiter(Clock(60 * 777 + 1))
        k = key(tpm=100)
        first = await counters.acquire(k, 80)
        with pytest.raises(RateLimited) as caught:
            await counters.acquire(k, 30)
        assert "80 of 100 tokens per minute" in caught.value.message
        await counters.finish(first, used_tokens=50)  # 30 of the 80 come back
        second = await counters.acquire(k, 30)
        with pytest.raises(RateLimited):
            await counters.acquire(k, 30)
        await counters.finish(second, 0, rollback=True)  # a rejected request gives all back
        await counters.acquire(k, 50)
        await counters.close()

    asyncio.run(scenario())


def test_parallel_slots_come_back(limiter: Callable[[Clock], Any]) -> None:
    async def scenario() -> None:
        counters = limiter(Clock(60 * 999))
        k = key(max_parallel=2, rpm=10)
        grants = [await counters.acquire(k, 0), await counters.acquire(k, 0)]
        with pytest.raises(RateLimited) as caught:
            await counters.acquire(k, 0)
        assert caught.value.retry_after == 1 and "max_parallel is 2" in caught.value.message
        await counters.finish(grants[0], 0)
        await counters.acquire(k, 0)
        with pytest.raises(RateLimited):
            await counters.acquire(k, 0)
        await counters.close()

    asyncio.run(scenario())


def test_rate_limit_over_http(auth_server: Any) -> None:
    server = auth_server()
    _, secret = create_key(server.client, rpm=2)
    fresh_window()
    body = {"prompt": "abc", "model": "rev"}
    for _ in range(2):
        assert server.client.post("/generate", json=body, headers=bearer(secret)).json() == "cba"
    response = server.client.post("/generate", json=body, headers=bearer(secret))
    assert_error(response, 429, "rate_limit_exceeded", ("2 of 2 requests per minute",))
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert response.headers["x-ratelimit-limit"] == "2"
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert response.headers["x-ratelimit-reset"] == str(retry_after)


def test_replicas_share_counters_through_redis(auth_server: Any, redis_url: str,
                                               tmp_path: Any) -> None:
    """Two servers (replicas) on the same store and the same Redis share one rpm."""
    shared = {"database_url": f"sqlite:///{tmp_path / 'shared.db'}", "redis_url": redis_url}
    first, second = auth_server(**shared), auth_server(**shared)
    _, secret = create_key(first.client, rpm=3)
    fresh_window()
    body = {"prompt": "abc", "model": "rev"}
    statuses = [server.client.post("/generate", json=body, headers=bearer(secret)).status_code
                for server in (first, second, first, second)]
    assert statuses == [200, 200, 200, 429]


def test_max_parallel_over_http(auth_server: Any, request: pytest.FixtureRequest) -> None:
    gate = gated_family(request)
    # the second request goes to another model: its engine is free while gated's is held
    server = auth_server(models={"gated": gate.model(), "rev": {"model_family": "reverse"}})
    _, secret = create_key(server.client, max_parallel=1)
    short = {"prompt": "x", "model": "rev"}
    long = {"prompt": "hello", "model": "gated", "params": {"max_tokens": 50}}
    with server.client.stream("POST", "/agenerate", json=long,
                              headers=bearer(secret)) as response:
        lines = response.iter_lines()  # kept: a discarded iterator closes the response
        next(lines)
        gate.wait_reached()  # held there: the first request is still running
        second = server.client.post("/generate", json=short, headers=bearer(secret))
        assert_error(second, 429, "rate_limit_exceeded", ("max_parallel is 1",))
        assert second.headers["retry-after"] == "1"

    def slot_is_back() -> bool:  # the client left while its request was held at the gate
        response = server.client.post("/generate", json=short, headers=bearer(secret))
        return response.status_code == 200

    wait_for(slot_is_back, what="the parallel slot to come back after the disconnect")


def test_unreachable_redis_is_a_503_not_a_crash(auth_server: Any) -> None:
    server = auth_server(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    _, secret = create_key(server.client, rpm=5)
    response = server.client.post("/generate", json={"prompt": "abc", "model": "rev"},
                                  headers=bearer(secret))
    assert_error(response, 503, "store_unavailable", ("retry",))
    assert response.headers["retry-after"] == "5"
    _, unlimited = create_key(server.client)  # keys without limits never ask Redis
    assert server.client.post("/generate", json={"prompt": "abc", "model": "rev"},
                              headers=bearer(unlimited)).json() == "cba"
