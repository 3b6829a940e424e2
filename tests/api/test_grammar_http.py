"""response_format.json_schema over HTTP: every schema ends in a 400 or in JSON that
validates, and the server keeps serving (issue #22, finding 1).

The server runs in a subprocess (`llm-api serve`), so a crash in llama.cpp shows as a
failed assertion here, not as a dead pytest. Its grammar limits are set below the defaults
to check that the settings reach the engine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.backends.test_grammar import BOUNDED_SCHEMAS, HOSTILE_SCHEMAS, validate
from tests.conftest import TINY_GGUF, assert_error, without_auth

LLM_API = str(Path(sys.executable).parent / "llm-api")
REPEAT, BYTES = 200, 32_768  # server.max_grammar_repeat and server.max_grammar_bytes here


class Server:
    """`llm-api serve` on the tiny GGUF in a subprocess, its output in a file."""

    def __init__(self, directory: Path) -> None:
        config = without_auth({
            "server": {"max_grammar_repeat": REPEAT, "max_grammar_bytes": BYTES},
            "models": {"tiny": {"model_family": "llama",
                                "setup_params": {"model_path": str(TINY_GGUF)},
                                "model_params": {"n_ctx": 4096, "n_threads": 2}}}},
            directory)
        path = directory / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.log = directory / "server.log"
        self.proc = subprocess.Popen(
            [LLM_API, "serve", "--config", str(path), "--port", str(port)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 120
        while not self._ready():
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "server not ready in 120 s"
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            return self.client.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def chat(self, schema: Any, seed: int = 0, max_tokens: int = 800) -> httpx.Response:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        return self.client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "JSON please"}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "response_format": fmt})

    def assert_alive(self) -> None:
        """The process still runs and serves an ordinary request."""
        assert self.proc.poll() is None, f"server died: {self.log.read_text()[-3000:]}"
        assert self.client.get("/health").status_code == 200
        reply = self.client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4})
        assert reply.status_code == 200, reply.text

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("grammar"))
    yield running
    running.stop()


def valid_content(response: httpx.Response, schema: Any) -> Any:
    """The reply's JSON, checked against the schema: the grammar ended the output."""
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    value = json.loads(choice["message"]["content"])
    validate(value, schema)
    return value


# The schemas of the issue: each crashed (or held) the server before.
@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "maxLength": 1500}, ("schema.maxLength", "1500")),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 5000}, ("schema.maxItems",)),
    ({"type": "array", "maxItems": 5000}, ("schema.maxItems", "5000")),
    ({"type": "string", "maxLength": 100000}, ("schema.maxLength", "100000")),
    ({"type": "string", "pattern": "a{100000000}"}, ("pattern", "100000000")),
    ({"type": "string", "pattern": "^(\\d{50}){50}$"}, ("pattern", "2500")),
    ({"type": "string", "pattern": "^(a?){0,100}b$"}, ("can match nothing",)),
    ({"type": "string", "pattern": "^(\\w)\\1$"}, ("backreferences",)),
])
def test_schemas_that_crashed_or_stalled_are_a_400(server: Server, schema: dict[str, Any],
                                                    words: tuple[str, ...]) -> None:
    error = assert_error(server.chat(schema), 400, "invalid_request", words)
    assert error["param"] == "response_format"
    if "maxLength" in schema or "maxItems" in schema or "{100000000}" in str(schema):
        assert f"({REPEAT}, server.max_grammar_repeat)" in error["message"]
    server.assert_alive()


@pytest.mark.parametrize("pattern", ["^\\d{5}$", "^\\w{2}\\s\\w{2}$", "^\\d{1,3}\\.\\d$",
                                     "^[^\\d\\s]{2,4}$"])
def test_regex_escapes_that_crashed_now_constrain(server: Server, pattern: str) -> None:
    schema = {"type": "string", "pattern": pattern}
    for seed in range(2):
        valid_content(server.chat(schema, seed), schema)
    server.assert_alive()


def test_the_limits_are_the_settings(server: Server) -> None:
    at_limit = {"type": "string", "maxLength": REPEAT}
    valid_content(server.chat(at_limit), at_limit)
    over = {"type": "string", "maxLength": REPEAT + 1}
    assert_error(server.chat(over), 400, "invalid_request",
                 (f"({REPEAT}, server.max_grammar_repeat)",))
    big = {"enum": [f"{i:064d}" for i in range(600)]}  # ~40 kB of literals
    assert_error(server.chat(big), 400, "invalid_request",
                 (f"({BYTES}, server.max_grammar_bytes)",))
    server.assert_alive()


def test_a_streamed_request_is_refused_before_the_stream(server: Server) -> None:
    fmt = {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "maxLength": 10**6}}}
    response = server.client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "response_format": fmt})
    assert_error(response, 400, "invalid_request", ("maxLength",))
    server.assert_alive()


def test_a_lone_surrogate_in_the_schema_is_refused_at_the_door(server: Server) -> None:
    """JSON may hold "\\ud800" (UTF-8 cannot): the body is refused before any schema work."""
    body = ('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            '"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
            '"schema": {"properties": {"\\ud800": {"minimum": 1}}}}}}')
    response = server.client.post("/v1/chat/completions", content=body,
                                  headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_parameter", ("surrogate",))
    server.assert_alive()


def test_a_long_pattern_is_refused_before_it_is_parsed(server: Server) -> None:
    """900 kB of pattern took 4.5 s of CPU (holding the GIL: every other request stalled)
    to be refused by the grammar size check; the patterns' length is bounded first."""
    error = assert_error(server.chat({"type": "string", "pattern": "(a)" * 300_000}), 400,
                         "invalid_request", ("pattern", "4096"))
    assert error["param"] == "response_format"
    server.assert_alive()


def _chat_with_format(server: Server, fmt: Any) -> httpx.Response:
    return server.client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "response_format": fmt})


@pytest.mark.parametrize("kind", ["text", "json_object"])
def test_a_json_schema_beside_another_type_is_refused(server: Server, kind: str) -> None:
    """type text with a json_schema used to constrain the output to the schema."""
    fmt = {"type": kind, "json_schema": {"name": "x", "schema": {"type": "boolean"}}}
    error = assert_error(_chat_with_format(server, fmt), 422, "invalid_parameter",
                         ("response_format.type", f"'{kind}'", "json_schema"))
    assert error["param"] == "response_format"


FORMATS = [
    {"type": "text"}, {"type": "text", "json_schema": None},
    {"type": "text", "json_schema": {"name": "x"}},
    {"type": "json_object"}, {"type": "json_object", "json_schema": None},
    {"type": "json_object", "json_schema": {"name": "x", "schema": {"type": "null"}}},
    {"type": "json_schema"}, {"type": "json_schema", "json_schema": None},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "null"}}},
]


def test_the_openapi_document_and_the_server_agree_on_response_format(server: Server) -> None:
    """Every response_format above is accepted by the server exactly when the published
    request schema allows it (schemathesis checks the same from generated values)."""
    document = server.client.get("/openapi.json").json()
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/ResponseFormat", "components": document["components"]})
    for fmt in FORMATS:
        response = _chat_with_format(server, fmt)
        assert response.status_code in (200, 422), response.text
        assert validator.is_valid(fmt) == (response.status_code == 200), (fmt, response.text)
    assert _chat_with_format(server, {"type": "text"}).json()["choices"][0]["message"]


CASES = 100  # examples of the property test (15-35 s on 2 busy cores)


@settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(schema=st.one_of(BOUNDED_SCHEMAS, BOUNDED_SCHEMAS, HOSTILE_SCHEMAS),
       seed=st.integers(0, 2**31 - 1))
def test_any_schema_ends_in_a_400_or_valid_json(server: Server, schema: Any,
                                                seed: int) -> None:
    response = server.chat(schema, seed)
    assert server.proc.poll() is None, f"server died: {server.log.read_text()[-3000:]}"
    event(f"status {response.status_code}")
    if response.status_code == 400:
        error = assert_error(response, 400, "invalid_request", ("response_format",))
        assert error["param"] == "response_format"
        return
    valid_content(response, schema)


def test_the_server_survived_the_property_test(server: Server) -> None:
    """Runs after it (file order): the process is the one that served every example."""
    server.assert_alive()
