"""Bodies that do not parse, and inputs larger than a model can use, are refused up front:
a 4xx in the one error shape on every route with a body, never a 500, never a traceback in
the log, and an over-long prompt is refused before anything tokenizes it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from app.json_body import MAX_JSON_DEPTH, JSONBodyRoute
from tests.auth.conftest import ADMIN, ADMIN_KEY
from tests.conftest import TINY_GGUF, LiveServer, assert_error

N_CTX = 512
CHARS_PER_TOKEN = 8  # server.max_prompt_chars_per_token's default
PROMPT_LIMIT = N_CTX * CHARS_PER_TOKEN


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Auth on (so the admin routes are reachable), the tiny GGUF with a small context."""
    config = {"auth": {"enabled": True, "admin_key": ADMIN_KEY}, "models": {
        "tiny": {"model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
                 "model_params": {"n_ctx": N_CTX, "n_threads": 2, "parallel": 2},
                 "default_max_tokens": 8}}}
    live = LiveServer(config, tmp_path_factory.mktemp("bounds")).start()
    live.client.headers.update(ADMIN)
    yield live
    live.stop()


class Failures(logging.Handler):
    """Every record logged with a traceback or at ERROR and above."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture
def failures() -> Iterator[Failures]:
    """Failures logged anywhere: the root logger and uvicorn's (which does not propagate)."""
    handler = Failures()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def body_routes(server: LiveServer) -> list[tuple[str, str]]:
    """(method, path) of every route that reads a request body, from the OpenAPI schema;
    path parameters filled with an id no key has, so a body that got through could not
    touch a real key."""
    routes = []
    for path, operations in server.app.openapi()["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                routes.append((method.upper(), path.replace("{key_id}", "999999")))
    return routes


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute of an app's routes, inside included routers too."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # FastAPI's record of include_router
            yield from api_routes(route.original_router.routes)


def test_every_route_with_a_body_parses_it_with_bounds(server: LiveServer) -> None:
    found = set(body_routes(server))
    expected = {("POST", p) for p in ("/generate", "/agenerate", "/chat_completion",
                                      "/embeddings", "/tokenize", "/detokenize",
                                      "/v1/chat/completions", "/v1/completions",
                                      "/v1/embeddings", "/admin/keys",
                                      "/admin/keys/999999/revoke")}
    assert expected | {("PATCH", "/admin/keys/999999")} <= found
    writes = [r for r in api_routes(server.app.routes) if r.methods & {"POST", "PUT", "PATCH"}]
    assert len(writes) >= len(found)
    assert all(isinstance(r, JSONBodyRoute) for r in writes), \
        [r.path for r in writes if not isinstance(r, JSONBodyRoute)]


def depth_bomb(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


UNPARSABLE = {
    "depth bomb": (depth_bomb(50_000), ("nested", str(MAX_JSON_DEPTH))),
    "one level too deep": (depth_bomb(MAX_JSON_DEPTH + 1), ("nested", str(MAX_JSON_DEPTH))),
    "invalid UTF-8": (b'{"prompt": "caf\xe9 \xff"}', ("UTF-8",)),
    "UTF-16": ('{"prompt": "x"}'.encode("utf-16"), ("UTF-8",)),
    "NaN": (b'{"prompt": "x", "n": NaN}', ("NaN",)),
    "Infinity": (b'{"prompt": "x", "n": -Infinity}', ("Infinity",)),
    "duplicate keys": (b'{"prompt": "a", "prompt": "b"}', ('"prompt"', "twice")),
    "huge integer": (b'{"n": ' + b"9" * 5000 + b"}", ("digits",)),
    "truncated": (b'{"prompt": "a', ("line 1",)),
    "empty object key oddity": (b'{"": 1, "": 2}', ("twice",)),
    # lone surrogates: valid JSON escapes, but no tokenizer, database or UTF-8 response takes them
    "lone surrogate in a value": (b'{"prompt": "a\\ud800b"}', ("surrogate",)),
    "lone surrogate in a key": (b'{"\\udfff": 1}', ("surrogate",)),
    "lone surrogate deep": (b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
                            ("surrogate",)),
}


def test_paired_surrogate_escapes_are_characters(server: LiveServer) -> None:
    response = server.client.post("/tokenize", content=b'{"text": "\\ud83d\\ude00"}',
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["count"] > 0


@pytest.mark.parametrize("case", list(UNPARSABLE))
def test_unparsable_bodies_are_refused_on_every_route(server: LiveServer, failures: Failures,
                                                      case: str) -> None:
    body, mentions = UNPARSABLE[case]
    for method, path in body_routes(server):
        response = server.client.request(method, path, content=body,
                                          headers={"Content-Type": "application/json"})
        error = assert_error(response, 422, "invalid_parameter",
                             mentions=("not valid JSON", *mentions))
        assert error["param"] is None, (path, error)
    assert not failures.records, [r.getMessage() for r in failures.records]


@pytest.mark.parametrize("body", ["[]", '"text"', "1", "true", "null"])
def test_a_body_that_is_not_an_object_is_a_client_error(server: LiveServer, failures: Failures,
                                                        body: str) -> None:
    for method, path in body_routes(server):
        response = server.client.request(method, path, content=body,
                                          headers={"Content-Type": "application/json"})
        if body == "null" and path.endswith("/revoke"):  # no body: revoke without a reason
            assert_error(response, 404, "key_not_found")
            continue
        assert_error(response, 422, "invalid_parameter", mentions=("must be a JSON object",))
    assert not failures.records, [r.getMessage() for r in failures.records]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_without_a_json_content_type_is_told_so(server: LiveServer,
                                                       content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/admin/keys"):
        response = server.client.post(path, content=b'{"prompt": "a"}', headers=headers)
        error = assert_error(response, 422, "invalid_parameter",
                             mentions=("Content-Type: application/json",))
        assert (content_type or "no Content-Type") in error["message"], error


def nested(depth: int) -> Any:
    """A JSON value `depth` levels deep (objects in objects)."""
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_nesting_up_to_the_limit_is_read(server: LiveServer) -> None:
    """The body is level 1, a tool's parameters level 5: the deepest value allowed gets past
    the parser (to the 400 of the grammar, which nests less deeply still); one level more
    does not."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "tool_choice": "required"}

    def tools(depth: int) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": "f", "parameters": nested(depth)}}]

    deepest = {**body, "tools": tools(MAX_JSON_DEPTH - 4)}
    assert_error(server.client.post("/v1/chat/completions", json=deepest), 400,
                 "invalid_request")
    too_deep = {**body, "tools": tools(MAX_JSON_DEPTH - 3)}
    assert_error(server.client.post("/v1/chat/completions", json=too_deep), 422,
                 "invalid_parameter", mentions=("nested",))


def test_deep_json_schemas_within_the_limit_work(server: LiveServer) -> None:
    """A response_format schema of nested objects (about twenty levels of JSON) is served."""
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(8):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    response = server.client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
        "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": schema}}})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


# -- prompts longer than the context could hold -------------------------------------------

def over(limit: int) -> str:
    return "ab " * (limit // 3 + 1)


def assert_too_long(response: httpx.Response, param: str) -> None:
    error = assert_error(response, 400, "context_length_exceeded",
                         mentions=(str(PROMPT_LIMIT), "server.max_prompt_chars_per_token",
                                   str(N_CTX)))
    assert error["param"] == param, error


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], **extra}


def test_prompts_over_the_character_bound_are_refused(server: LiveServer) -> None:
    client, long = server.client, over(PROMPT_LIMIT)
    assert_too_long(client.post("/generate", json={"prompt": long}), "prompt")
    assert_too_long(client.post("/agenerate", json={"prompt": long}), "prompt")
    assert_too_long(client.post("/generate", json={"job_id": "j1", "content": long}), "prompt")
    assert_too_long(client.post("/v1/completions", json={"model": "tiny", "prompt": long}),
                    "prompt")
    assert_too_long(client.post("/v1/chat/completions", json=chat(long)), "messages")
    job = {"job_id": "j2", "messages": [{"role": "user", "content": long}]}
    assert_too_long(client.post("/chat_completion", json=job), "messages")
    assert_too_long(client.post("/tokenize", json={"text": long}), "text")
    assert_too_long(client.post("/embeddings", json={"text": ["a", long]}), "text[1]")
    assert_too_long(client.post("/v1/embeddings", json={"model": "tiny", "input": long}),
                    "input")


def test_the_bound_counts_every_message_and_the_suffix(server: LiveServer) -> None:
    half = "x" * (PROMPT_LIMIT // 2 + 1)
    two = {"model": "tiny", "messages": [{"role": "system", "content": half},
                                         {"role": "user", "content": half}]}
    assert_too_long(server.client.post("/v1/chat/completions", json=two), "messages")
    fim = {"model": "tiny", "prompt": half, "suffix": half}
    assert_too_long(server.client.post("/v1/completions", json=fim), "prompt")


def test_a_prompt_at_the_bound_is_tokenized(server: LiveServer) -> None:
    """At the bound, the model's own count decides: these tokens do not fit the context."""
    response = server.client.post("/generate", json={"prompt": "ab " * (PROMPT_LIMIT // 3)})
    error = assert_error(response, 400, "context_length_exceeded")
    assert "max_prompt_chars_per_token" not in error["message"]
    assert "in the prompt" in error["message"]
    tokens = server.client.post("/tokenize", json={"text": "ab " * (PROMPT_LIMIT // 3)})
    assert tokens.status_code == 200 and tokens.json()["count"] > N_CTX


# -- list and string bounds in the schemas -------------------------------------------------

@pytest.mark.parametrize(("extra", "mentions"), [
    ({"logit_bias": {str(i): 1 for i in range(301)}}, ("logit_bias", "300")),
    ({"tools": [{"type": "function"}] * 129}, ("tools", "128")),
    ({"tool_choice": {"type": "function", "function": {"name": "x" * 65}}},
     ("tool_choice", "64")),
    ({"stop": ["s"] * 17}, ("stop", "16")),
    ({"n": 9}, ("'n'", "8")),
])
def test_chat_lists_are_bounded(server: LiveServer, extra: dict[str, Any],
                                mentions: tuple[str, ...]) -> None:
    response = server.client.post("/v1/chat/completions", json=chat("hi", **extra))
    assert_error(response, 422, "invalid_parameter", mentions=mentions)


def test_messages_and_their_parts_are_bounded(server: LiveServer) -> None:
    many = {"model": "tiny", "messages": [{"role": "user", "content": "a"}] * 1001}
    assert_error(server.client.post("/v1/chat/completions", json=many), 422,
                 mentions=("messages", "1000"))
    parts = chat([{"type": "text", "text": "a"}] * 1001)
    assert_error(server.client.post("/v1/chat/completions", json=parts), 422,
                 mentions=("content", "1000"))


def test_token_id_lists_longer_than_the_context_are_refused(server: LiveServer) -> None:
    ids = server.client.post("/v1/embeddings", json={"model": "tiny",
                                                     "input": [[300] * 4, [300] * (N_CTX + 1)]})
    error = assert_error(ids, 400, "context_length_exceeded", mentions=(str(N_CTX),))
    assert error["param"] == "input[1]"


def test_bounds_are_in_the_openapi_schema(server: LiveServer) -> None:
    schemas = server.client.get("/openapi.json").json()["components"]["schemas"]
    chat_fields = schemas["ChatCompletionRequest"]["properties"]
    assert json.dumps(chat_fields["logit_bias"]).count("300")
    assert json.dumps(chat_fields["tools"]).count("128")


def test_the_server_survives(server: LiveServer) -> None:
    """After all of the above, the model still answers."""
    assert server.client.post("/generate", json={"prompt": "hi"}).status_code == 200
