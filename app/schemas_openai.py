"""Request schemas of the OpenAI-compatible API (/v1/*). Each turns itself into backend words.

Fields the official `openai` SDK and LangChain send are accepted; a value the server cannot
honour (logit_bias, dimensions, ...) is a 400 `unsupported_parameter` that
says what is supported, never silently ignored. Unknown fields are rejected with the list of
the allowed ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal, cast

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from app.errors import UnsupportedParameter
from app.json_types import MAX_EXACT_INT
from app.schemas import MAX_TEXT_CHARS, Stops, StrictSchema
from backends.base import GenerationParams, GenerationRequest
from backends.errors import InvalidRequest

MAX_CHOICES = 8  # most `n` per request; choices are generated one after the other
MAX_MESSAGES = 1000
MAX_CONTENT_PARTS = 1000  # text parts of one message
MAX_PROMPTS = 64  # texts of one completion request (prompts x n is bounded the same)
MAX_LOGIT_BIAS = 300  # OpenAI's bound; only an empty map is supported here anyway
MAX_TOOLS = 128  # OpenAI's bound
MAX_TOOL_CALLS = 128  # calls of one assistant message in the history
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
MODEL_DOC = "Model name (GET /v1/models lists them)."


class StreamOptions(StrictSchema):
    include_usage: bool = Field(False, description="Send a last chunk with the usage.")


class SamplingFields(StrictSchema):
    """What chat and text completions share."""

    model: str = Field(max_length=200, description=MODEL_DOC)
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; "
                                      "default 0.8.")
    top_p: float | None = Field(None, ge=0, le=1, description="Default 0.95.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: Stops = Field(None, description="Up to 16 strings; generation ends before the "
                        "first one and it is not returned.")
    seed: int | None = Field(None, ge=-MAX_EXACT_INT, le=MAX_EXACT_INT, description="Same "
                             "seed + same params → same text (taken modulo 2**32).")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Choices to generate "
                          f"(1 to {MAX_CHOICES}; one after the other; seed, seed+1, ...).")
    stream: bool | None = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="End-user id (logged only).")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Not supported: only null or {}.")
    # llama.cpp sampling words, as other OpenAI-compatible servers accept them.
    top_k: int | None = Field(None, ge=0, le=100_000, description="Extension; 0 = off.")
    min_p: float | None = Field(None, ge=0, le=1, description="Extension.")
    repeat_penalty: float | None = Field(None, gt=0, le=10, description="Extension.")

    def check_supported(self) -> None:
        if self.logit_bias:
            raise UnsupportedParameter("'logit_bias' is not supported; send null or {}.",
                                       param="logit_bias")

    def choices(self) -> int:
        return self.n or 1

    def sampling(self, max_tokens: int | None) -> GenerationParams:
        """The shared part of the internal parameters; unset fields keep their defaults."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        given: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p,
                 "presence_penalty": self.presence_penalty,
                 "frequency_penalty": self.frequency_penalty, "top_k": self.top_k,
                 "min_p": self.min_p, "repeat_penalty": self.repeat_penalty}
        seed = None if self.seed is None else self.seed % 2**32
        return GenerationParams(max_tokens=max_tokens, stop=stop, seed=seed,
                                **{k: v for k, v in given.items() if v is not None})

    def per_choice(self, request: GenerationRequest) -> list[GenerationRequest]:
        """One request per choice; with a seed, choice i uses seed + i."""
        seed = request.params.seed
        return [request if seed is None or i == 0 else
                replace(request, params=replace(request.params, seed=(seed + i) % 2**32))
                for i in range(self.choices())]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(StrictSchema):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(max_length=MAX_TEXT_CHARS)


class CalledFunction(StrictSchema):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_TEXT_CHARS, description="A JSON object as text.")


class MessageToolCall(StrictSchema):
    """A call in an assistant message of the history."""

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(StrictSchema):
    # `_consistent`, as the OpenAPI document says it (so generated requests obey it too).
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"role": {"const": "tool"}}},
         "then": {"required": ["tool_call_id"],
                  "properties": {"tool_call_id": {"type": "string", "minLength": 1}}}},
        {"if": {"properties": {"role": {"const": "assistant"}}},
         "else": {"properties": {"tool_calls": {"anyOf": [
             {"type": "null"}, {"type": "array", "maxItems": 0}]}}}},
        {"if": {"properties": {"role": {"const": "assistant"},
                               "tool_calls": {"type": "array", "minItems": 1}},
                "required": ["tool_calls"]},
         "else": {"required": ["content"],
                  "properties": {"content": {"not": {"type": "null"}}}}}]})

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="`developer` is treated as `system`; `tool` carries a tool's result.")
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = \
        Field(None, description=f"A string or an array of at most {MAX_CONTENT_PARTS} text "
              "parts; may be null on an assistant message with tool_calls.")
    name: str | None = Field(None, max_length=256)
    tool_calls: list[MessageToolCall] | None = Field(
        None, max_length=MAX_TOOL_CALLS, description="An assistant's calls (history).")
    tool_call_id: str | None = Field(None, max_length=256, description="The call a `tool` "
                                     "message answers.")

    @model_validator(mode="before")
    @classmethod
    def _explain_roles(cls, data: Any) -> Any:
        # Before validation the role may be any JSON value (a list is unhashable): compare
        # it as a string only when it is one.
        role = data.get("role") if isinstance(data, dict) else None
        if isinstance(role, str) and role == "function":
            raise ValueError("function messages (the deprecated function-calling API) are "
                             "not supported; send the result as a `tool` message with "
                             "tool_call_id. Roles: system, developer, user, assistant, tool")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it "
                             "answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant "
                             "message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            message["name"] = self.name
        return message


class FunctionDef(StrictSchema):
    name: str = Field(pattern=TOOL_NAME, description="a-z, A-Z, 0-9, _ and -; 1 to 64.")
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the "
                                              "arguments (an object).")
    strict: bool | None = Field(None, description="Accepted; with tool_choice required or "
                                "a named function the arguments always match the schema.")


class ToolDef(StrictSchema):
    type: Literal["function"] = Field(description="Only function tools.")
    function: FunctionDef


class NamedFunction(StrictSchema):
    name: str = Field(max_length=64)


class NamedToolChoice(StrictSchema):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(StrictSchema):
    name: str = Field(max_length=64)
    description: str | None = Field(None, max_length=10_000)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictSchema):
    # `_schema_given`, as the OpenAPI document says it: a json_schema object with type
    # json_schema, and with no other type (where it would constrain nothing, or, once,
    # everything while the type said text).
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
        "else": {"properties": {"json_schema": {"type": "null"}}}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"response_format.type is '{self.type}', which takes no "
                             "json_schema (only type 'json_schema' does): drop json_schema, "
                             "or set response_format.type to 'json_schema'")
        return self


MAX_TEMPLATE_KWARGS = 16
#: Variables the server gives the template itself: a request may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
    "raise_exception", "strftime_now", "functions", "function_call", "tool_choice",
    "documents", "tokenize", "return_dict", "continue_final_message", "chat_template"})
TemplateValue = Annotated[str, Field(max_length=1000)] | bool | int | float | None


class ChatCompletionRequest(SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Deprecated name "
                                   "of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = Field(None, description="Each generated token's log-probability "
                                  "(models with the logprobs capability).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="The likeliest tokens "
                                     "at each step; needs logprobs: true.")
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS, description="Function "
                                        "tools the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none: no calls; auto (the default with tools): text or calls; "
        "required: one or more calls; a named function: a call of it. Forced calls are "
        "constrained to the tools' parameter schemas.")
    parallel_tool_calls: bool | None = Field(None, description="Several calls in one "
                                             "answer (default true).")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="none or minimal: ask a reasoning model not to think (templates "
        "with enable_thinking, e.g. Qwen3); other values are accepted and change nothing.")
    chat_template_kwargs: dict[str, TemplateValue] | None = Field(
        None, max_length=MAX_TEMPLATE_KWARGS, description="Extension (as vLLM): variables "
        "for the model's chat template, e.g. {\"enable_thinking\": false}.")
    include_reasoning: bool | None = Field(None, description="Extension: false leaves the "
                                           "think block in content (not split out).")

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise InvalidRequest("'tool_choice' asks for a tool call but 'tools' is empty.",
                                 param="tool_choice")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise InvalidRequest("'tools' names a function more than once; names must be "
                                 "unique.", param="tools")
        if isinstance(self.tool_choice, NamedToolChoice) \
                and self.tool_choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names function "
                                 f"'{self.tool_choice.function.name}', which is not in "
                                 f"'tools' ({', '.join(names)}).", param="tool_choice")
        for name in self.chat_template_kwargs or {}:
            if name in RESERVED_TEMPLATE_VARIABLES or not name.isidentifier() \
                    or name.startswith("_"):
                raise InvalidRequest(f"chat_template_kwargs may not set '{name[:64]}': it "
                                     "must be an identifier not starting with _ and not one "
                                     "of the server's own template variables ("
                                     f"{', '.join(sorted(RESERVED_TEMPLATE_VARIABLES))}).",
                                     param="chat_template_kwargs")
        if self.logprobs and self.active_tools():
            raise UnsupportedParameter("'logprobs' cannot be combined with 'tools' yet; drop "
                                       "one of them.", param="logprobs")
        if self.response_format is not None and self.response_format.type != "text" \
                and self.forced_tools():
            raise InvalidRequest("'response_format' and a forced tool_choice both constrain "
                                 "the output; use one.", param="response_format")

    def template_kwargs(self) -> dict[str, Any] | None:
        """Variables for the chat template: chat_template_kwargs, and enable_thinking false
        for reasoning_effort none/minimal."""
        given: dict[str, Any] = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort in ("none", "minimal"):
            given.setdefault("enable_thinking", False)
        return given or None

    def splits_reasoning(self) -> bool:
        return self.include_reasoning is not False

    def active_tools(self) -> list[ToolDef]:
        """The tools the model is told about (none when tool_choice is none)."""
        return [] if self.tool_choice == "none" else list(self.tools or ())

    def forced_tools(self) -> tuple[str, ...] | None:
        """The names the output must call (tool_choice required / named), else None."""
        if self.tool_choice == "required":
            return tuple(t.function.name for t in self.tools or ())
        if isinstance(self.tool_choice, NamedToolChoice):
            return (self.tool_choice.function.name,)
        return None

    def to_requests(self) -> list[GenerationRequest]:
        """One request per choice (`n`)."""
        self.check_supported()
        params = replace(self.sampling(self.max_completion_tokens or self.max_tokens),
                         logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            params = replace(params, json_mode=True)
        elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            schema = fmt.json_schema.schema_ or {}
            params = replace(params, json_mode=True, json_schema=schema)
        tools = tuple(t.model_dump(exclude_none=True) for t in self.active_tools())
        if tools:
            params = replace(params, tool_choice=self.forced_tools(),
                             parallel_tool_calls=self.parallel_tool_calls is not False)
        messages = tuple(m.as_dict() for m in self.messages)
        return self.per_choice(GenerationRequest(messages=messages, params=params,
                                                 tools=tools or None,
                                                 template_kwargs=self.template_kwargs()))


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"A text or a list of 1 to {MAX_PROMPTS} texts (each gets `n` choices).")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Default: the "
                                   "model's default_max_tokens, else what the context leaves.")
    suffix: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="Fill-in-the-"
                               "middle models only.")
    echo: bool | None = Field(False, description="Return the prompt before the completion.")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of the "
                                 "tokens and the this many likeliest alternatives.")

    @model_validator(mode="after")
    def _bounded_prompts(self) -> CompletionRequest:
        prompts = self.prompts()
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if len(prompts) * self.choices() > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} choices per request (prompts × n)")
        if sum(len(p) for p in prompts) > MAX_TEXT_CHARS:
            raise ValueError(f"prompts hold more than {MAX_TEXT_CHARS} characters in total")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_requests(self) -> list[GenerationRequest]:
        """n requests per prompt, in choice-index order."""
        self.check_supported()
        params = replace(self.sampling(self.max_tokens), echo=bool(self.echo),
                         suffix=self.suffix, logprobs=self.logprobs)
        return [one for prompt in self.prompts()
                for one in self.per_choice(GenerationRequest(prompt=prompt, params=params))]


#: `input` as `_input_shape` and `_bounded_input` accept it: nothing empty.
_EMBEDDING_INPUT = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    {"type": "array", "minItems": 1, "items": {"type": "integer"}},
    {"type": "array", "minItems": 1,
     "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}}]}


class EmbeddingRequest(StrictSchema):
    """Body of POST /v1/embeddings."""

    model: str = Field(max_length=200, description=MODEL_DOC)
    input: Annotated[str | list[str] | list[int] | list[list[int]],
                     WithJsonSchema(_EMBEDDING_INPUT)] = Field(
        description="A text, a list of texts, token ids, or a list of token-id lists.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Not supported: the model's size.")
    user: str | None = Field(None, max_length=256)

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        ok = isinstance(value, str) or isinstance(value, list) and (
            all(isinstance(i, str) for i in value) or all(_is_id(i) for i in value)
            or all(isinstance(i, list) and all(_is_id(t) for t in i) for i in value))
        if not ok:
            raise ValueError("must be a string, a list of strings, a list of token ids "
                             "(integers) or a list of token-id lists")
        return value

    @model_validator(mode="after")
    def _bounded_input(self) -> EmbeddingRequest:
        items = self.inputs()
        if not items or any(len(i) == 0 for i in items):
            raise ValueError("input must not be empty (nor hold an empty text or id list)")
        if sum(len(i) for i in items) > MAX_TEXT_CHARS:
            raise ValueError(f"input holds more than {MAX_TEXT_CHARS} characters or ids")
        return self

    def inputs(self) -> list[str] | list[list[int]]:
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(i, int) for i in value):
            return [cast(list[int], value)]
        return cast(list[str] | list[list[int]], list(value))

    def check_supported(self) -> None:
        if self.dimensions is not None:
            raise UnsupportedParameter("'dimensions' is not supported: vectors have the "
                                       "model's own size; omit it.", param="dimensions")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
