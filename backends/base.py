"""The backend contract: what every model family implements.

A backend is used from exactly one thread at a time (its model's engine thread), so it may
wrap engines that are not thread-safe. Generation is stream-first: a non-streaming answer is
the collected stream, so there is one code path.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.errors import CapabilityNotSupported, LLMAPIError

GENERATE = "generate"
CHAT = "chat"
EMBED = "embed"
TOKENIZE = "tokenize"
#: Output constrained to JSON (any object, or one matching a JSON schema).
JSON_OUTPUT = "json_output"
#: Per-token log-probabilities of the generated text (and the likeliest alternatives).
LOGPROBS = "logprobs"
#: Function tools rendered by the chat template (`apply_chat_template(..., tools=)`).
TOOLS = "tools"


@dataclass(frozen=True)
class GenerationParams:
    """Backend words for sampling; every API schema turns itself into one of these."""

    max_tokens: int | None = None  # None: as many as the context leaves room for
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    echo: bool = False
    suffix: str | None = None
    # Constrained output (backends with the JSON_OUTPUT capability): any JSON value when
    # `json_mode`, a value matching `json_schema` when set. Others reject the request.
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None
    # The output must be calls of these tools (tool_choice "required": every tool given;
    # a named function: that one), in the model's tool-call format (backends.toolcalls);
    # None: free text, calls parsed from it if the model makes any.
    tool_choice: tuple[str, ...] | None = None
    parallel_tool_calls: bool = True  # several calls in one answer
    # The GBNF of json_mode/json_schema/tool_choice, written and checked before admission
    # (backends.grammar.prepare_grammar); None: the engine writes it itself.
    grammar: str | None = None
    # None: no log-probabilities; k >= 0: each generated token's log-probability under the
    # model (before sampling settings) and the k likeliest tokens at that step (LOGPROBS).
    logprobs: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt (or chat messages) plus the parameters to generate with."""

    prompt: str | None = None
    # OpenAI-shaped chat messages: role, content, and an assistant's tool_calls (arguments
    # as objects, as chat templates expect) or a tool result's tool_call_id.
    messages: tuple[dict[str, Any], ...] | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    # Function tools ({"type": "function", "function": {name, description, parameters}}),
    # rendered by the chat template (a backend with the TOOLS capability).
    tools: tuple[dict[str, Any], ...] | None = None
    # Extra variables of the chat template (e.g. enable_thinking: false).
    template_kwargs: dict[str, Any] | None = None
    # The prompt as the engine feeds it (template applied, tokenized), when the server
    # tokenized it off the engine thread; None: the backend tokenizes it itself.
    prompt_ids: tuple[int, ...] | None = None
    # Sequences share cached prompt prefixes only within one scope (by default the API key:
    # a key must not learn from cached_tokens or timing what another key's prompts say).
    cache_scope: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its bytes, log-probability and the likeliest alternatives."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """One piece of a generation stream.

    The first chunk a backend yields may carry empty text: it signals that the prompt was
    accepted (checked against the context) so the server can commit to a streaming response.
    The last chunk carries `finish_reason` ("stop" or "length") and the token counts.
    """

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # With params.logprobs: the tokens generated since the previous chunk (their text may
    # arrive in a later chunk while a stop string is being matched).
    logprobs: tuple[TokenLogprob, ...] = ()
    # Of prompt_tokens, those whose KV cells were reused or copied instead of computed.
    cached_tokens: int | None = None


class ModelParams(BaseModel):
    """Base of each family's `model_params` schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ChatParams(ModelParams):
    """`model_params` a family with chat templates shares: how its answers are read."""

    tool_format: Literal["auto", "hermes", "llama3", "mistral", "json"] = Field(
        "auto", description="How the model writes tool calls: auto (read from the chat "
        "template: <tool_call> hermes/Qwen, <|python_tag|> llama3, [TOOL_CALLS] mistral; a "
        "template without tools gets them in its system prompt and answers in json).")
    reasoning_format: Literal["auto", "none", "think"] = Field(
        "auto", description="Where the model's reasoning goes: auto (a template that writes "
        "<think> blocks: their text becomes reasoning_content), think (always split "
        "<think>…</think>), none (everything is content).")


@dataclass(frozen=True)
class ModelSpec:
    """What a loader gets: the model's name, its validated params and its local files."""

    name: str
    params: ModelParams
    path: Path | None  # the weights file or snapshot directory, None for plugins without files
    setup_params: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: Path | None = None  # setup_params.tokenizer_repo_id's snapshot, if set


class Backend(abc.ABC):
    """Base class of a model family.

    Subclasses set `Params` (their `model_params` schema) and `capabilities`, implement
    `load` and the methods their capabilities promise.
    """

    family: ClassVar[str] = ""
    Params: ClassVar[type[ModelParams]] = ModelParams
    capabilities: frozenset[str] = frozenset({GENERATE})
    #: `model_params.tool_format` when set (else the chat template tells: `tool_format`).
    tool_format_override: str | None = None
    #: `model_params.reasoning_format`: auto, none or think (see `reasoning`).
    reasoning_format: str = "auto"
    #: "file": the weights are one file from the hub (`filename`); "snapshot": the needed
    #: files of a whole repository (config, tokenizer, weights); None: no files at all.
    weights: ClassVar[str | None] = "file"
    #: The family-specific `setup_params` keys this family reads (see app.settings).
    setup_keys: ClassVar[frozenset[str]] = frozenset()
    #: True when `tokenize`, `detokenize`, `apply_chat_template` and `prompt_tokens` may run
    #: on another thread while the engine thread generates (they only read the vocabulary
    #: and the template). The server then tokenizes off the engine thread, so a long prompt
    #: never holds up the streams being decoded; otherwise it asks the engine thread.
    tokenizes_off_engine: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def load(cls, spec: ModelSpec) -> Backend:
        """Load the model. Runs in the model's engine thread."""

    @property
    def context_length(self) -> int | None:
        """Tokens the context holds (prompt + completion), None when unbounded."""
        return None

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Stream the completion. Raise domain errors before the first chunk."""

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise CapabilityNotSupported(f"Model family '{self.family}' does not produce embeddings.")

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        raise CapabilityNotSupported(f"Model family '{self.family}' does not tokenize.")

    def detokenize(self, ids: list[int]) -> str:
        raise CapabilityNotSupported(f"Model family '{self.family}' does not detokenize.")

    def apply_chat_template(self, messages: Iterable[dict[str, Any]]) -> str:
        """The prompt of chat `messages`; a backend with the TOOLS capability also takes
        `tools=` (a list of function tools) and renders them with its template."""
        raise CapabilityNotSupported(f"Model family '{self.family}' has no chat template.")

    @property
    def chat_template_text(self) -> str | None:
        """The Jinja text of the template `apply_chat_template` renders; None when the family
        does not expose one (its template is then trusted to render `tools` itself)."""
        return None

    @functools.cached_property
    def tool_format(self) -> str:
        """How this model writes tool calls (a name of backends.toolcalls.FORMATS): from
        `model_params.tool_format`, else what its chat template teaches; a template without
        tools gets them as a system prompt asking for json (backends.chat_messages)."""
        if self.tool_format_override:
            return self.tool_format_override
        from backends.chat_messages import template_reads_tools
        from backends.toolcalls import detect_format

        template = self.chat_template_text
        if template is None or not template_reads_tools(template):
            return "json"
        return detect_format(template)

    @functools.cached_property
    def reasoning(self) -> dict[str, Any] | None:
        """How the model's reasoning is told apart from its answer: {"open", "close": its
        think markers, "opened": the prompt itself opens the block (the output starts
        inside it)}; None: it is all answer."""
        template = self.chat_template_text or ""
        if self.reasoning_format == "none" or (
                self.reasoning_format == "auto" and "<think>" not in template):
            return None
        opened = False
        try:
            prompt = self.apply_chat_template([{"role": "user", "content": "?"}])
            opened = prompt.rstrip().endswith("<think>")
        except Exception:  # noqa: BLE001 - a template that needs more; assume not opened
            opened = False
        return {"open": "<think>", "close": "</think>", "opened": opened}

    def chat_prompt(self, messages: Iterable[dict[str, Any]],
                    tools: Iterable[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> str:
        """The chat template's prompt of `messages` made template-ready, with `tools` when
        there are any: rendered by the template when it reads `tools` (a family without
        tools keeps the one-argument `apply_chat_template`), else described in the system
        message (backends.chat_messages)."""
        from backends.chat_messages import render_chat, with_nine_char_ids

        if tools and self.tool_format == "mistral":  # its templates refuse other call ids
            messages = with_nine_char_ids(messages)
        render: Any = self.apply_chat_template
        if template_kwargs:
            render = functools.partial(render, **template_kwargs)
        return render_chat(render, self.chat_template_text, messages, list(tools or ()))

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The token ids the engine feeds for the request: its `prompt_ids` when the server
        tokenized it already, else the chat template's text (which writes the special
        tokens, BOS included, itself) or the prompt with BOS, tokenized."""
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        if request.params.suffix is not None:
            raise CapabilityNotSupported(f"'suffix' (fill-in-the-middle) is not supported by "
                                         f"model family '{self.family}'.", param="suffix")
        if request.messages is not None:
            return self.tokenize(self.chat_prompt(request.messages, request.tools,
                                                  request.template_kwargs),
                                 add_special=False)
        return self.tokenize(request.prompt or "")

    def batch_engine(self) -> BatchEngine | None:
        """The engine that decodes many sequences together, None to serve `generate` one
        request at a time. Called once, in the engine thread, after `load`."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the engine's memory. Called once, in the engine thread."""

    def engine_stats(self) -> dict[str, int]:
        """Figures of the engine for /ready and /metrics, e.g. kv_cells_used,
        kv_cells_total, prefix_reused_tokens. Called from other threads: read counters,
        never call into the engine."""
        return {}


class BatchEngine(abc.ABC):
    """Many sequences decoded together on the model's engine thread; the scheduler drives it.

    All methods are called from the engine thread only. A sequence is known by the `key` the
    scheduler gave it in `admit` until a chunk with `finish_reason`, an error, or `cancel`
    retires it.
    """

    #: Admission bound: sequences decoded together (e.g. model_params.parallel).
    max_sequences: int = 1
    #: True when `step` calls `before_decode` right before its blocking decode call.
    calls_before_decode: bool = False

    def before_decode(self) -> None:
        """Set by the scheduler; an engine with `calls_before_decode` calls it right before
        the decode call that releases the GIL. The scheduler hands the previous step's chunks
        to the event loop then: the loop runs while the decode does, instead of waking while
        the engine thread still holds the GIL and waiting for it."""
        return None

    @abc.abstractmethod
    def admit(self, key: int, request: GenerationRequest) -> Chunk:
        """Validate (raise LLMAPIError subclasses, e.g. ContextLengthExceeded with the
        per-sequence limit), tokenize and queue the prompt. Returns the "accepted" chunk
        (prompt_tokens set), exactly like `Backend.generate`'s first chunk."""

    @abc.abstractmethod
    def step(self) -> list[tuple[int, Chunk | LLMAPIError]]:
        """One decode step for every running sequence (plus capped prompt chunks of new
        ones). Returns the chunks produced, in order; a chunk with `finish_reason` retires its
        sequence, an LLMAPIError retires that sequence only."""

    @abc.abstractmethod
    def cancel(self, key: int) -> None:
        """Retire the sequence now and free its slot (its KV cells are removed)."""

    @abc.abstractmethod
    def active(self) -> int:
        """Sequences admitted and not retired."""


class AlgorithmBackend(Backend):
    """Adapter for an existing "algorithm" class with a `run(text)` method.

    `run` may return a string (sent as one piece) or an iterable of strings (streamed).
    Build a family with `AlgorithmBackend.wrap(MyAlgorithm)`; the algorithm's constructor gets
    the model's `model_params` as keyword arguments.
    """

    weights: ClassVar[str | None] = None
    algorithm: ClassVar[Callable[..., Any]]

    class Params(ModelParams):
        model_config = ConfigDict(extra="allow")

    def __init__(self, instance: Any) -> None:
        self.instance = instance

    @classmethod
    def wrap(cls, algorithm: Callable[..., Any], family: str | None = None) -> type[Backend]:
        name = family or getattr(algorithm, "__name__", "algorithm").lower()
        return type(f"{name.title()}Backend", (cls,), {"algorithm": algorithm, "family": name})

    @classmethod
    def load(cls, spec: ModelSpec) -> Backend:
        return cls(cls.algorithm(**spec.params.model_dump()))

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        if request.prompt is None:
            raise CapabilityNotSupported(f"Model family '{self.family}' takes a plain prompt only.")
        yield Chunk()
        result = self.instance.run(request.prompt)
        pieces = [result] if isinstance(result, str) else result
        count = 0
        for piece in pieces:
            count += 1
            yield Chunk(text=str(piece))
        yield Chunk(finish_reason="stop", prompt_tokens=0, completion_tokens=count)

    def close(self) -> None:
        closer = getattr(self.instance, "close", None)
        if callable(closer):
            closer()
