"""Domain errors a backend may raise.

They carry no HTTP knowledge: `app/errors.py` maps every one of them to a status code and
the common error body in a single table.
"""

from __future__ import annotations


class LLMAPIError(Exception):
    """Base of every error the server explains to a client.

    `message` is shown to the client as is, so it must never contain secrets, paths of the
    server's file system, or an engine's raw message.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(LLMAPIError):
    """The request is well-formed JSON but asks for something that cannot be done."""


class ContextLengthExceeded(InvalidRequest):
    """Prompt tokens plus requested completion tokens do not fit the model's context."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, context_length: int,
                 param: str = "prompt", sequences: int = 1) -> None:
        total = prompt_tokens + max_tokens
        holds = f"This model's context holds {context_length} tokens" + (
            f" per sequence ({sequences} sequences run in parallel)" if sequences > 1 else "")
        super().__init__(
            f"{holds}, but the request needs "
            f"{total} ({prompt_tokens} in the prompt + {max_tokens} for the completion). "
            "Shorten the prompt or lower max_tokens.",
            param=param,
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class CapabilityNotSupported(InvalidRequest):
    """The model's backend does not offer what the request needs (e.g. embeddings)."""


class BackendFailure(LLMAPIError):
    """The engine failed. The client sees a generic message; the cause goes to the log."""

    def __init__(self, message: str = "The model backend failed while handling the request; "
                 "the server log has the details.") -> None:
        super().__init__(message)


class ModelLoadError(LLMAPIError):
    """A model could not be fetched or loaded (bad file, hub error, disk full)."""
