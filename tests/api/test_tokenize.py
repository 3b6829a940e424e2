"""/tokenize and /detokenize on the tiny GGUF, agreeing with what generation counts."""

from __future__ import annotations

import pytest

from tests.conftest import LiveServer, assert_error

MESSAGES = [{"role": "user", "content": "hello, who are you?"}]


def test_tokenize_and_back(v1: LiveServer, model: str) -> None:
    with_bos = v1.client.post("/tokenize", json={"model": model, "text": "hello world"}).json()
    bare = v1.client.post("/tokenize", json={"model": model, "text": "hello world",
                                             "add_special": False}).json()
    assert set(with_bos) == {"tokens", "count", "model"} and with_bos["model"] == model
    assert with_bos["count"] == len(with_bos["tokens"]) == bare["count"] + 1
    assert with_bos["tokens"][1:] == bare["tokens"]
    back = v1.client.post("/detokenize", json={"model": model, "tokens": bare["tokens"]})
    assert back.status_code == 200 and back.json() == {"text": "hello world", "model": model}


def test_counts_agree_with_generation_usage(v1: LiveServer, model: str) -> None:
    chat = v1.client.post("/tokenize", json={"model": model, "messages": MESSAGES}).json()
    usage = v1.client.post("/v1/chat/completions", json={
        "model": model, "messages": MESSAGES, "max_tokens": 2}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]
    text = v1.client.post("/tokenize", json={"model": model, "text": "the quick fox"}).json()
    usage = v1.client.post("/v1/completions", json={
        "model": model, "prompt": "the quick fox", "max_tokens": 2}).json()["usage"]
    assert text["count"] == usage["prompt_tokens"]


def test_default_model_is_the_first(v1: LiveServer) -> None:
    answer = v1.client.post("/tokenize", json={"text": "x"}).json()
    assert answer["model"] == next(iter(v1.client.get("/v1/models").json()["data"]))["id"]


@pytest.mark.parametrize(("path", "body", "status", "code", "mentions"), [
    ("/tokenize", {"text": "x", "messages": MESSAGES}, 422, "invalid_parameter",
     ("exactly one", "text", "messages")),
    ("/tokenize", {}, 422, "invalid_parameter", ("exactly one",)),
    ("/tokenize", {"txt": "x"}, 422, "invalid_parameter", ("txt", "allowed", "text")),
    ("/tokenize", {"model": "nope", "text": "x"}, 404, "model_not_found", ("nope",)),
    ("/tokenize", {"model": "rev", "text": "x"}, 400, "unsupported_capability",
     ("tokenization",)),
    ("/detokenize", {"model": "tiny", "tokens": [1, 10**6]}, 400, "invalid_request",
     ("between 0 and",)),
    ("/detokenize", {"tokens": ["a"]}, 422, "invalid_parameter", ("tokens",)),
])
def test_bad_tokenize_input(v1: LiveServer, path: str, body: dict, status: int, code: str,
                            mentions: tuple[str, ...]) -> None:
    assert_error(v1.client.post(path, json=body), status, code, mentions)
