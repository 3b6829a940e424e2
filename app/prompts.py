"""A request's prompt on its way to the engine: bounded in characters here, then readied
once where the model runs (`engine.ops.prepare`: templated, tokenized, clamped, its grammar
checked).

A prompt longer than `server.max_prompt_chars_per_token` characters per token of the
model's context is refused before anything tokenizes it. Otherwise its ids travel with the
request (`GenerationRequest.prompt_ids`): the token reservation counts them and the engine
feeds them, so a long prompt costs the decode loop nothing before its prefill.
"""

from __future__ import annotations

import json
from dataclasses import replace

from backends.base import GenerationRequest
from backends.errors import ContextLengthExceeded
from engine.client import EngineClient
from engine.ops import Prepared


class PromptTooLong(ContextLengthExceeded):
    """More characters than any prompt that fits the context needs: refused before anything
    tokenizes it (tokenizing a megabyte costs about a second of CPU)."""

    def __init__(self, model: EngineClient, chars: int, context: int, param: str) -> None:
        # As much as the context holds, so nothing clamps max_tokens to fit it.
        super().__init__(prompt_tokens=context, max_tokens=0, context_length=context,
                         param=param)
        per_token = model.limits.prompt_chars_per_token
        self.message = (
            f"'{param}' has {chars} characters; model '{model.name}' accepts at most "
            f"{per_token * context} ({per_token} per token of its {context}-token context, "
            "server.max_prompt_chars_per_token). Shorten it.")
        self.args = (self.message,)


def prompt_chars(request: GenerationRequest) -> int:
    """What the template renders: the messages' text, their calls' arguments and the tool
    definitions count too."""
    if request.messages is not None:
        chars = sum(len(str(m.get("content") or "")) for m in request.messages)
        chars += sum(len(call["function"]["arguments"]) for m in request.messages
                     for call in m.get("tool_calls") or ())
        if request.tools:
            chars += len(json.dumps(request.tools))
        return chars
    return len(request.prompt or "") + len(request.params.suffix or "")


def bound_chars(model: EngineClient, chars: int, param: str) -> None:
    """Refuse more than server.max_prompt_chars_per_token characters per token of the
    model's context (no bound for a model without one)."""
    context = model.info.context_length
    if context is not None and chars > model.limits.prompt_chars_per_token * context:
        raise PromptTooLong(model, chars, context, param)


def bound_texts(model: EngineClient, texts: list[str], param: str) -> None:
    for i, text in enumerate(texts):
        bound_chars(model, len(text), f"{param}[{i}]" if len(texts) > 1 else param)


def reusing_ids(previous: GenerationRequest | None,
                 request: GenerationRequest) -> GenerationRequest:
    """`request` with `previous`'s prompt ids when its prompt is the same (the `n` choices
    of one prompt are tokenized once)."""
    if previous is None or previous.prompt_ids is None or request.prompt_ids is not None:
        return request
    if (previous.prompt, previous.messages, previous.params.suffix) != \
            (request.prompt, request.messages, request.params.suffix):
        return request
    return replace(request, prompt_ids=previous.prompt_ids)


class PreparedPrompt:
    """A request readied by its model on first need, once: for the token reservation during
    admission, or for the engine after it. With `clamp`, a max_tokens the context has no
    room for is lowered to what it leaves (`clamped`)."""

    def __init__(self, model: EngineClient, request: GenerationRequest, clamp: bool) -> None:
        self.model = model
        self.clamp = clamp
        self._request = request
        self._prepared: Prepared | None = None

    @property
    def clamped(self) -> int | None:
        return self._prepared.clamped if self._prepared is not None else None

    async def prepared(self) -> Prepared:
        if self._prepared is None:
            self._prepared = await self.model.prepare(self._request, self.clamp)
        return self._prepared

    async def request(self) -> GenerationRequest:
        return (await self.prepared()).request

    async def reservation(self) -> int:
        """Prompt + completion tokens to reserve."""
        return (await self.prepared()).reservation
