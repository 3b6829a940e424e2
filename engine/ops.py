"""The calls the API makes on a model besides generating and embedding, by name.

They cross the process boundary as a name and arguments (`CALLS`), and run where the
model is, on its tokenizer thread. `prepare` is the one place where a generation request is
readied for the engine: `default_max_tokens` applied, the prompt templated and tokenized,
the queue-style clamp done, its JSON grammar written and checked, and the tokens to reserve
counted — once per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from backends.base import CHAT, TOKENIZE, Backend, GenerationRequest
from backends.grammar import GrammarLimits, prepare_grammar


@dataclass(frozen=True)
class ModelLimits:
    """A model's serving settings that the engine side applies (from its config entry)."""

    max_queue: int = 16
    request_timeout: float = 300.0
    default_max_tokens: int | None = None
    prompt_chars_per_token: int = 8
    grammar: GrammarLimits = field(default_factory=GrammarLimits)


@dataclass(frozen=True)
class Prepared:
    """A generation request as the engine will run it, and what admission needs to know."""

    request: GenerationRequest
    reservation: int  # prompt tokens + the most completion tokens it may produce
    clamped: int | None = None  # the lowered max_tokens, when `clamp` lowered it


def prepare(backend: Backend, limits: ModelLimits, request: GenerationRequest,
            clamp: bool) -> Prepared:
    """Ready `request` for the engine. With `clamp`, a max_tokens the context has no room
    for is lowered to what it leaves (the queue-style routes) instead of failing later."""
    if request.params.max_tokens is None and limits.default_max_tokens is not None:
        request = replace(request, params=replace(request.params,
                                                  max_tokens=limits.default_max_tokens))
    if request.prompt_ids is None and TOKENIZE in backend.capabilities:
        request = replace(request, prompt_ids=tuple(backend.prompt_tokens(request)))
    clamped = None
    context, wanted = backend.context_length, request.params.max_tokens
    if clamp and request.prompt_ids is not None and context is not None and wanted is not None:
        room = context - len(request.prompt_ids)
        if 0 < room < wanted:  # else the prompt alone fills the context, or it fits
            clamped = room
            request = replace(request, params=replace(request.params, max_tokens=room))
    params = request.params
    if params.json_mode or params.json_schema is not None or params.tool_choice is not None:
        vocab = getattr(backend, "vocab", None)  # llama.cpp's parser reads it
        request = replace(request, params=prepare_grammar(
            params, limits.grammar, vocab, request.tools, backend.tool_format))
    return Prepared(request, reservation(backend, request), clamped)


def reservation(backend: Backend, request: GenerationRequest) -> int:
    """Prompt tokens + the most completion tokens the request may produce."""
    prompt = 0
    if request.prompt_ids is not None:
        prompt = len(request.prompt_ids)
    elif TOKENIZE in backend.capabilities and request.messages is not None \
            and CHAT in backend.capabilities:
        prompt = len(backend.tokenize(backend.chat_prompt(request.messages, request.tools,
                                                          request.template_kwargs),
                                      add_special=False))
    elif TOKENIZE in backend.capabilities and request.messages is None:
        prompt = len(backend.tokenize(request.prompt or ""))
        if request.params.suffix is not None:
            prompt += len(backend.tokenize(request.params.suffix, add_special=False)) + 3
    room = backend.context_length
    completion = request.params.max_tokens
    if completion is None:
        completion = max(0, room - prompt) if room is not None else 0
    return prompt + completion


def tokenize(backend: Backend, limits: ModelLimits, text: str | None,
             messages: list[dict[str, str]] | None, add_special: bool) -> list[int]:
    if messages is not None:  # the template writes the special tokens itself
        return backend.tokenize(backend.chat_prompt(messages), add_special=False)
    return backend.tokenize(text or "", add_special=add_special)


def detokenize(backend: Backend, limits: ModelLimits, ids: list[int]) -> str:
    return backend.detokenize(ids)


def detokenize_all(backend: Backend, limits: ModelLimits, ids: list[list[int]]) -> list[str]:
    return [backend.detokenize(one) for one in ids]


def count_tokens(backend: Backend, limits: ModelLimits, texts: list[str]) -> int:
    if TOKENIZE not in backend.capabilities:
        return 0
    return sum(len(backend.tokenize(text)) for text in texts)


CALLS: dict[str, Callable[..., Any]] = {
    "prepare": prepare, "tokenize": tokenize, "detokenize": detokenize,
    "detokenize_all": detokenize_all, "count_tokens": count_tokens,
}
