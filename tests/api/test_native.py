"""/generate, /agenerate and /embeddings through real HTTP on the tiny GGUF."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.conftest import LiveServer, assert_error, parse_sse, stream_events

GREEDY = {"temperature": 0, "max_tokens": 24}


def test_generate_returns_a_json_string(tiny: LiveServer) -> None:
    response = tiny.client.post("/generate", json={"prompt": "hello world", "params": GREEDY})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    text = response.json()
    assert isinstance(text, str) and text.strip()


def test_generate_without_params_uses_defaults(tiny: LiveServer) -> None:
    response = tiny.client.post("/generate", json={"prompt": "the quick brown fox",
                                                   "params": {"max_tokens": 8}})
    assert response.status_code == 200
    before = tiny.model_stats()["tokens_generated"]
    response = tiny.client.post("/generate", json={"prompt": "hi", "params": None,
                                                   "model": "tiny"})
    assert response.status_code == 200 and isinstance(response.json(), str)
    assert tiny.model_stats()["tokens_generated"] - before == 64  # the default_max_tokens


def test_same_seed_and_greedy_give_the_same_text(tiny: LiveServer) -> None:
    body = {"prompt": "the answer is", "params": {**GREEDY, "seed": 7}}
    first = tiny.client.post("/generate", json=body).json()
    second = tiny.client.post("/generate", json=body).json()
    assert first == second
    sampled = {"prompt": "the answer is", "params": {"temperature": 1.0, "max_tokens": 24,
                                                     "seed": 123, "top_k": 0, "min_p": 0}}
    assert tiny.client.post("/generate", json=sampled).json() == \
        tiny.client.post("/generate", json=sampled).json()


def test_stream_concatenates_to_the_completion(tiny: LiveServer) -> None:
    body = {"prompt": "hello world", "params": {**GREEDY, "max_tokens": 40}}
    events = stream_events(tiny.client, body)
    assert len(events) > 1
    assert all(kind == "message" for kind, _ in events)
    assert "".join(data for _, data in events) == \
        tiny.client.post("/generate", json=body).json()


def test_max_tokens_is_honoured(tiny: LiveServer) -> None:
    before = tiny.model_stats()["tokens_generated"]
    short = tiny.client.post("/generate", json={"prompt": "one two", "params": {
        "temperature": 0, "max_tokens": 5}}).json()
    assert tiny.model_stats()["tokens_generated"] - before == 5
    longer = tiny.client.post("/generate", json={"prompt": "one two", "params": {
        "temperature": 0, "max_tokens": 12}}).json()
    assert longer.startswith(short) and len(longer) > len(short)


def test_stop_string_ends_the_completion_and_is_removed(tiny: LiveServer) -> None:
    full = tiny.client.post("/generate", json={"prompt": "question", "params": {
        "temperature": 0, "max_tokens": 60}}).json()
    assert len(full) > 12
    stop = full[8:11]
    expected = full[:full.index(stop)]
    for params in ({"stop": stop}, {"stop": ["never-seen-zzz", stop]}):
        body = {"prompt": "question", "params": {"temperature": 0, "max_tokens": 60, **params}}
        assert tiny.client.post("/generate", json=body).json() == expected
        assert "".join(d for _, d in stream_events(tiny.client, body)) == expected


def test_echo_returns_the_prompt_first(tiny: LiveServer) -> None:
    body = {"prompt": "hello there", "params": {**GREEDY, "echo": True}}
    plain = tiny.client.post("/generate", json={"prompt": "hello there", "params": GREEDY})
    assert tiny.client.post("/generate", json=body).json() == "hello there" + plain.json()


def test_multiline_pieces_use_several_data_lines(live_server: Any) -> None:
    server = live_server({"models": {"rev": {"model_family": "reverse"}}})
    body = {"prompt": "\nthree\n\none \"two\"\n"}
    with server.client.stream("POST", "/agenerate", json=body) as response:
        raw = response.read().decode()
    assert raw.count("data:") == 5  # one event, one data line per line of the piece
    assert "\r" not in raw
    [(kind, data)] = parse_sse(raw.split("\n"))
    assert kind == "message" and data == body["prompt"][::-1]


def test_embeddings_one_text_and_a_list(tiny: LiveServer) -> None:
    one = tiny.client.post("/embeddings", json={"text": "hello world"})
    assert one.status_code == 200, one.text
    vector = one.json()
    assert isinstance(vector, list) and len(vector) == 64
    assert all(isinstance(x, float) for x in vector)
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    many = tiny.client.post("/embeddings", json={"text": ["hello world", "a brown fox", "x"]})
    vectors = many.json()
    assert len(vectors) == 3 and all(len(v) == 64 for v in vectors)
    assert vectors[0] == pytest.approx(vector, abs=1e-5)
    assert vectors[1] != pytest.approx(vectors[0], abs=1e-3)


def test_check_health_ready(tiny: LiveServer) -> None:
    assert tiny.client.get("/check").json() == "Ok"
    assert tiny.client.get("/health").status_code == 200
    ready = tiny.client.get("/ready")
    assert ready.status_code == 200
    model = ready.json()["models"][0]
    assert model["state"] == "ready" and model["family"] == "llama"
    assert model["context_length"] == 8192
    assert {"generate", "embed", "chat", "tokenize"} <= set(model["capabilities"])


@pytest.mark.parametrize(("body", "status", "code", "mentions"), [
    ({"prompt": "x", "params": {"max_token": 3}}, 422, "invalid_parameter",
     ("max_token", "allowed", "max_tokens", "temperature")),
    ({"prompt": "x", "params": {"temperature": 5}}, 422, "invalid_parameter", ("temperature",)),
    ({"prompt": "x", "params": {"top_p": -1}}, 422, "invalid_parameter", ("top_p",)),
    ({"prompt": "x", "params": {"max_tokens": 0}}, 422, "invalid_parameter", ("max_tokens",)),
    ({"prompt": "x", "params": {"stop": [""]}}, 422, "invalid_parameter", ("stop",)),
    ({"prompt": "x", "params": {"stop": ["a"] * 17}}, 422, "invalid_parameter", ("stop",)),
    ({"prompt": "x", "params": {"seed": -3}}, 422, "invalid_parameter", ("seed",)),
    ({"params": {}}, 422, "invalid_parameter", ("prompt", "required")),
    ({"prompt": 5}, 422, "invalid_parameter", ("prompt",)),
    ({"prompt": "x", "temperature": 0}, 422, "invalid_parameter", ("temperature", "allowed")),
    ({"prompt": "x", "model": "nope"}, 404, "model_not_found", ("nope", "available")),
    ({"prompt": "x", "params": {"max_tokens": 9000}}, 400, "context_length_exceeded",
     ("8192", "9000")),
    ({"prompt": "x", "params": {"suffix": "y"}}, 400, "unsupported_capability", ("suffix",)),
])
@pytest.mark.parametrize("path", ["/generate", "/agenerate"])
def test_bad_generation_input(tiny: LiveServer, path: str, body: dict, status: int, code: str,
                              mentions: tuple[str, ...]) -> None:
    assert_error(tiny.client.post(path, json=body), status, code, mentions)


def test_prompt_longer_than_the_context(tiny: LiveServer) -> None:
    prompt = "hello world the quick brown fox " * 2000
    error = assert_error(tiny.client.post("/generate", json={"prompt": prompt}), 400,
                         "context_length_exceeded", ("8192",))
    assert error["param"] == "prompt"


@pytest.mark.parametrize(("body", "status", "mentions"), [
    ({"text": []}, 422, ("empty",)),
    ({"text": ["a"] * 257}, 422, ("257", "256")),
    ({"text": 3}, 422, ("text",)),
    ({"texts": ["a"]}, 422, ("texts", "allowed", "text")),
    ({"text": "a", "model": "other"}, 404, ("other",)),
])
def test_bad_embeddings_input(tiny: LiveServer, body: dict, status: int,
                              mentions: tuple[str, ...]) -> None:
    assert_error(tiny.client.post("/embeddings", json=body), status, None, mentions)


def test_malformed_and_oversized_bodies(tiny: LiveServer) -> None:
    bad_json = tiny.client.post("/generate", content=b"{not json",
                                headers={"content-type": "application/json"})
    assert_error(bad_json, 422, "invalid_parameter", ("JSON",))
    huge = json.dumps({"prompt": "a" * 2_000_000}).encode()
    assert_error(tiny.client.post("/generate", content=huge,
                                  headers={"content-type": "application/json"}),
                 413, "payload_too_large", ("max_body_bytes",))

    def chunks():  # no Content-Length: the limit still applies
        for _ in range(40):
            yield b"a" * 65536

    assert_error(tiny.client.post("/generate", content=chunks(),
                                  headers={"content-type": "application/json"}),
                 413, "payload_too_large")
    assert_error(tiny.client.get("/nowhere"), 404, "not_found")
    assert_error(tiny.client.get("/generate"), 405, "method_not_allowed")


def test_engine_failure_is_explained_without_leaking(live_server: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    server = live_server({"models": {"rev": {"model_family": "reverse"}}})
    error = assert_error(server.client.post("/generate", json={"prompt": "fail"}), 500,
                         "backend_failure", ("server log",))
    assert "secret" not in error["message"] and "/srv" not in error["message"]
    events = stream_events(server.client, {"prompt": "fail"})
    [(kind, data)] = events
    assert kind == "error" and json.loads(data)["error"]["code"] == "backend_failure"
    assert "secret" not in data
    # the operator still sees the cause: the worker's log reaches the server's log
    assert "secret internal detail" in caplog.text
    assert server.client.post("/generate", json={"prompt": "ok"}).json() == "ko"
