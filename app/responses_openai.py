"""Response objects of the OpenAI-compatible API, in OpenAI's exact shapes."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from backends.base import Chunk, TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV cells were reused from "
                               "a cache or another request instead of computed.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """prompt_tokens_details only from a backend that counts cached tokens."""
        data: dict[str, Any] = handler(self)
        if data.get("prompt_tokens_details") is None:
            data.pop("prompt_tokens_details", None)
        return data

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int | None = None) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion,
                   prompt_tokens_details=None if cached is None
                   else PromptTokensDetails(cached_tokens=cached))

    @classmethod
    def of_results(cls, finals: list[Chunk | None], n: int = 1) -> Usage:
        """Completion tokens of every choice; prompt tokens once per prompt (choices come
        `n` per prompt, so every n-th one starts a prompt)."""
        firsts = [f for f in finals[::n] if f is not None]
        prompt = sum(f.prompt_tokens or 0 for f in firsts)
        cached = None if all(f.cached_tokens is None for f in firsts) \
            else sum(f.cached_tokens or 0 for f in firsts)
        return cls.of(prompt, sum(f.completion_tokens or 0 for f in finals if f is not None),
                      cached)


Piece = bytes  # TopLogprob has a field named `bytes`


def _text(piece: Piece) -> str:
    return piece.decode("utf-8", errors="replace")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]

    @classmethod
    def of(cls, piece: Piece, logprob: float) -> TopLogprob:
        return cls(token=_text(piece), logprob=logprob, bytes=list(piece))


class TokenInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Chat's `choices[].logprobs`."""

    content: list[TokenInfo]
    refusal: None = None

    @classmethod
    def of(cls, scored: list[TokenLogprob], wanted: bool) -> ChoiceLogprobs | None:
        if not wanted:
            return None
        return cls(content=[TokenInfo(**TopLogprob.of(t.piece, t.logprob).model_dump(),
                                      top_logprobs=[TopLogprob.of(*alt) for alt in t.top])
                            for t in scored])


class CompletionLogprobs(BaseModel):
    """Text completions' `choices[].logprobs` (the legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, scored: list[TokenLogprob], wanted: bool,
           offset: int = 0) -> CompletionLogprobs | None:
        if not wanted:
            return None
        tokens = [_text(t.piece) for t in scored]
        offsets = [offset + sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]
        return cls(tokens=tokens, token_logprobs=[t.logprob for t in scored],
                   top_logprobs=[{_text(p): lp for p, lp in t.top} for t in scored],
                   text_offset=offsets)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object as text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """tool_calls and reasoning_content only when there are any (as OpenAI sends)."""
        data: dict[str, Any] = handler(self)
        for name in ("tool_calls", "reasoning_content"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


class ChunkChoice(BaseModel):
    index: int
    # {"role", "content"} first, {"content"} or {"tool_calls": [...]} next, {} last
    delta: dict[str, Any]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: None = None


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    """Both the whole answer and a streamed chunk of /v1/completions (OpenAI uses one shape)."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    system_fingerprint: None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str

    @classmethod
    def of(cls, index: int, vector: list[float], encoding: str) -> Embedding:
        if encoding == "base64":  # little-endian float32, as OpenAI sends them
            packed = struct.pack(f"<{len(vector)}f", *vector)
            return cls(index=index, embedding=base64.b64encode(packed).decode("ascii"))
        return cls(index=index, embedding=vector)


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-api"
    # Extensions (the SDK keeps unknown fields): what the model can do and its state.
    family: str
    state: str
    capabilities: list[str]
    context_length: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
