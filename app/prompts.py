"""A request's prompt on its way to the engine: bounded in characters, then templated and
tokenized once, on the model's tokenizer thread rather than its engine thread.

A prompt longer than `server.max_prompt_chars_per_token` characters per token of the
model's context is refused before anything tokenizes it. Otherwise its ids travel with the
request (`GenerationRequest.prompt_ids`): the token reservation counts them and the engine
feeds them, so a long prompt costs the decode loop nothing before its prefill.
"""

from __future__ import annotations

from dataclasses import replace

from app.scheduler import ModelScheduler
from backends.base import CHAT, TOKENIZE, Backend, GenerationRequest
from backends.errors import ContextLengthExceeded


class PromptTooLong(ContextLengthExceeded):
    """More characters than any prompt that fits the context needs: refused before anything
    tokenizes it (tokenizing a megabyte costs about a second of CPU)."""

    def __init__(self, scheduler: ModelScheduler, chars: int, context: int, param: str) -> None:
        # As much as the context holds, so nothing clamps max_tokens to fit it.
        super().__init__(prompt_tokens=context, max_tokens=0, context_length=context,
                         param=param)
        per_token = scheduler.prompt_chars_per_token
        self.message = (
            f"'{param}' has {chars} characters; model '{scheduler.name}' accepts at most "
            f"{per_token * context} ({per_token} per token of its {context}-token context, "
            "server.max_prompt_chars_per_token). Shorten it.")
        self.args = (self.message,)


def prompt_chars(request: GenerationRequest) -> int:
    if request.messages is not None:
        return sum(len(str(m.get("content", ""))) for m in request.messages)
    return len(request.prompt or "") + len(request.params.suffix or "")


def bound_chars(scheduler: ModelScheduler, chars: int, param: str) -> None:
    """Refuse more than server.max_prompt_chars_per_token characters per token of the
    model's context (no bound for a model without one)."""
    backend = scheduler.backend
    context = backend.context_length if backend is not None else None
    if context is not None and chars > scheduler.prompt_chars_per_token * context:
        raise PromptTooLong(scheduler, chars, context, param)


def bound_texts(scheduler: ModelScheduler, texts: list[str], param: str) -> None:
    for i, text in enumerate(texts):
        bound_chars(scheduler, len(text), f"{param}[{i}]" if len(texts) > 1 else param)


async def with_prompt_ids(scheduler: ModelScheduler,
                          request: GenerationRequest) -> GenerationRequest:
    """`request` with its prompt templated and tokenized on the model's tokenizer thread,
    so the engine thread neither waits for that nor does it again; unchanged when it has
    its ids already or the backend tokenizes on its engine thread only."""
    backend = scheduler.backend
    if request.prompt_ids is not None or backend is None or not backend.tokenizes_off_engine \
            or TOKENIZE not in backend.capabilities:
        return request
    ids = await scheduler.call_tokenizer(lambda b: b.prompt_tokens(request))
    return replace(request, prompt_ids=tuple(ids))


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
    """A request whose prompt is tokenized on first need, once: for the token reservation
    during admission, or for the engine after it. With `clamp`, a max_tokens the context has
    no room for is lowered to what it leaves (`clamped`)."""

    def __init__(self, scheduler: ModelScheduler, request: GenerationRequest,
                 clamp: bool) -> None:
        self.scheduler = scheduler
        self.clamp = clamp
        self.clamped: int | None = None
        self._request = request
        self._tokenized = False

    async def request(self) -> GenerationRequest:
        if not self._tokenized:
            self._request = await with_prompt_ids(self.scheduler, self._request)
            self._tokenized = True
            if self.clamp:
                self._request = self._clamp(self._request)
        return self._request

    def _clamp(self, request: GenerationRequest) -> GenerationRequest:
        backend, wanted = self.scheduler.backend, request.params.max_tokens
        context = backend.context_length if backend is not None else None
        if request.prompt_ids is None or context is None or wanted is None:
            return request
        room = context - len(request.prompt_ids)
        if room <= 0 or wanted <= room:  # the prompt alone fills the context, or it fits
            return request
        self.clamped = room
        return replace(request, params=replace(request.params, max_tokens=room))

    async def reservation(self) -> int:
        """Prompt + completion tokens to reserve (see `reservation`)."""
        request = await self.request()
        if request.prompt_ids is None:  # the backend tokenizes on its engine thread only
            tokens: int = await self.scheduler.call(lambda b: reservation(b, request))
            return tokens
        return reservation(self.scheduler.backend, request)


def reservation(backend: Backend | None, request: GenerationRequest) -> int:
    """Prompt tokens + the most completion tokens the request may produce. Without
    `prompt_ids` it tokenizes: call it on the engine thread then."""
    prompt = 0
    if request.prompt_ids is not None:
        prompt = len(request.prompt_ids)
    elif backend is not None and TOKENIZE in backend.capabilities:
        if request.messages is not None:
            if CHAT in backend.capabilities:
                text = backend.apply_chat_template(request.messages)
                prompt = len(backend.tokenize(text, add_special=False))
        else:
            prompt = len(backend.tokenize(request.prompt or ""))
            if request.params.suffix is not None:
                prompt += len(backend.tokenize(request.params.suffix, add_special=False)) + 3
    room = backend.context_length if backend is not None else None
    completion = request.params.max_tokens
    if completion is None:
        completion = max(0, room - prompt) if room is not None else 0
    return prompt + completion
