"""A key never gets more than its limits (#22 findings 4, 5, 8, 10).

- Admission (a limiter slot, then a store reservation) and settlement run to their end when
  the request is cancelled at any of their awaits, by a cancel scope (a client that left) or
  a native Task.cancel() (a server cutting requests short), or when the store fails: no slot
  or reservation is left behind, and the key's counters match its usage rows. The stores and
  limiters are the real ones (SQLite with the in-process limiter, Postgres with Redis),
  wrapped to cancel or fail at one named point.
- Every authenticated HTTP request counts once against rpm, whichever route, however many
  choices, and a request the model refuses keeps its rpm count (its tokens and quota are
  given back).
- Reservations belong to a lease per process: a process killed mid-request has its
  reservations freed at the next start, another live process's are kept.
- Streamed responses are charged their real token counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from anyio import from_thread
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import OperationalError
from starlette.requests import Request

from app.auth.deps import metered
from app.auth.keys import now
from app.auth.limits import Limiter, LocalLimiter, RedisLimiter
from app.auth.meter import Accounts
from app.auth.models import ApiKey, Lease, Reservation, UsageRecord
from app.auth.schemas import KeyInfo, KeyLimits
from app.auth.store import KeyStore
from app.errors import QuotaExceeded, RateLimited
from backends.base import Chunk
from tests.auth.conftest import ADMIN, auth_config, bearer, create_key, key_info
from tests.conftest import LiveServer, assert_error, parse_sse, wait_for

PROMPT_TOKENS, COMPLETION_TOKENS = 6, 4


# -- stores and limiters -------------------------------------------------------------------


def _postgres_schema_url(url: str) -> str:
    """A new schema in the run's Postgres database, as the URL's default search_path."""
    import psycopg

    schema = f"s_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    return f"{url}?options=-csearch_path%3D{schema}"


@pytest.fixture(scope="module", params=["sqlite+local", "postgres+redis"])
def backing(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str | None]]:
    """(store URL, Redis URL or None): SQLite with the in-process limiter, Postgres with
    Redis (both are required in CI)."""
    if request.param == "sqlite+local":
        yield f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}", None
        return
    redis_url: str = request.getfixturevalue("redis_url")
    yield _postgres_schema_url(request.getfixturevalue("postgres_url")), redis_url


@pytest.fixture(scope="module")
def store(backing: tuple[str, str | None]) -> Iterator[KeyStore]:
    opened = KeyStore(backing[0])
    opened.migrate()
    opened.leases.open()
    yield opened
    opened.close()


def make_limiter(backing: tuple[str, str | None]) -> Limiter:
    redis_url = backing[1]
    if redis_url is None:
        return LocalLimiter()
    return RedisLimiter(redis_url, namespace=f"test-{uuid.uuid4().hex}")


def reserved_rows(store: KeyStore, key_id: int) -> int:
    with store.engine.connect() as connection:
        return int(connection.scalar(select(func.coalesce(func.sum(Reservation.tokens), 0))
                                     .where(Reservation.key_id == key_id)) or 0)


def usage_rows(store: KeyStore, key_id: int) -> list[Any]:
    with store.engine.connect() as connection:
        return list(connection.execute(select(UsageRecord).where(
            UsageRecord.key_id == key_id)).all())


# -- finding 4: cancellation (or a failure) at every await of admission and settlement ----


class Fault:
    """Cancels the request (its cancel scope, or its task natively) or fails, once, when
    the accounting reaches `point`."""

    def __init__(self, point: str, kind: str) -> None:
        self.point, self.kind = point, kind
        self.fired = False
        self.scope: anyio.CancelScope | None = None
        self.task: asyncio.Task[Any] | None = None

    def at(self, point: str) -> None:
        """On the event loop."""
        if point != self.point or self.fired:
            return
        self.fired = True
        if self.kind == "scope":
            assert self.scope is not None
            self.scope.cancel()
        elif self.kind == "native":
            assert self.task is not None
            self.task.cancel()
        else:
            raise OperationalError("UPDATE api_keys ...", {}, ConnectionError("connection lost"))

    def in_thread(self, point: str) -> None:
        """From a store call's worker thread."""
        from_thread.run_sync(self.at, point)


class FaultyLimiter:
    """The real limiter, with the fault's points around each call."""

    def __init__(self, real: Limiter, fault: Fault) -> None:
        self.real, self.fault = real, fault

    async def count_request(self, key: KeyInfo) -> None:
        await self.real.count_request(key)

    async def acquire(self, key: KeyInfo, tokens: int, count_request: bool = True) -> Any:
        self.fault.at("acquire:before")
        grant = await self.real.acquire(key, tokens, count_request=count_request)
        self.fault.at("acquire:after")
        return grant

    async def finish(self, grant: Any, used_tokens: int, rollback: bool = False) -> None:
        self.fault.at("finish:before")
        await self.real.finish(grant, used_tokens, rollback)
        self.fault.at("finish:after")

    async def close(self) -> None:
        await self.real.close()


class FaultyStore:
    """The real store, with the fault's points around reserve, settle and get."""

    def __init__(self, real: KeyStore, fault: Fault) -> None:
        self.real, self.fault = real, fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def _around(self, name: str, *args: Any) -> Any:
        self.fault.in_thread(f"{name}:before")
        result = getattr(self.real, name)(*args)
        self.fault.in_thread(f"{name}:after")
        return result

    def reserve(self, *args: Any) -> Any:
        return self._around("reserve", *args)

    def settle(self, *args: Any) -> Any:
        return self._around("settle", *args)

    def get(self, *args: Any) -> Any:
        return self._around("get", *args)


def http_request(accounts: Accounts) -> Request:
    """What the `metered` dependency reads of a request: the app's accounts, metrics and
    settings, and the path."""
    app = SimpleNamespace(state=SimpleNamespace(
        accounts=accounts, metrics=None,
        settings=SimpleNamespace(server=SimpleNamespace(log_prompts=False),
                                 auth=SimpleNamespace(charge_cached_prompt_tokens=True,
                                                      prefix_cache_scope="key"))))
    return Request({"type": "http", "app": app, "method": "POST", "path": "/generate",
                    "query_string": b"", "headers": [], "scheme": "http",
                    "server": ("test", 80), "root_path": ""})


async def one_request(accounts: Accounts, key: KeyInfo, fault: Fault, tokens: int) -> None:
    """A generation as the routes run it: the `metered` dependency around an admission, the
    work (a few tokens) and its settlement."""
    async def count_tokens() -> int:
        fault.at("count")
        return tokens

    with anyio.CancelScope() as scope:
        fault.scope, fault.task = scope, asyncio.current_task()
        async with contextlib.asynccontextmanager(metered)(http_request(accounts),
                                                           key) as meter:
            ticket = await meter.admit("tiny", 2, count_tokens)
            ticket.running = True
            ticket.observe(Chunk(text="a"))
            ticket.observe(Chunk(finish_reason="length", prompt_tokens=PROMPT_TOKENS,
                                 completion_tokens=COMPLETION_TOKENS))
            await ticket.settle(200)


ADMITTED = ["count", "acquire:before", "acquire:after", "reserve:before", "reserve:after",
            "settle:before", "settle:after", "finish:before", "finish:after"]
REFUSED = ["acquire:after", "reserve:after", "finish:before", "finish:after", "get:before",
           "get:after"]
CASES = ([("admitted", p, k) for p in ADMITTED for k in ("scope", "native")]
         + [("refused", p, k) for p in REFUSED for k in ("scope", "native")]
         + [("admitted", "reserve:before", "error")])


@pytest.mark.parametrize(("path", "point", "kind"), CASES)
def test_cancelled_or_failed_accounting_leaves_nothing_held(
        store: KeyStore, backing: tuple[str, str | None], path: str, point: str,
        kind: str) -> None:
    key = store.create(KeyLimits(name="k", max_parallel=1, max_tokens=1000))
    tokens = 300 if path == "admitted" else 5000  # over max_tokens: the store refuses
    fault = Fault(point, kind)

    async def scenario() -> BaseException | None:
        limiter = make_limiter(backing)
        faulty: Any = FaultyStore(store, fault)
        accounts = Accounts(faulty, FaultyLimiter(limiter, fault), enabled=True)
        try:
            task = asyncio.create_task(one_request(accounts, key, fault, tokens))
            await asyncio.wait({task})
            outcome = None if task.cancelled() else task.exception()
            # The slot is free again: max_parallel 1 admits one more generation.
            grant = await limiter.acquire(key, 0, count_request=False)
            await limiter.finish(grant, 0, rollback=True)
            return outcome
        finally:
            await limiter.close()

    outcome = asyncio.run(scenario())
    assert fault.fired, f"the accounting never reached {point}"
    if path == "refused":
        assert isinstance(outcome, QuotaExceeded) or outcome is None
    info = store.get(key.id)
    rows = usage_rows(store, key.id)
    assert len(rows) == 1, rows  # the request is recorded once, however it ended
    assert info.reserved_tokens == 0 and reserved_rows(store, key.id) == 0
    ran = [r for r in rows if r.status == 200]
    assert info.used_requests == len(ran)
    assert info.used_tokens == sum(r.prompt_tokens + r.completion_tokens for r in ran)


# -- finding 5: every authenticated request counts against rpm, once ---------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(auth_config(), tmp_path_factory.mktemp("accounting")).start()
    yield live
    live.stop()


def fresh_window(room: float = 10) -> None:
    """Start well inside a minute, so that a test's requests share one rpm window."""
    wait_for(lambda: time.time() % 60 < 60 - room, timeout=room + 5, what="a fresh minute")


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/tokenize", {"model": "tiny", "text": "hello"}),
    ("POST", "/detokenize", {"model": "tiny", "tokens": [1, 2]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("GET", "/usage", None),
    ("GET", "/openapi.json", None),
    ("POST", "/generate", {"model": "rev", "prompt": "abc"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_counts_against_rpm(server: LiveServer, method: str, path: str,
                                        body: dict[str, Any] | None) -> None:
    _, secret = create_key(server.client, rpm=1)
    fresh_window()
    first = server.client.request(method, path, json=body, headers=bearer(secret))
    assert first.status_code == 200, first.text
    second = server.client.request(method, path, json=body, headers=bearer(secret))
    assert_error(second, 429, "rate_limit_exceeded", ("1 of 1 requests per minute",))
    assert second.headers["x-ratelimit-limit"] == "1"
    assert second.headers["x-ratelimit-remaining"] == "0"
    assert second.headers["retry-after"] == second.headers["x-ratelimit-reset"]


def test_admin_routes_count_against_rpm(server: LiveServer) -> None:
    _, secret = create_key(server.client, role="admin", rpm=2)
    fresh_window()
    assert server.client.get("/admin/keys", headers=bearer(secret)).status_code == 200
    assert server.client.get("/admin/usage", headers=bearer(secret)).status_code == 200
    assert_error(server.client.get("/admin/keys", headers=bearer(secret)), 429,
                 "rate_limit_exceeded", ("2 of 2 requests per minute",))


def test_n_choices_are_one_request(server: LiveServer) -> None:
    _, secret = create_key(server.client, rpm=1)
    fresh_window()
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 2, "n": 3}
    answer = server.client.post("/v1/completions", json=body, headers=bearer(secret))
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 3
    assert_error(server.client.post("/v1/completions", json=body, headers=bearer(secret)),
                 429, "rate_limit_exceeded", ("requests per minute",))


def test_request_refused_by_the_model_keeps_its_rpm_count(server: LiveServer) -> None:
    """An over-context prompt is admitted, refused by the model and refunded: its tokens and
    its request quota come back, its rpm count does not (it cost the server tokenizing)."""
    key_id, secret = create_key(server.client, rpm=2, max_tokens=1_000_000, max_requests=100)
    over_context = {"model": "tiny", "prompt": "a " * 3000}  # ~3000 tokens, n_ctx 2048
    fresh_window()
    for _ in range(2):
        refused = server.client.post("/generate", json=over_context, headers=bearer(secret))
        assert_error(refused, 400)
    third = server.client.post("/generate", json=over_context, headers=bearer(secret))
    assert_error(third, 429, "rate_limit_exceeded", ("2 of 2 requests per minute",))
    info = key_info(server.client, key_id)
    assert (info["used_requests"], info["used_tokens"], info["reserved_tokens"]) == (0, 0, 0)


def test_rpm_is_counted_once_per_request_in_the_limiter() -> None:
    """`count_request` counts rpm alone; an admission after it takes no second request."""
    key = KeyInfo.model_validate({
        "id": 1, "prefix": uuid.uuid4().hex[:13], "name": "k", "email": None,
        "organisation": None, "role": "user", "valid_from": None, "expires_at": None,
        "max_requests": None, "max_tokens": None, "rpm": 1, "tpm": 100, "max_parallel": 1,
        "allowed_models": [], "revoked_at": None, "revoked_reason": None,
        "created_at": now(), "last_used_at": None, "used_requests": 0, "used_tokens": 0,
        "reserved_tokens": 0})

    async def scenario() -> None:
        limiter = LocalLimiter(clock=lambda: 60 * 1000 + 1.0)
        await limiter.count_request(key)
        grant = await limiter.acquire(key, 40, count_request=False)
        await limiter.finish(grant, 0, rollback=True)  # a refund: tokens and slot back
        again = await limiter.acquire(key, 100, count_request=False)  # all 100 tpm free
        await limiter.finish(again, 100)
        with pytest.raises(RateLimited) as caught:
            await limiter.count_request(key)
        assert "1 of 1 requests per minute" in caught.value.message

    asyncio.run(scenario())


# -- finding 8: reservations of a process that died -------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return _postgres_schema_url(request.getfixturevalue("postgres_url"))


HOLDER = """
import sys, time
from app.auth.store import KeyStore
store = KeyStore(sys.argv[1])
store.leases.open(seconds=2)
assert store.reserve(int(sys.argv[2]), 500) is not None
print("held", flush=True)
time.sleep(600)
"""


def test_reservations_of_a_killed_process_are_freed_at_the_next_start(
        store_url: str, tmp_path: Path) -> None:
    setup = KeyStore(store_url)
    setup.migrate()
    key = setup.create(KeyLimits(name="k", max_tokens=10_000))
    live = KeyStore(store_url)  # another replica, alive throughout
    live.leases.open(seconds=600)
    live_lease = live.reserve(key.id, 300)
    assert live_lease is not None
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, store_url, str(key.id)],
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)  # mid-request: it never settles
        holder.wait(timeout=60)
        assert setup.get(key.id).reserved_tokens == 800
        dead = [lease for lease in leases(setup) if lease.id != live.leases.id]
        assert len(dead) == 1
        expiry: datetime = dead[0].expires_at  # the last renewal's, before the kill

        def expired() -> bool:
            return now() > expiry + timedelta(seconds=0.1)

        wait_for(expired, timeout=60, what="the killed process's lease to expire")
        server = LiveServer(auth_config(database_url=store_url), tmp_path / "next")
        server.start()
        try:  # at its start the server freed the dead lease's 500, not the live 300
            assert key_info(server.client, key.id)["reserved_tokens"] == 300
            assert dead[0].id not in {lease.id for lease in leases(setup)}
        finally:
            server.stop()
        live.settle(key.id, live_lease, 300, 0, True, None)
        assert setup.get(key.id).reserved_tokens == 0
    finally:
        holder.kill()
        holder.wait(timeout=60)
        live.close()
        setup.close()


def leases(store: KeyStore) -> list[Any]:
    with store.engine.connect() as connection:
        return list(connection.execute(select(Lease)).all())


def test_dead_and_orphaned_leases_are_freed_live_ones_kept(store_url: str) -> None:
    """Rows written as a dead process leaves them: an expired lease and rows whose lease is
    gone; both are given back when a process opens its lease, a live lease is untouched."""
    store = KeyStore(store_url)
    store.migrate()
    key = store.create(KeyLimits(name="k", max_tokens=10_000))
    moment = now()
    with store.engine.begin() as connection:
        connection.execute(insert(Lease), [
            {"id": "dead", "owner": "h:1", "started_at": moment - timedelta(hours=1),
             "expires_at": moment - timedelta(minutes=5)},
            {"id": "alive", "owner": "h:2", "started_at": moment,
             "expires_at": moment + timedelta(minutes=10)}])
        connection.execute(insert(Reservation), [
            {"lease_id": "dead", "key_id": key.id, "tokens": 100},
            {"lease_id": "gone", "key_id": key.id, "tokens": 20},
            {"lease_id": "alive", "key_id": key.id, "tokens": 3}])
    with store.engine.begin() as connection:  # what the three held, in the key's counter
        connection.execute(update(ApiKey).where(ApiKey.id == key.id).values(
            reserved_tokens=123))
    try:
        assert store.leases.open() == 120
        assert store.get(key.id).reserved_tokens == 3
        assert reserved_rows(store, key.id) == 3
    finally:
        store.close()


def test_a_lease_freed_while_its_process_lived_is_not_given_back_twice(
        store_url: str) -> None:
    """A process stalled past its lease: another one freed its reservations. Its requests
    then settle without subtracting them again, and it carries on under a new lease."""
    store, other = KeyStore(store_url), KeyStore(store_url)
    store.migrate()
    key = store.create(KeyLimits(name="k", max_tokens=10_000))
    store.leases.open(seconds=600)
    other.leases.open(seconds=600)
    try:
        stalled = store.reserve(key.id, 400)
        kept = other.reserve(key.id, 250)
        assert stalled is not None and kept is not None
        assert other.leases.free(stalled, None) == 400  # as a reaper would, on expiry
        assert store.get(key.id).reserved_tokens == 250
        store.settle(key.id, stalled, 400, 100, False, None)
        info = store.get(key.id)
        assert (info.reserved_tokens, info.used_tokens) == (250, 100)
        store.leases.renew()
        assert store.leases.id != stalled
        again = store.reserve(key.id, 10)
        assert again == store.leases.id
        store.settle(key.id, again, 10, 10, False, None)
        other.settle(key.id, kept, 250, 50, False, None)
        info = store.get(key.id)
        assert (info.reserved_tokens, info.used_tokens) == (0, 160)
    finally:
        store.close()
        other.close()


# -- finding 10: streamed tokens are charged ----------------------------------------------


def test_agenerate_stream_is_charged_its_tokens(server: LiveServer) -> None:
    key_id, secret = create_key(server.client, max_tokens=100_000)
    params = {"max_tokens": 8, "temperature": 0}
    with server.client.stream("POST", "/agenerate", headers=bearer(secret), json={
            "model": "tiny", "prompt": "once upon a time", "params": params}) as response:
        assert response.status_code == 200
        pieces = [data for _, data in parse_sse(response.iter_lines())]
    assert pieces
    # The same greedy generation, not streamed, reports its token counts.
    same = server.client.post("/v1/completions", headers=ADMIN, json={
        "model": "tiny", "prompt": "once upon a time", **params}).json()
    assert same["choices"][0]["text"] == "".join(pieces)
    prompt, completion = same["usage"]["prompt_tokens"], same["usage"]["completion_tokens"]
    assert prompt > 0 and completion > 0
    rows = usage_rows(server.app.state.accounts.store, key_id)
    assert [(r.endpoint, r.status, r.prompt_tokens, r.completion_tokens) for r in rows] == \
        [("/agenerate", 200, prompt, completion)]
    info = key_info(server.client, key_id)
    assert (info["used_tokens"], info["reserved_tokens"]) == (prompt + completion, 0)


def test_chat_stream_is_charged_its_tokens(server: LiveServer) -> None:
    key_id, secret = create_key(server.client, max_tokens=100_000)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    with server.client.stream("POST", "/v1/chat/completions", headers=bearer(secret),
                              json=body) as response:
        assert response.status_code == 200
        events = [data for _, data in parse_sse(response.iter_lines())]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    rows = usage_rows(server.app.state.accounts.store, key_id)
    assert [(r.endpoint, r.status, r.prompt_tokens, r.completion_tokens) for r in rows] == \
        [("/v1/chat/completions", 200, usage["prompt_tokens"], usage["completion_tokens"])]
    info = key_info(server.client, key_id)
    assert (info["used_tokens"], info["reserved_tokens"]) == (usage["total_tokens"], 0)
