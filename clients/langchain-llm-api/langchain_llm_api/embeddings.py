"""`LLMAPIEmbeddings`: LangChain embeddings over the server's `/embeddings`."""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import ConfigDict, Field

from langchain_llm_api._connection import Connection


class LLMAPIEmbeddings(Connection, Embeddings):
    """Vectors from an llm-api server.

    `embed_documents` sends the texts in requests of at most `batch_size` texts (the
    server accepts up to `server.max_embedding_inputs`, 256 by default).

    ```python
    from langchain_llm_api import LLMAPIEmbeddings

    embeddings = LLMAPIEmbeddings(base_url="http://localhost:8000")
    vectors = embeddings.embed_documents(["first text", "second text"])
    ```
    """

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    model: str | None = None
    """Served model name; None = the server's first model."""
    batch_size: int = Field(64, ge=1)
    """Most texts per request."""

    def _body(self, text: str | list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text}
        if self.model is not None:
            body["model"] = self.model
        return body

    def _batches(self, texts: list[str]) -> list[list[str]]:
        return [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for batch in self._batches(list(texts)):
            vectors.extend(_vectors(self._post("/embeddings", self._body(batch)), len(batch)))
        return vectors

    def embed_query(self, text: str) -> list[float]:
        return _vector(self._post("/embeddings", self._body(text)))

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for batch in self._batches(list(texts)):
            answer = await self._apost("/embeddings", self._body(batch))
            vectors.extend(_vectors(answer, len(batch)))
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        return _vector(await self._apost("/embeddings", self._body(text)))


def _vector(value: Any) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(x, int | float) for x in value):
        raise TypeError("/embeddings did not answer a vector of numbers")
    return [float(x) for x in value]


def _vectors(value: Any, expected: int) -> list[list[float]]:
    if not isinstance(value, list):
        raise TypeError("/embeddings did not answer a list of vectors")
    if len(value) != expected:
        raise TypeError(f"/embeddings answered {len(value)} vectors for {expected} texts")
    return [_vector(v) for v in value]
