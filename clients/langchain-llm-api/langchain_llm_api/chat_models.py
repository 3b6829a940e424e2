"""`ChatLLMAPI`: a LangChain chat model over the server's `/v1/chat/completions`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr

from langchain_llm_api._connection import Connection
from langchain_llm_api._openai_format import (
    chat_result,
    chunk_from_event,
    message_dicts,
)

CHAT_PATH = "/v1/chat/completions"
SAMPLING_PARAMS = ("max_tokens", "temperature", "top_p", "presence_penalty",
                   "frequency_penalty", "seed")
CALL_PARAMS = (*SAMPLING_PARAMS, "model", "response_format", "tools", "tool_choice",
               "parallel_tool_calls")
StructuredMethod = Literal["json_schema", "json_mode", "function_calling"]
ToolLike = dict[str, Any] | type | Callable[..., Any] | BaseTool
ToolChoice = dict[str, Any] | str | bool | None


class ChatLLMAPI(Connection, BaseChatModel):
    """Chat with an llm-api server through its OpenAI-compatible chat completions route.

    Streaming (`stream`/`astream`, or `streaming=True`), token usage on every answer
    (`usage_metadata`, also when streaming), tool calling (`bind_tools`; calls come back in
    `tool_calls`, streamed as `tool_call_chunks`) and `with_structured_output` through JSON
    schema (`method="json_schema"`, enforced by the server's constrained decoding), a forced
    tool call (`method="function_calling"`) or JSON mode (`method="json_mode"`). Text
    content only.

    ```python
    from langchain_llm_api import ChatLLMAPI

    chat = ChatLLMAPI(base_url="http://localhost:8000", model="qwen", max_tokens=64)
    print(chat.invoke("Name three colours.").content)
    ```
    """

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    model: str | None = Field(None, alias="model_name")
    """Served model name; None = the server's first model."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0)
    stop: list[str] | None = None
    """Stop sequences sent with every call (a call's own `stop` replaces them)."""
    streaming: bool = False
    """`invoke` reads the stream too, so callbacks see every token."""
    stream_usage: bool = True
    """Ask for the usage chunk at the end of streams (`stream_options.include_usage`)."""

    _default_model: str | None = PrivateAttr(None)

    @property
    def _llm_type(self) -> str:
        return "llm-api-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model,
                **{k: getattr(self, k) for k in SAMPLING_PARAMS}}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="llm-api", ls_model_type="chat",
                                 ls_model_name=kwargs.get("model") or self.model or "default")
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def _served_model(self, kwargs: dict[str, Any]) -> str:
        """The call's `model`, else `model`, else the server's first model (asked once from
        GET /v1/models)."""
        if kwargs.get("model") or self.model:
            return str(kwargs.get("model") or self.model)
        if self._default_model is None:
            self._default_model = _first_model(self._post("/v1/models", None, "GET"))
        return self._default_model

    async def _aserved_model(self, kwargs: dict[str, Any]) -> str:
        if kwargs.get("model") or self.model:
            return str(kwargs.get("model") or self.model)
        if self._default_model is None:
            self._default_model = _first_model(await self._apost("/v1/models", None, "GET"))
        return self._default_model

    def _payload(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any], stream: bool, model: str) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(CALL_PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; "
                             f"allowed: stop, {', '.join(CALL_PARAMS)}")
        payload: dict[str, Any] = {"messages": message_dicts(messages)}
        payload.update({k: getattr(self, k) for k in SAMPLING_PARAMS})
        payload["model"] = model
        payload.update(kwargs)
        stops = stop if stop is not None else self.stop
        if stops:
            payload["stop"] = list(stops)
        if stream:
            payload["stream"] = True
            if self.stream_usage:
                payload["stream_options"] = {"include_usage": True}
        return {k: v for k, v in payload.items() if v is not None}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        payload = self._payload(messages, stop, kwargs, False, self._served_model(kwargs))
        return chat_result(self._post(CHAT_PATH, payload))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        payload = self._payload(messages, stop, kwargs, False, await self._aserved_model(kwargs))
        answer = await self._apost(CHAT_PATH, payload)
        return chat_result(answer)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        payload = self._payload(messages, stop, kwargs, True, self._served_model(kwargs))
        for event in self._events(CHAT_PATH, payload):
            if event.data.strip() == "[DONE]":
                break
            chunk = chunk_from_event(event.data)
            if chunk is None:
                continue
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        payload = self._payload(messages, stop, kwargs, True, await self._aserved_model(kwargs))
        async for event in self._aevents(CHAT_PATH, payload):
            if event.data.strip() == "[DONE]":
                break
            chunk = chunk_from_event(event.data)
            if chunk is None:
                continue
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def bind_tools(
        self, tools: Sequence[ToolLike], *, tool_choice: ToolChoice = None,
        parallel_tool_calls: bool | None = None, strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with `tools` (dicts in OpenAI's format, pydantic classes, TypedDicts,
        functions or `BaseTool`s) sent on every call.

        `tool_choice`: `"auto"` (the server's default with tools: text or calls), `"none"`,
        `"required"`, `"any"` or `True` (at least one call), a tool's name or
        `{"type": "function", "function": {"name": ...}}` (a call of that tool); `None` or
        `False` sends nothing. A forced call (required or named) is constrained by the
        server to the tools' JSON schemas. `parallel_tool_calls=False`: at most one call.
        """
        formatted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = _tool_choice(tool_choice, names)
        if choice is not None:
            kwargs["tool_choice"] = choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self, schema: dict[str, Any] | type | None = None, *,
        method: StructuredMethod = "json_schema", include_raw: bool = False,
        strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers parsed into `schema` (a pydantic class, a TypedDict, or a JSON schema
        dict).

        `method="json_schema"` (default) sends the schema as `response_format`, so the
        server constrains the output to it; `"function_calling"` binds the schema as the one
        tool and forces a call of it (the server constrains the call's arguments to the
        schema); `"json_mode"` asks only for a JSON object (say in the prompt which keys you
        want).
        """
        if kwargs:
            raise ValueError(f"unexpected argument(s): {', '.join(sorted(kwargs))}")
        format_info = {"kwargs": {"method": method, "strict": strict},
                       "schema": convert_to_json_schema(schema) if schema else None}
        if method == "function_calling":
            if schema is None:
                raise ValueError("method='function_calling' needs a schema")
            return _with_parser(self._forced_tool(schema, strict, format_info),
                                _tool_parser_for(schema), include_raw)
        if method == "json_schema":
            if schema is None:
                raise ValueError("method='json_schema' needs a schema")
            response_format = _json_schema_format(schema, strict)
        elif method == "json_mode":
            response_format = {"type": "json_object"}
        else:
            raise ValueError(f"unknown method {method!r}; allowed: json_schema, "
                             "function_calling, json_mode")
        llm = self.bind(response_format=response_format,
                        ls_structured_output_format=format_info)
        return _with_parser(llm, _parser_for(schema), include_raw)

    def _forced_tool(self, schema: dict[str, Any] | type, strict: bool | None,
                     format_info: dict[str, Any]) -> Runnable[LanguageModelInput, AIMessage]:
        """The model bound to `schema` as its only tool, with one call of it forced."""
        name = convert_to_openai_tool(schema)["function"]["name"]
        return self.bind_tools([schema], tool_choice=name, parallel_tool_calls=False,
                               strict=strict, ls_structured_output_format=format_info)


def _first_model(answer: Any) -> str:
    try:
        return str(answer["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise ValueError("GET /v1/models listed no model; set ChatLLMAPI(model=...)") from None


def _tool_choice(choice: ToolChoice, names: list[str]) -> str | dict[str, Any] | None:
    """`bind_tools`' tool_choice in the server's words."""
    if choice is None or choice is False:
        return None
    if choice is True or choice in ("any", "required"):
        return "required"
    if choice in ("auto", "none"):
        return str(choice)
    if isinstance(choice, str):
        choice = {"type": "function", "function": {"name": choice}}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError(f"tool_choice {choice!r} is not "
                             "{'type': 'function', 'function': {'name': ...}}")
        if name not in names:
            raise ValueError(f"tool_choice {name!r} is none of the tools "
                             f"({', '.join(names) or 'no tools'}), nor auto, none, "
                             "required, any")
        return {"type": "function", "function": {"name": name}}
    raise ValueError(f"tool_choice must be a str, bool, dict or None, not {choice!r}")


def _with_parser(llm: Runnable[LanguageModelInput, Any], parser: Runnable[Any, Any],
                 include_raw: bool) -> Runnable[LanguageModelInput, Any]:
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                        parsing_error=lambda _: None)
    fallback = RunnablePassthrough.assign(parsed=lambda _: None)
    with_fallback = parsed.with_fallbacks([fallback], exception_key="parsing_error")
    return RunnableMap(raw=llm) | with_fallback


def _json_schema_format(schema: dict[str, Any] | type,
                        strict: bool | None) -> dict[str, Any]:
    json_schema = convert_to_json_schema(schema)
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(json_schema.get("title") or "output"))[:64]
    spec: dict[str, Any] = {"name": name, "schema": json_schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


def _parser_for(schema: dict[str, Any] | type | None) -> Runnable[Any, Any]:
    if isinstance(schema, type) and is_basemodel_subclass(schema):  # pydantic v1 or v2
        return PydanticOutputParser(pydantic_object=schema)
    return JsonOutputParser()


def _tool_parser_for(schema: dict[str, Any] | type) -> Runnable[Any, Any]:
    """The forced call's arguments: a pydantic object, else a dict."""
    if isinstance(schema, type) and is_basemodel_subclass(schema):
        return PydanticToolsParser(tools=[schema], first_tool_only=True)
    name = convert_to_openai_tool(schema)["function"]["name"]
    return JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
