"""Fairness at the request gate (issue #22): one key holder cannot stall the others there.

A key's slow bodies hold at most `server.max_body_reads_per_key` of the global body-read
slots; waiting for a slot counts against `server.body_read_timeout` (408, never an unbounded
wait); a request is counted against its key's rpm as its key is identified, before its body
is read, so a key over its rpm gets its 429 without the server reading its body, and slow
bodies that end in 408 count too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.auth.conftest import bearer, create_key
from tests.auth.test_accounting_hardening import fresh_window
from tests.auth.test_auth_hardening import error_of, open_request, read_response
from tests.conftest import LiveServer, wait_for

GENERATE = {"prompt": "ab", "model": "rev"}
BODY = json.dumps(GENERATE).encode()
StartServer = Callable[..., LiveServer]


def unanswered(sock: socket.socket) -> bool:
    """Nothing has come back on `sock` yet (no response, and it is not closed)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


@contextlib.contextmanager
def slot_held(server: LiveServer, *key_id: int) -> Iterator[None]:
    """A body-read slot (the global one, or `key_id`'s and a global one) taken in the
    server's event loop and held until the block ends: a gate the test controls."""
    loop = server.loop
    reads = server.app.state.body_reads
    taken = threading.Event()
    release: list[asyncio.Event] = []

    async def hold() -> None:
        release.append(asyncio.Event())
        async with reads.slot(*key_id):
            taken.set()
            await release[0].wait()

    held = asyncio.run_coroutine_threadsafe(hold(), loop)
    wait_for(lambda: taken.is_set() or held.done(), what="the slot to be taken")
    if held.done():
        held.result()  # raises what went wrong
    try:
        yield
    finally:
        loop.call_soon_threadsafe(release[0].set)
        held.result(timeout=30)


def test_slow_bodies_of_one_key_leave_slots_to_the_others(auth_server: StartServer) -> None:
    server = auth_server(server={"max_body_reads": 3, "max_body_reads_per_key": 2,
                                 "body_read_timeout": 20})
    reads = server.app.state.body_reads
    _, hostile = create_key(server.client)
    _, other = create_key(server.client)
    socks = [open_request(server, "/generate", BODY, 1, bearer(hostile)) for _ in range(5)]
    try:
        wait_for(lambda: reads.reading + reads.waiting == 5, what="5 bodies at the gate")
        # Another key is served while the hostile key's bodies are still unsent and open.
        answer = server.client.post("/generate", json=GENERATE, headers=bearer(other))
        assert (answer.status_code, answer.json()) == (200, "ba")
        assert all(unanswered(sock) for sock in socks), "a hostile body ended first"
        # The hostile key's requests wait their turn, two at a time, and are served.
        for sock in socks:
            sock.sendall(BODY[1:])
        for sock in socks:
            status, _, body = read_response(sock)
            assert (status, body) == (200, "ba")
    finally:
        for sock in socks:
            sock.close()
    assert reads.peak == 3  # the hostile key's 2 and the other key's 1
    assert (reads.reading, reads.waiting) == (0, 0)


@pytest.mark.parametrize("cap", ["global", "per_key"])
def test_waiting_for_a_slot_ends_in_408(auth_server: StartServer, cap: str) -> None:
    server = auth_server(server={"max_body_reads": 1 if cap == "global" else 4,
                                 "max_body_reads_per_key": 1, "body_read_timeout": 2})
    reads = server.app.state.body_reads
    key_id, secret = create_key(server.client)
    with slot_held(server, *([key_id] if cap == "per_key" else [])):
        with open_request(server, "/generate", BODY, len(BODY), bearer(secret)) as sock:
            wait_for(lambda: reads.waiting == 1, what="the request to wait for a slot")
            sock.settimeout(20)  # 2 s of body_read_timeout, and room for a busy machine
            status, headers, body = read_response(sock)
        error = error_of(status, body, 408, "request_body_timeout")
        for setting in ("body_read_timeout", "max_body_reads"):
            assert setting in error["message"], error
        assert headers.get("connection") == "close"
        assert reads.waiting == 0
    # Once the slot is free, the same request is served.
    answer = server.client.post("/generate", json=GENERATE, headers=bearer(secret))
    assert (answer.status_code, answer.json()) == (200, "ba")
    assert (reads.reading, reads.waiting) == (0, 0)


def test_over_rpm_is_refused_before_the_body_is_read(auth_server: StartServer) -> None:
    server = auth_server()
    reads = server.app.state.body_reads
    _, secret = create_key(server.client, rpm=1)
    fresh_window()
    assert server.client.post("/generate", json=GENERATE, headers=bearer(secret)).json() == "ba"
    body: Any = b"x" * 1_000_000  # declared, never sent
    with open_request(server, "/generate", body, 0, bearer(secret)) as sock:
        sock.settimeout(10)  # the body read would wait 30 s (body_read_timeout)
        status, headers, answer = read_response(sock)
    error = error_of(status, answer, 429, "rate_limit_exceeded")
    assert "1 of 1 requests per minute" in error["message"]
    assert headers["retry-after"] == headers["x-ratelimit-reset"]
    assert reads.peak == 1  # the first request's body only


def test_slow_bodies_count_against_rpm(auth_server: StartServer) -> None:
    server = auth_server(server={"body_read_timeout": 2})
    _, secret = create_key(server.client, rpm=1)
    fresh_window()
    with open_request(server, "/generate", BODY, 1, bearer(secret)) as sock:
        sock.settimeout(20)
        status, _, answer = read_response(sock)
    error_of(status, answer, 408, "request_body_timeout")
    refused = server.client.post("/generate", json=GENERATE, headers=bearer(secret))
    assert refused.status_code == 429, refused.text
    error_of(refused.status_code, refused.json(), 429, "rate_limit_exceeded")
