"""LangChain's OpenAI classes, pointed at /v1, work unmodified."""

from __future__ import annotations

import json
import math
from typing import Literal

import openai
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel, Field

from tests.api.test_openai import EXPECTED_CAPABILITIES
from tests.conftest import LiveServer

MESSAGES = [SystemMessage("be brief"), HumanMessage("hello, who are you?")]


def chat_model(v1: LiveServer, model: str, **kwargs: object) -> ChatOpenAI:
    settings = {"temperature": 0, "max_tokens": 16, **kwargs}
    return ChatOpenAI(model=model, base_url=f"{v1.url}/v1", api_key="unused",  # type: ignore[arg-type]
                      max_retries=0, **settings)


def test_chat_invoke_and_stream(v1: LiveServer, model: str) -> None:
    llm = chat_model(v1, model, stream_usage=True)
    reply = llm.invoke(MESSAGES)
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata and 0 < reply.usage_metadata["output_tokens"] <= 16
    assert reply.response_metadata["finish_reason"] in {"stop", "length"}
    chunks = list(llm.stream(MESSAGES))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(str(c.content) for c in chunks) == reply.content
    total = sum(chunks[1:], chunks[0])
    counts = ("input_tokens", "output_tokens", "total_tokens")  # the cache read varies
    assert total.usage_metadata and reply.usage_metadata
    assert [total.usage_metadata[c] for c in counts] == [reply.usage_metadata[c] for c in counts]
    if model == "tiny":  # llama: the same prompt again comes from the cache but its last
        # token (langchain-openai maps usage.prompt_tokens_details.cached_tokens here)
        details = total.usage_metadata.get("input_token_details", {})
        assert details.get("cache_read") == total.usage_metadata["input_tokens"] - 1


class Person(BaseModel):
    name: str = Field(max_length=8)
    ok: bool
    color: Literal["red", "green"]


def test_structured_output_and_json_mode(v1: LiveServer, model: str) -> None:
    # Where a random-weight model ends a JSON object depends on the sampled path (and so on
    # the seed and the engine's numerics): seed 0 closes both objects within 300 tokens,
    # on both families.
    llm = chat_model(v1, model, max_tokens=300, seed=0, temperature=1.0)
    if "json_output" not in EXPECTED_CAPABILITIES[model]:  # the family says so clearly
        with pytest.raises(openai.BadRequestError, match="response_format"):
            llm.with_structured_output(Person, method="json_schema").invoke("a person")
        return
    person = llm.with_structured_output(Person, method="json_schema").invoke("a person")
    assert isinstance(person, Person) and len(person.name) <= 8
    reply = llm.bind(response_format={"type": "json_object"}).invoke("JSON please")
    assert reply.response_metadata["finish_reason"] == "stop"
    assert isinstance(json.loads(str(reply.content)), dict)


def test_embeddings(v1: LiveServer, model: str) -> None:
    # LangChain's default (check_embedding_ctx_length=True) tokenizes with OpenAI's tiktoken
    # encoding and sends those ids: they mean nothing to another model's vocabulary (and the
    # encoding file is a download). Pointing it at any non-OpenAI model needs this flag off.
    embeddings = OpenAIEmbeddings(model=model, base_url=f"{v1.url}/v1",
                                  api_key="unused",  # type: ignore[arg-type]
                                  check_embedding_ctx_length=False, max_retries=0)
    vectors = embeddings.embed_documents(["hello world", "a brown fox", "hello world"])
    assert len(vectors) == 3 and all(len(v) == 64 for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4)
               for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-6)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert embeddings.embed_query("hello world") == pytest.approx(vectors[0], abs=1e-6)
