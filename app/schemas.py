"""Request schemas of the native API. Each turns itself into backend words (`to_request`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from app.json_types import json_type_error
from backends.base import GenerationParams, GenerationRequest

MAX_STOP_SEQUENCES = 16
#: A stop string: 1 to 500 characters.
StopString = Annotated[str, Field(min_length=1, max_length=500)]
#: `stop` of every API: one stop string, or a list of at most MAX_STOP_SEQUENCES.
Stops = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None

#: Characters of one text field (a prompt, a message, a suffix); a model's own bound is
#: usually lower (server.max_prompt_chars_per_token x its context).
MAX_TEXT_CHARS = 1_000_000


class StrictSchema(BaseModel):
    """Unknown fields are rejected with the list of the allowed ones, and a field's value
    must have a JSON type its schema declares (see `json_type_error`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = [f.alias or name for name, f in cls.model_fields.items()]
            unknown = sorted(str(k) for k in data if k not in allowed)
            if unknown:
                raise ValueError(f"unknown parameter(s): {', '.join(unknown)}; allowed: "
                                 f"{', '.join(allowed)}")
            if (wrong := json_type_error(cls, data)):
                raise ValueError(wrong)
        return data


class NativeParams(StrictSchema):
    """Sampling parameters of /generate and /agenerate (llama.cpp's names)."""

    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Most tokens to "
                                   "generate; default: what the context leaves room for.")
    temperature: float = Field(0.8, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(0.95, ge=0, le=1)
    top_k: int = Field(40, ge=0, le=100_000, description="0 = disabled.")
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: Stops = Field(None, description="Up to 16 strings; generation ends before the "
                        "first one and it is not returned.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Fixed seed for sampling.")
    echo: bool = Field(False, description="Return the prompt before the completion.")
    suffix: str | None = Field(None, max_length=MAX_TEXT_CHARS,
                               description="Text after the gap to fill (fill-in-the-middle "
                               "models only); the completion is the middle part.")

    def to_params(self) -> GenerationParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=stop, seed=self.seed, echo=self.echo, suffix=self.suffix)


class GenerateRequest(StrictSchema):
    """Body of /generate and /agenerate."""

    prompt: str = Field(max_length=MAX_TEXT_CHARS, description="The text to continue.")
    params: NativeParams | None = Field(None, description="Sampling parameters.")
    model: str | None = Field(None, max_length=200, description="Model name; default: the "
                              "first configured model.")

    def to_request(self) -> GenerationRequest:
        return GenerationRequest(prompt=self.prompt,
                                 params=(self.params or NativeParams()).to_params())


class EmbeddingsRequest(StrictSchema):
    """Body of /embeddings: one text, or a list of texts."""

    text: Annotated[str | list[str], WithJsonSchema({"anyOf": [  # `_bounded_texts`'s rule
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]})] \
        = Field(description="A text, or a list of texts.")
    model: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _bounded_texts(self) -> EmbeddingsRequest:
        texts = [self.text] if isinstance(self.text, str) else self.text
        if isinstance(self.text, list) and not texts:
            raise ValueError("text must not be an empty list")
        if sum(len(t) for t in texts) > MAX_TEXT_CHARS:
            raise ValueError(f"texts hold more than {MAX_TEXT_CHARS} characters in total")
        return self

    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)
