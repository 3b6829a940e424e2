"""Defects found by attacking a live server as a hostile key holder would (issue #22's
follow-up review), each pinned by a test."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from backends.errors import InvalidRequest
from backends.grammar import GrammarLimits, schema_grammar

BODY_ROUTES = ["/generate", "/agenerate", "/chat_completion", "/embeddings", "/tokenize",
               "/detokenize", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(models={"rev": {"model_family": "reverse"}}, auth={"enabled": False},
                        data_dir=tmp_path_factory.mktemp("redteam"))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


async def _left_before_body(app: Any, path: str) -> list[dict[str, Any]]:
    """Call the app for a POST whose client is gone before its body arrived (uvicorn then
    answers every receive() with http.disconnect): the ASGI messages the app sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 50000),
             "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", b"40")]}
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_client_that_leaves_before_its_body_is_no_server_error(
        client: TestClient, path: str, caplog: pytest.LogCaptureFixture) -> None:
    # /generate read its body in a dependency of its own: ClientDisconnect escaped as an
    # "unexpected failure", a 500 and two tracebacks in the log per request.
    with caplog.at_level(logging.WARNING):
        sent = client.portal.call(_left_before_body, client.app, path)  # type: ignore[union-attr]
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] < 500, sent
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("count", ["9" * 5000, "1," + "9" * 5000, "9" * 5000 + ","])
def test_a_pattern_count_longer_than_int_allows_is_a_400(count: str) -> None:
    # re's parser calls int() on the count: past 4300 digits that is a ValueError, which
    # escaped as a 500 with two tracebacks in the log. Such a pattern is now longer than the
    # schema's pattern budget, refused before parsing (the int() guard itself is tested on
    # pattern_grammar in tests/backends/test_grammar.py).
    schema = {"type": "string", "pattern": f"^a{{{count}}}$"}
    with pytest.raises(InvalidRequest, match="pattern"):
        schema_grammar(schema, GrammarLimits())


def test_a_pattern_writes_no_warnings_to_the_log() -> None:
    # re's parser warned (FutureWarning, on stderr: the server log) once per "[[" position:
    # one 200 kB pattern wrote 50,000 warnings, a new set for each shift of the positions.
    # A fresh interpreter, as a server imports the module (pytest resets warning filters).
    script = """
import contextlib
from backends.errors import InvalidRequest
from backends.grammar import GrammarLimits, schema_grammar
pattern = "".join(f"[[{i % 10}]" for i in range(2000)) + "[a--b][a&&b][a~~b]"
with contextlib.suppress(InvalidRequest):
    schema_grammar({"type": "string", "pattern": pattern}, GrammarLimits())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr[:500]
