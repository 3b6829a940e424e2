"""/v1/* through the official `openai` SDK (sync and async), unmodified, on live servers."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct

import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import LiveServer, assert_error, parse_sse

USER = [{"role": "user", "content": "hello, who are you?"}]
GREEDY = {"temperature": 0, "max_tokens": 16}

# What each SDK model can do, as this suite expects it (not as the server says of itself):
# test_models_list_and_retrieve checks the server declares exactly this, and the tests of
# optional features expect their clear 400 exactly where a capability is missing here.
EXPECTED_CAPABILITIES = {
    "tiny": {"generate", "chat", "embed", "tokenize", "json_output", "logprobs", "tools"},
    "tiny-hf": {"generate", "chat", "embed", "tokenize", "json_output", "tools"},  # no logprobs
}


def test_chat_completion_shape(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=USER, **GREEDY)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == model and isinstance(reply.created, int)
    [choice] = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_body_has_exactly_openais_fields(v1: LiveServer, model: str) -> None:
    body = v1.client.post("/v1/chat/completions", json={
        "model": model, "messages": USER, **GREEDY}).json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage",
                         "system_fingerprint"}
    assert set(body["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert set(body["choices"][0]["message"]) == {"role", "content", "refusal"}
    usage = body["usage"]
    assert set(usage) - {"prompt_tokens_details"} == {"prompt_tokens", "completion_tokens",
                                                       "total_tokens"}
    if "prompt_tokens_details" in usage:  # from an engine that counts reused prompt cells
        assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}


def test_max_tokens_stop_and_text_parts(client: OpenAI, model: str) -> None:
    full = client.chat.completions.create(model=model, messages=USER, temperature=0,
                                          max_completion_tokens=40)
    text = full.choices[0].message.content or ""
    assert full.usage and full.usage.completion_tokens == 40 and len(text) > 12
    assert full.choices[0].finish_reason == "length"
    short = client.chat.completions.create(model=model, messages=USER, temperature=0,
                                           max_tokens=5)
    assert short.usage and short.usage.completion_tokens == 5
    assert text.startswith(short.choices[0].message.content or "?")
    stop = text[6:9]
    stopped = client.chat.completions.create(model=model, messages=USER, temperature=0,
                                             max_tokens=40, stop=[stop, "never-zz"])
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello, who "},
                                          {"type": "text", "text": "are you?"}]}]
    as_parts = client.chat.completions.create(model=model, messages=parts, temperature=0,
                                              max_tokens=40)
    assert as_parts.choices[0].message.content == text


def test_chat_stream_with_usage(client: OpenAI, model: str) -> None:
    whole = client.chat.completions.create(model=model, messages=USER, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=model, messages=USER, stream=True, stream_options={"include_usage": True},
        **GREEDY))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    *content, last, usage = chunks
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == \
        whole.choices[0].message.content
    assert usage.choices == [] and usage.usage and whole.usage
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens vary
    assert [getattr(usage.usage, c) for c in counts] == [getattr(whole.usage, c) for c in counts]
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format_ends_with_done(v1: LiveServer, model: str) -> None:
    body = {"model": model, "messages": USER, "stream": True, **GREEDY}
    with v1.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [data for _, data in parse_sse(response.iter_lines())]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_n_choices_use_seed_plus_index(client: OpenAI, model: str) -> None:
    params = {"temperature": 1.0, "max_tokens": 12}
    reply = client.chat.completions.create(model=model, messages=USER, n=3, seed=40, **params)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(model=model, messages=USER, seed=40 + i,
                                              **params) for i in range(3)]
    texts = [c.message.content for c in reply.choices]
    assert texts == [one.choices[0].message.content for one in singles]
    assert len(set(texts)) > 1
    assert reply.usage and singles[0].usage
    assert reply.usage.completion_tokens == sum(
        one.usage.completion_tokens for one in singles if one.usage)
    assert reply.usage.prompt_tokens == singles[0].usage.prompt_tokens  # counted once
    streamed = list(client.chat.completions.create(model=model, messages=USER, n=2, seed=40,
                                                   stream=True, **params))
    for i in (0, 1):
        mine = [c.choices[0] for c in streamed if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason is not None
        assert "".join(c.delta.content or "" for c in mine) == texts[i]


def test_completions(client: OpenAI, model: str) -> None:
    reply = client.completions.create(model=model, prompt="the quick brown fox", **GREEDY)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert choice.text and choice.finish_reason in {"stop", "length"}
    assert reply.usage and reply.usage.completion_tokens <= 16
    echoed = client.completions.create(model=model, prompt="the quick brown fox", echo=True,
                                       **GREEDY)
    assert echoed.choices[0].text == "the quick brown fox" + choice.text
    many = client.completions.create(model=model, prompt=["the quick brown fox", "hello"],
                                     n=2, temperature=0, max_tokens=16)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == choice.text
    hello = client.completions.create(model=model, prompt="hello", **GREEDY)
    assert many.choices[2].text == many.choices[3].text == hello.choices[0].text
    assert many.usage and reply.usage and hello.usage
    assert many.usage.completion_tokens == \
        2 * reply.usage.completion_tokens + 2 * hello.usage.completion_tokens
    assert many.usage.prompt_tokens == reply.usage.prompt_tokens + hello.usage.prompt_tokens
    pieces = list(client.completions.create(model=model, prompt="the quick brown fox",
                                            stream=True, stream_options={
                                                "include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == choice.text
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens vary
    assert pieces[-1].usage and pieces[-2].choices[0].finish_reason
    assert [getattr(pieces[-1].usage, c) for c in counts] == \
        [getattr(reply.usage, c) for c in counts]


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def test_embeddings_string_list_ids_base64(client: OpenAI, v1: LiveServer,
                                           model: str) -> None:
    one = client.embeddings.create(model=model, input="hello world")  # SDK asks for base64
    assert one.object == "list" and one.model == model
    [item] = one.data
    assert item.object == "embedding" and item.index == 0 and len(item.embedding) == 64
    assert math.isclose(_norm(item.embedding), 1.0, rel_tol=1e-4)
    assert one.usage.prompt_tokens > 0 and one.usage.total_tokens == one.usage.prompt_tokens
    many = client.embeddings.create(model=model, input=["hello world", "a brown fox"],
                                    encoding_format="float")
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == pytest.approx(item.embedding, abs=1e-5)
    assert many.data[1].embedding != pytest.approx(item.embedding, abs=1e-3)
    ids = v1.client.post("/tokenize", json={"model": model, "text": "hello world",
                                            "add_special": False}).json()["tokens"]
    by_ids = client.embeddings.create(model=model, input=ids)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.data[0].embedding == pytest.approx(item.embedding, abs=1e-5)
    lists = client.embeddings.create(model=model, input=[ids, ids[:1]])
    assert len(lists.data) == 2
    assert lists.data[0].embedding == pytest.approx(by_ids.data[0].embedding, abs=1e-5)
    raw = v1.client.post("/v1/embeddings", json={"model": model, "input": "hello world",
                                                 "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == \
        pytest.approx(item.embedding, abs=1e-6)


def test_models_list_and_retrieve(client: OpenAI, model: str) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) >= {model, "rev"}
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model" and card.owned_by == "llm-api"
    assert card == listed[model]
    extra = card.model_extra or {}
    assert set(extra["capabilities"]) == EXPECTED_CAPABILITIES[model]
    assert extra["state"] == "ready"
    assert listed["rev"].model_extra["capabilities"] == ["generate"]  # type: ignore[index]


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "ok": {"type": "boolean"},
                   "color": {"enum": ["red", "green", "blue"]},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                            "maxItems": 3}},
    "required": ["name", "ok", "color", "tags"],
    "additionalProperties": False,
}


# A request using each optional capability, and the word its refusal names.
USING = {
    ("/v1/chat/completions", "json_output"): (
        {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", "logprobs"): ({"messages": USER, "logprobs": True}, "logprobs"),
    ("/v1/completions", "logprobs"): ({"prompt": "the quick brown fox", "logprobs": 2},
                                      "logprobs"),
}


def refused_as_expected(v1: LiveServer, model: str, capability: str,
                        path: str = "/v1/chat/completions") -> bool:
    """True when `model` is expected to lack `capability`: then a request using it is
    checked to be a 400 naming it (and the caller has nothing more to test)."""
    if capability in EXPECTED_CAPABILITIES[model]:
        return False
    body, names = USING[path, capability]
    assert_error(v1.client.post(path, json={"model": model, "max_tokens": 4, **body}), 400,
                 "unsupported_capability", (names,))
    return True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_parses_and_validates(client: OpenAI, v1: LiveServer, model: str,
                                                 seed: int) -> None:
    if refused_as_expected(v1, model, "json_output"):
        return
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "a person as JSON"}],
        max_tokens=400, seed=seed, temperature=1.0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice  # the grammar ended it, not max_tokens
    jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_json_object_output_parses(client: OpenAI, v1: LiveServer, model: str) -> None:
    if refused_as_expected(v1, model, "json_output"):
        return
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "JSON please"}], max_tokens=400,
        seed=7, temperature=1.0, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_async_client(async_client: AsyncOpenAI, client: OpenAI, model: str) -> None:
    async def run() -> tuple[str, str, list[float]]:
        async with async_client as sdk:
            reply = await sdk.chat.completions.create(model=model, messages=USER, **GREEDY)
            stream = await sdk.chat.completions.create(model=model, messages=USER,
                                                       stream=True, **GREEDY)
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            vector = (await sdk.embeddings.create(model=model, input="hi")).data[0].embedding
            return reply.choices[0].message.content or "", "".join(pieces), vector

    whole, streamed, vector = asyncio.run(run())
    assert whole and streamed == whole
    assert whole == client.chat.completions.create(
        model=model, messages=USER, **GREEDY).choices[0].message.content
    assert len(vector) == 64


def test_chat_logprobs(client: OpenAI, v1: LiveServer, model: str) -> None:
    if refused_as_expected(v1, model, "logprobs"):
        return
    reply = client.chat.completions.create(model=model, messages=USER, logprobs=True,
                                           top_logprobs=3, **GREEDY)
    choice = reply.choices[0]
    assert choice.logprobs and choice.logprobs.content
    tokens = choice.logprobs.content
    assert len(tokens) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:
        assert t.logprob <= 0 and bytes(t.bytes or []).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-6
        # greedy: the chosen token is the likeliest one
        assert t.token == t.top_logprobs[0].token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)
    streamed = list(client.chat.completions.create(model=model, messages=USER, logprobs=True,
                                                   stream=True, **GREEDY))
    scored = [t for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content or []]
    assert [(t.token, t.logprob) for t in scored] == \
        [(t.token, pytest.approx(t.logprob)) for t in tokens]
    assert all(t.top_logprobs == [] for t in scored)
    plain = client.chat.completions.create(model=model, messages=USER, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(client: OpenAI, v1: LiveServer, model: str) -> None:
    if refused_as_expected(v1, model, "logprobs", "/v1/completions"):
        return
    reply = client.completions.create(model=model, prompt="the quick brown fox", logprobs=2,
                                      echo=True, **GREEDY)
    logprobs = reply.choices[0].logprobs
    assert logprobs and logprobs.tokens and logprobs.token_logprobs and logprobs.text_offset
    assert reply.choices[0].text == "the quick brown fox" + "".join(logprobs.tokens)
    assert logprobs.text_offset[0] == len("the quick brown fox")
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp)
               for top, lp in zip(logprobs.top_logprobs or [], logprobs.token_logprobs,
                                  strict=True))
