"""Request heads are bounded before anything else runs: a header too large gets 431, one too
slow 408, an idle connection is closed; X-Forwarded-For counts only from configured proxies."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.auth.conftest import ADMIN_KEY
from tests.conftest import LiveServer

HEAD_LIMIT = 8192
HEAD_TIMEOUT = 1.0
REV = {"models": {"rev": {"model_family": "reverse"}}}


def bounded(**server: Any) -> dict[str, Any]:
    return {**REV, "server": {"max_header_bytes": HEAD_LIMIT,
                              "header_read_timeout": HEAD_TIMEOUT, **server}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(bounded(), tmp_path_factory.mktemp("heads")).start()
    yield live
    live.stop()


def connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_and_error(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower(), head
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, error


@pytest.mark.parametrize("chunk", [100_000, 1000])  # one piece, or many small ones
def test_a_header_over_the_limit_gets_431_and_the_connection_closes(server: LiveServer,
                                                                    chunk: int) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: ")
        junk = b"a" * (4 * HEAD_LIMIT)
        try:
            for start in range(0, len(junk), chunk):
                sock.sendall(junk[start:start + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before the last piece: its answer is already sent
        status, error = status_and_error(read_all(sock))
    assert status == 431 and error["code"] == "request_header_too_large"
    assert str(HEAD_LIMIT) in error["message"] and "server.max_header_bytes" in error["message"]
    assert server.client.get("/health").status_code == 200


def test_a_head_sent_too_slowly_gets_408(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # ...and nothing more
        started = time.monotonic()
        status, error = status_and_error(read_all(sock))
    assert status == 408 and error["code"] == "request_header_timeout"
    assert "server.header_read_timeout" in error["message"]
    assert time.monotonic() - started >= HEAD_TIMEOUT * 0.9


def test_an_idle_connection_is_closed(server: LiveServer) -> None:
    with connect(server) as sock:
        assert read_all(sock) == b""  # closed after header_read_timeout, nothing sent


def test_keep_alive_and_bodies_larger_than_the_head_limit_still_work(
        server: LiveServer) -> None:
    """The bound is on each request's head only: a body (and the next request on the same
    connection) are not counted into it."""
    body = json.dumps({"prompt": "x" * (3 * HEAD_LIMIT), "model": "rev"}).encode()
    request = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(request)
            response = b""
            while b"\r\n\r\n" not in response:
                response += sock.recv(65536)
            head, _, rest = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += sock.recv(65536)
            assert json.loads(rest) == "x" * (3 * HEAD_LIMIT)  # reversed x's are x's


@pytest.mark.parametrize(("trusted", "throttled"), [(None, True), ("127.0.0.1", False)])
def test_forwarded_for_counts_only_from_configured_proxies(tmp_path: Path,
                                                           trusted: str | None,
                                                           throttled: bool) -> None:
    """Failed keys are throttled per client address: by default the socket peer, whatever
    X-Forwarded-For says; with server.forwarded_allow_ips, the address that proxy forwards."""
    config = {**bounded(forwarded_allow_ips=trusted),
              "auth": {"enabled": True, "admin_key": ADMIN_KEY, "failed_auth_limit": 2}}
    server = LiveServer(config, tmp_path).start()
    try:
        statuses = [server.client.get("/v1/models", headers={
            "Authorization": f"Bearer wrong-{i}", "X-Forwarded-For": f"203.0.113.{i}"}
        ).status_code for i in range(4)]
    finally:
        server.stop()
    assert statuses == ([401, 401, 429, 429] if throttled else [401] * 4)


def test_an_idle_connection_outlives_the_clients_keep_alive(tmp_path: Path) -> None:
    """httpx and the openai SDK keep an idle connection 5 s: the server keeps it longer
    (until header_read_timeout), so a client reusing it at 5 s never finds it closing."""
    live = LiveServer(REV, tmp_path).start()
    try:
        with connect(live) as sock:
            request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(5.5)
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        live.stop()
