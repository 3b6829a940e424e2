"""LLMAPIEmbeddings against the live server, and LangChain's standard embeddings suites."""

from __future__ import annotations

import math

import httpx
import pytest
from langchain_llm_api import LLMAPIEmbeddings, NotFoundError
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests
from lc_servers import ServerProcess

TEXTS = ["hello world", "a brown fox", "x", "the quick brown fox jumps", "hello world"]


@pytest.fixture
def embeddings(llm_api_server: ServerProcess) -> LLMAPIEmbeddings:
    return LLMAPIEmbeddings(**llm_api_server.client_params(), batch_size=2)


def test_vectors_equal_the_servers(embeddings: LLMAPIEmbeddings,
                                   llm_api_server: ServerProcess) -> None:
    answer = httpx.post(f"{llm_api_server.url}/embeddings", json={"text": TEXTS},
                        headers=llm_api_server.headers(), timeout=60)
    vectors = embeddings.embed_documents(TEXTS)  # three requests of at most two texts
    assert len(vectors) == len(TEXTS) and all(len(v) == 64 for v in vectors)
    for got, expected in zip(vectors, answer.json(), strict=True):
        assert got == pytest.approx(expected, abs=1e-6)
    assert vectors[0] == pytest.approx(vectors[4], abs=1e-6)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    query = embeddings.embed_query("hello world")
    assert query == pytest.approx(vectors[0], abs=1e-6)
    assert math.isclose(math.fsum(x * x for x in query), 1.0, rel_tol=1e-4)


async def test_async_equals_sync(embeddings: LLMAPIEmbeddings) -> None:
    vectors = await embeddings.aembed_documents(TEXTS)
    for got, expected in zip(vectors, embeddings.embed_documents(TEXTS), strict=True):
        assert got == pytest.approx(expected, abs=1e-6)
    assert await embeddings.aembed_query("x") == pytest.approx(vectors[2], abs=1e-6)
    assert await embeddings.aembed_documents([]) == []


def test_unknown_model(llm_api_server: ServerProcess) -> None:
    embeddings = LLMAPIEmbeddings(**llm_api_server.client_params(), model="nope")
    with pytest.raises(NotFoundError, match="nope"):
        embeddings.embed_query("x")


class TestLLMAPIEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[LLMAPIEmbeddings]:
        return LLMAPIEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, object]:
        return {"base_url": "http://127.0.0.1:8000", "model": "tiny"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, object],
                                            dict[str, object]]:
        return ({"LLM_API_KEY": "sk-env", "LLM_API_BASE_URL": "http://10.0.0.1:9000"},
                {"model": "tiny"},
                {"api_key": "sk-env", "base_url": "http://10.0.0.1:9000", "model": "tiny"})


class TestLLMAPIEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @pytest.fixture(autouse=True)
    def _server(self, llm_api_server: ServerProcess) -> None:
        self.server = llm_api_server

    @property
    def embeddings_class(self) -> type[LLMAPIEmbeddings]:
        return LLMAPIEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, object]:
        return {**self.server.client_params(), "model": "tiny"}
