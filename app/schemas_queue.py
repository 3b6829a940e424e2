"""Request schemas of the queue-style shapes (clients of a RabbitMQ/Redis LLM gateway) and of
/tokenize and /detokenize."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from app.schemas import MAX_STOP_SEQUENCES, MAX_TEXT_CHARS, StopString, StrictSchema
from app.schemas_openai import MAX_MESSAGES, ChatMessage
from backends.base import GenerationParams, GenerationRequest

# Printable ASCII: job ids go into a response header and the log as they are.
JOB_ID = re.compile(r"[\x21-\x7e]{1,200}")


class QueueMeta(StrictSchema):
    """Generation settings of a queue-style job."""

    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 0.8.")
    tokens_limit: int | None = Field(None, ge=1, le=1_000_000, description="Most tokens to "
                                     "generate; more than the context leaves is clamped (with "
                                     "a Warning header), not rejected.")
    stop_words: list[StopString] | None = Field(None, max_length=MAX_STOP_SEQUENCES,
                                                description="1 to 500 characters each.")
    model: str | None = Field(None, max_length=200, description="Default: the first model.")

    def to_params(self) -> GenerationParams:
        given: dict[str, Any] = {"temperature": self.temperature} \
            if self.temperature is not None else {}
        return GenerationParams(max_tokens=self.tokens_limit,
                                stop=tuple(self.stop_words or ()), **given)


class QueueJob(StrictSchema):
    job_id: str = Field(json_schema_extra={"pattern": f"^{JOB_ID.pattern}$"},
                        description="1 to 200 printable ASCII characters, no spaces; echoed "
                        "in X-Request-ID and the log.")
    priority: int | None = Field(None, ge=-1000, le=1000, description="Accepted; requests "
                                 "are served in arrival order.")
    source: str | None = Field(None, max_length=200, description="Logged.")
    meta: QueueMeta = Field(default_factory=QueueMeta)

    @field_validator("job_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not JOB_ID.fullmatch(value):
            raise ValueError("must be 1 to 200 printable ASCII characters without spaces")
        return value


class QueueChatRequest(QueueJob):
    """Body of POST /chat_completion."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)

    def to_request(self) -> GenerationRequest:
        return GenerationRequest(messages=tuple(m.as_dict() for m in self.messages),
                                 params=self.meta.to_params())


class QueueGenerateRequest(QueueJob):
    """The queue-style body of POST /generate."""

    content: str = Field(max_length=MAX_TEXT_CHARS, description="The text to continue.")

    def to_request(self) -> GenerationRequest:
        return GenerationRequest(prompt=self.content, params=self.meta.to_params())

    @staticmethod
    def matches(data: Any) -> bool:
        """Told apart from the classic {"prompt", "params"} body by its fields."""
        return isinstance(data, dict) and bool({"job_id", "meta", "content"} & set(data))


class TokenizeRequest(StrictSchema):
    """Body of POST /tokenize: a text, or chat messages rendered by the chat template."""

    # `_one_input`, as the OpenAPI document says it: exactly one of the two is given.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})

    model: str | None = Field(None, max_length=200)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special: bool = Field(True, description="Add BOS etc. to a text (messages: the "
                              "template decides).")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.text is None) == (self.messages is None):
            raise ValueError("send exactly one of 'text' and 'messages'")
        return self

    def message_dicts(self) -> list[dict[str, str]] | None:
        return None if self.messages is None else [m.as_dict() for m in self.messages]


class DetokenizeRequest(StrictSchema):
    """Body of POST /detokenize."""

    model: str | None = Field(None, max_length=200)
    tokens: list[int] = Field(max_length=1_000_000, description="Token ids.")
