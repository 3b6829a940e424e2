"""Fixtures of the OpenAI-compatible and queue-style API tests: one live server per module
with every model the SDK tests run on, plus the `reverse` plugin family for the error paths."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import FIXTURES, LiveServer, tiny_config

# Models the SDK tests are parametrized over: name → config entry (the same tiny Llama as a
# GGUF under llama.cpp and as a transformers snapshot under the huggingface family).
SDK_MODELS: dict[str, dict[str, Any]] = {
    "tiny": {**tiny_config(), "default_max_tokens": 64},
    "tiny-hf": {"model_family": "huggingface", "default_max_tokens": 64,
                "setup_params": {"model_path": str(FIXTURES / "tiny-llama-hf")}},
}


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server: the SDK models, and `rev` (reverse plugin: no chat template, no
    embeddings, "fail" makes the engine fail)."""
    config = {"models": {**SDK_MODELS, "rev": {"model_family": "reverse"}}}
    server = LiveServer(config, tmp_path_factory.mktemp("v1")).start()
    yield server
    server.stop()


@pytest.fixture(params=list(SDK_MODELS))
def model(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def client(v1: LiveServer) -> Iterator[OpenAI]:
    """The official SDK, unmodified; retries off so each error surfaces once."""
    with OpenAI(base_url=f"{v1.url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def async_client(v1: LiveServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{v1.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def sdk(server: LiveServer) -> Iterator[OpenAI]:
    """The SDK against the requesting module's own `server` fixture."""
    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client
