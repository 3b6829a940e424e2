"""API replicas: two `llm-api serve` processes started from one config, on one Postgres and
one Redis, share keys, quotas and rate limits, and the quotas stay exact across them.

Each replica is a real `llm-api serve` subprocess (not a server thread of the test process),
so nothing a replica keeps in its own memory can make the counts look shared when they are
not. The models run in the API process (`placement: inprocess`): this tests the API layer's
accounting, not the engine transports. `rev` answers instantly; `slow` (the scripted test
family) streams "tick " pieces until the client leaves, so "a request still running on the
other replica" is a state the test sees, not a guess about speed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.auth.conftest import ADMIN, _fresh_schema, auth_config, bearer, create_key
from tests.auth.test_quotas import prompt_tokens
from tests.conftest import REDIS_URL, TINY_GGUF, assert_error, parse_sse, wait_for

LLM_API = Path(sys.executable).parent / "llm-api"
START_TIMEOUT = 120.0
ENDLESS = "endless"  # the scripted family's script for a stream that runs until closed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Replica:
    """`llm-api serve --config <the shared config>` on a port of its own."""

    def __init__(self, config: Path, directory: Path, name: str) -> None:
        self.name = name
        self.config = config
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = directory / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_API_", "HF_"))}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(LLM_API), "serve", "--config", str(config),
                 "--port", self.url.rsplit(":", 1)[1]],
                stdout=log, stderr=subprocess.STDOUT, cwd=directory, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.output()}"
            try:
                if self.client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"{self.name} not ready:\n{self.output()}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _services(request: pytest.FixtureRequest) -> tuple[str, str]:
    """A fresh Postgres schema's URL and Redis's (fails under CI=true when one is missing)."""
    database = _fresh_schema(request.getfixturevalue("postgres_url"))
    request.getfixturevalue("redis_url")
    return database, REDIS_URL


@pytest.fixture(scope="module")
def replicas(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    """Two replicas of one deployment, started together (they race to migrate the fresh
    schema and to bootstrap the admin key: the store serialises that)."""
    database_url, redis_url = _services(request)
    directory = tmp_path_factory.mktemp("replicas")
    config = auth_config(
        database_url=database_url, redis_url=redis_url, data_dir=str(directory / "data"),
        server={"graceful_shutdown_seconds": 1},
        models={
            "rev": {"model_family": "reverse", "placement": "inprocess"},
            "slow": {"model_family": "scripted", "placement": "inprocess",
                     "model_params": {"pace": 0.05}},
            "tiny": {"model_family": "llama", "placement": "inprocess",
                     "setup_params": {"model_path": str(TINY_GGUF)},
                     "model_params": {"n_ctx": 2048, "n_threads": 1}},
        })
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            started.append(Replica(path, directory, name))
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


def spread(replicas: list[Replica], n: int,
           send: Callable[[httpx.Client, int], httpx.Response]) -> list[httpx.Response]:
    """`n` requests from `n` threads released together by a barrier, request i going to
    replica i % len(replicas)."""
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=replicas[i % len(replicas)].url, timeout=120) as client:
            client.get("/health")  # connect before the barrier
            barrier.wait()
            return send(client, i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def admin_get(replica: Replica, path: str, **params: Any) -> dict[str, Any]:
    response = replica.client.get(path, params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def counts(replica: Replica, key_id: int) -> tuple[int, int, int]:
    """The key's (used_requests, used_tokens, reserved_tokens) as `replica` reports them."""
    info = admin_get(replica, f"/admin/keys/{key_id}")
    return info["used_requests"], info["used_tokens"], info["reserved_tokens"]


def test_replicas_share_one_admin_key_and_the_keys_it_creates(replicas: list[Replica]) -> None:
    a, b = replicas
    key_id, secret = create_key(a.client, name="made on a")
    assert admin_get(b, f"/admin/keys/{key_id}")["name"] == "made on a"
    body = {"prompt": "abc", "model": "rev"}
    assert b.client.post("/generate", json=body, headers=bearer(secret)).json() == "cba"
    revoked = b.client.post(f"/admin/keys/{key_id}/revoke", json={"reason": "test"},
                            headers=ADMIN)
    assert revoked.status_code == 200, revoked.text
    assert_error(a.client.post("/generate", json=body, headers=bearer(secret)), 401,
                 "api_key_revoked")


@pytest.mark.parametrize("path", ["/generate", "/agenerate"])
def test_request_quota_is_exact_across_replicas(replicas: list[Replica], path: str) -> None:
    k = 6
    key_id, secret = create_key(replicas[0].client, max_requests=k)
    responses = spread(replicas, 4 * k, lambda client, i: client.post(
        path, json={"prompt": f"request {i}", "model": "rev"}, headers=bearer(secret)))
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == k, [r.status_code for r in responses]
    for response in responses:
        if response.status_code != 200:
            assert_error(response, 429, "quota_exceeded", ("Request quota", f"{k} of {k}"))
    first = admin_get(replicas[0], "/admin/usage", key_id=key_id)
    totals = first["totals"]
    assert (totals["requests"], totals["errors"]) == (4 * k, 3 * k)
    for replica in replicas:  # either replica tells the same story
        used = totals["prompt_tokens"] + totals["completion_tokens"]
        assert counts(replica, key_id) == (k, used, 0)
        report = admin_get(replica, "/admin/usage", key_id=key_id)
        assert report == first
        mine = replica.client.get("/usage", headers=bearer(secret))
        assert mine.status_code == 200 and mine.json() == report
    for replica in replicas:
        again = replica.client.post(path, json={"prompt": "one more", "model": "rev"},
                                    headers=bearer(secret))
        assert_error(again, 429, "quota_exceeded")


def test_token_quota_is_never_overrun_across_replicas(replicas: list[Replica]) -> None:
    """Reservations made on both replicas (each under its own lease) add up against one
    token quota; every one is settled to the real count, none is left reserved."""
    prompt, max_tokens = "hello world", 12
    reservation = prompt_tokens(prompt) + max_tokens
    quota = 3 * reservation + reservation // 2
    key_id, secret = create_key(replicas[0].client, max_tokens=quota)
    body = {"prompt": prompt, "model": "tiny",
            "params": {"max_tokens": max_tokens, "temperature": 0}}
    responses = spread(replicas, 12, lambda client, i: client.post(
        "/generate", json=body, headers=bearer(secret)))
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code != 200]
    assert len(ok) >= 3 and rejected
    for response in rejected:
        assert_error(response, 429, "quota_exceeded", ("Token quota", str(quota)))
    totals = admin_get(replicas[0], "/admin/usage", key_id=key_id)["totals"]
    expected = (len(ok), totals["prompt_tokens"] + totals["completion_tokens"], 0)
    for replica in replicas:
        assert counts(replica, key_id) == expected
    assert expected[1] <= quota


def fresh_window() -> None:
    """Start well inside a minute, so the test's requests share one rpm window."""
    wait_for(lambda: time.time() % 60 < 50, timeout=15, what="a fresh minute")


def test_rpm_is_shared_across_replicas(replicas: list[Replica]) -> None:
    k = 5
    key_id, secret = create_key(replicas[0].client, rpm=k)
    fresh_window()
    responses = spread(replicas, 4 * k, lambda client, i: client.post(
        "/generate", json={"prompt": f"request {i}", "model": "rev"}, headers=bearer(secret)))
    assert sorted(r.status_code for r in responses) == [200] * k + [429] * (3 * k)
    for response in responses:
        if response.status_code != 200:
            assert_error(response, 429, "rate_limit_exceeded", (f"of {k} requests per minute",))
    for replica in replicas:
        assert counts(replica, key_id)[0] == k


class Stream:
    """An `endless` /agenerate stream on `replica`, open (its first piece read) until closed."""

    def __init__(self, replica: Replica, secret: str) -> None:
        body = {"prompt": ENDLESS, "model": "slow", "params": {"max_tokens": 100_000}}
        request = replica.client.build_request("POST", "/agenerate", json=body,
                                               headers=bearer(secret))
        self.response = replica.client.send(request, stream=True)
        assert self.response.status_code == 200, self.response.read()
        self.events = parse_sse(self.response.iter_lines())
        assert next(self.events) == ("message", "tick ")  # running: it holds a slot

    def close(self) -> None:
        self.response.close()


def test_max_parallel_is_shared_across_replicas(replicas: list[Replica]) -> None:
    a, b = replicas
    _, secret = create_key(a.client, max_parallel=2)
    short = {"prompt": "abc", "model": "rev"}
    streams = [Stream(a, secret), Stream(b, secret)]
    try:
        for replica in replicas:  # one runs on each: both replicas see two running
            refused = replica.client.post("/generate", json=short, headers=bearer(secret))
            assert_error(refused, 429, "rate_limit_exceeded",
                         ("2 running, max_parallel is 2",))
        streams.pop(0).close()  # the client leaves a's stream: its slot comes back ...

        def b_has_a_slot() -> bool:  # ... and b, which never ran it, can use it
            response = b.client.post("/generate", json=short, headers=bearer(secret))
            if response.status_code == 429:
                return False
            assert response.json() == "cba"
            return True

        wait_for(b_has_a_slot, what="the slot a's stream held to be free on b")
        streams.append(Stream(a, secret))
        assert_error(b.client.post("/generate", json=short, headers=bearer(secret)), 429,
                     "rate_limit_exceeded", ("max_parallel is 2",))
    finally:
        for stream in streams:
            stream.close()


def test_a_dead_replicas_running_requests_free_their_parallel_slots(
        replicas: list[Replica]) -> None:
    """A replica killed mid-stream never settles its requests: the parallel slots they held
    come back once its liveness lapses, instead of staying taken while the key is used."""
    a = replicas[0]
    doomed = Replica(a.config, a.log.parent, "doomed")
    try:
        doomed.wait_ready()
        _, secret = create_key(a.client, max_parallel=1)
        stream = Stream(doomed, secret)
        short = {"prompt": "abc", "model": "rev"}
        assert_error(a.client.post("/generate", json=short, headers=bearer(secret)), 429,
                     "rate_limit_exceeded", ("1 running, max_parallel is 1",))
        doomed.process.kill()  # SIGKILL: nothing is settled
        doomed.process.wait(10)
        stream.close()

        def slot_is_back() -> bool:
            response = a.client.post("/generate", json=short, headers=bearer(secret))
            if response.status_code == 429:
                return False
            assert response.json() == "cba"
            return True

        wait_for(slot_is_back, timeout=60, what="the dead replica's parallel slot")
    finally:
        doomed.stop()
