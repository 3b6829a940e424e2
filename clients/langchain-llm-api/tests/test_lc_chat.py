"""ChatLLMAPI against the live server's /v1/chat/completions, and LangChain's standard chat
model suites. The tiny model has random weights: its text is gibberish, but token counts,
stop strings and JSON-schema constrained output are real."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_llm_api import BadRequestError, ChatLLMAPI, InternalServerError, NotFoundError
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from lc_servers import RecordingEndpoint, ServerProcess
from pydantic import BaseModel, Field

CUT_JSON = ("the random-weight model fills the schema's unbounded `setup` string with gibberish "
            "past the server's default_max_tokens (32), so the JSON is cut before `punchline` "
            "and the pydantic parse raises OutputParserException (the dict variants pass: "
            "their parser accepts partial JSON); the schema is enforced (see "
            "test_structured_output_follows_the_schema)")
# Only the pydantic variant fails, and always (greedy decoding, see chat_model_params).
CUT = pytest.mark.xfail(reason=CUT_JSON, raises=OutputParserException, strict=True)
SCHEMA_TYPES = [pytest.param("pydantic", marks=CUT), "typeddict", "json_schema"]
# langchain_tests' test_no_overrides insists that an overridden standard test carries an
# xfail mark with a reason; this one never applies (condition False): CUT marks the case.
ONLY_THE_MARKED_CASE = pytest.mark.xfail(False, reason="only the 'pydantic' case: " + CUT_JSON)
RANDOM_MODEL = ("the tiny test model has random weights: it cannot follow an instruction "
                "or produce the requested keys without a schema")
# Tool calling: the standard tests force calls where the suite can (tool_choice "any", since
# has_tool_choice); the server constrains a forced call to the tool's schema, but what fills
# it is the random model's noise.
NO_CHOICE_OF_ITS_OWN = ("tool_choice auto (the suite binds no tool_choice here): the "
                        "random-weight model answers with noise instead of calling the tool")
UNBOUNDED_STRING = ("the forced call's schema has a free string ({}) and the random-weight "
                    "model does not close it within max_tokens (100), so no complete call "
                    "comes back")
BOUNDS_REFUSED = ("magic_function's `input` has pydantic gt/lt bounds (exclusiveMinimum, "
                  "exclusiveMaximum), which the server's constrained decoding refuses for a "
                  "forced call (400 invalid_request)")


@pytest.fixture
def chat(llm_api_server: ServerProcess) -> ChatLLMAPI:
    return ChatLLMAPI(**llm_api_server.client_params(), model="tiny", temperature=0,
                      max_tokens=24)


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_invoke_reports_usage_and_finish_reason(chat: ChatLLMAPI) -> None:
    answer = chat.invoke([SystemMessage("be brief"), HumanMessage("hello")])
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str)
    usage = answer.usage_metadata
    assert usage is not None and usage["input_tokens"] > 3
    assert 0 < usage["output_tokens"] <= 24
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert answer.response_metadata["model_name"] == "tiny"
    assert answer.response_metadata["finish_reason"] in {"stop", "length"}


def test_stream_equals_invoke_and_feeds_callbacks(chat: ChatLLMAPI) -> None:
    recorder = TokenRecorder()
    chunks = list(chat.stream("hello", config={"callbacks": [recorder]}))
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert isinstance(full, AIMessageChunk)
    invoked = chat.invoke("hello")
    assert full.content == invoked.content
    assert full.usage_metadata == invoked.usage_metadata
    assert "".join(recorder.tokens) == invoked.content
    assert len([t for t in recorder.tokens if t]) > 1
    recorder = TokenRecorder()
    streamed = chat.model_copy(update={"streaming": True}).invoke(
        "hello", config={"callbacks": [recorder]})
    assert streamed.content == invoked.content == "".join(recorder.tokens)
    assert streamed.usage_metadata == invoked.usage_metadata


async def test_astream_equals_ainvoke(chat: ChatLLMAPI) -> None:
    chunks = [c async for c in chat.astream("hello")]
    text = "".join(str(c.content) for c in chunks)
    invoked = await chat.ainvoke("hello")
    assert text == invoked.content
    assert sum((c.usage_metadata or {}).get("output_tokens", 0) for c in chunks) == \
        (invoked.usage_metadata or {})["output_tokens"]


def test_stop_is_honoured(chat: ChatLLMAPI) -> None:
    full = str(chat.invoke("question", max_tokens=60).content)
    assert len(full) > 12
    stop = full[8:11]
    assert chat.invoke("question", max_tokens=60, stop=[stop]).content == \
        full[:full.index(stop)]


def test_without_model_the_first_served_model_is_used(
        llm_api_server: ServerProcess) -> None:
    chat = ChatLLMAPI(**llm_api_server.client_params(), max_tokens=4)
    assert chat.invoke("hi").response_metadata["model_name"] == "tiny"


class Pet(BaseModel):
    """Bounded fields: a random model's strings would otherwise run past max_tokens."""

    name: str = Field(max_length=12)
    legs: int
    kind: Literal["cat", "dog", "bird"]


@pytest.mark.parametrize("schema", [Pet, Pet.model_json_schema()])
def test_structured_output_follows_the_schema(chat: ChatLLMAPI, schema: Any) -> None:
    structured = chat.model_copy(update={"max_tokens": 200}).with_structured_output(schema)
    pet = structured.invoke("Describe a pet as JSON.")
    if isinstance(schema, dict):
        pet = Pet.model_validate(pet)
    assert isinstance(pet, Pet)


def test_json_mode_constrains_the_output_to_json(chat: ChatLLMAPI) -> None:
    """The grammar makes the answer start a JSON object; the random model's first key (a free
    string) runs past max_tokens, so the object is complete only if it stopped."""
    result = chat.with_structured_output(None, method="json_mode",
                                         include_raw=True).invoke("JSON please")
    raw = result["raw"]
    assert str(raw.content).startswith("{")
    if raw.response_metadata["finish_reason"] == "stop":
        assert json.loads(str(raw.content)) == result["parsed"]


def test_unsupported_inputs_fail_before_sending(chat: ChatLLMAPI) -> None:
    with pytest.raises(ValueError, match="image_url"):
        chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])])
    with pytest.raises(ValueError, match="FunctionMessage"):
        chat.invoke([HumanMessage("x"), FunctionMessage(content="42", name="f")])


def test_errors(chat: ChatLLMAPI, llm_api_server: ServerProcess) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        chat.invoke("x", model="nope")
    rev = ChatLLMAPI(**llm_api_server.client_params(), model="rev")
    with pytest.raises(BadRequestError) as no_chat:
        rev.invoke("x")
    assert no_chat.value.code == "unsupported_capability"


async def test_error_frame_inside_a_stream_raises(
        recording_endpoint: RecordingEndpoint) -> None:
    """/v1 streams end a failure with a `data:` event holding the error body (OpenAI's way;
    the tiny models cannot be made to fail mid-stream on demand)."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"},
                          "finish_reason": None}]}
    error = {"error": {"message": "The engine failed; see the server log.",
                       "type": "server_error", "param": None, "code": "backend_failure"}}
    stream = (f": ping\n\ndata: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\n")
    recording_endpoint.reply(200, stream.encode(), content_type="text/event-stream")
    chat = ChatLLMAPI(base_url=recording_endpoint.url, model="m")
    seen: list[str] = []
    with pytest.raises(InternalServerError, match="server log") as failed:
        async for piece in chat.astream("x"):
            seen.append(str(piece.content))
    assert seen == ["Hel"] and failed.value.code == "backend_failure"
    assert recording_endpoint.requests[0].body["stream"] is True
    assert recording_endpoint.requests[0].body["stream_options"] == {"include_usage": True}


def test_request_body(recording_endpoint: RecordingEndpoint) -> None:
    recording_endpoint.reply(200, {
        "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    chat = ChatLLMAPI(base_url=recording_endpoint.url, model="m", api_key="sk-1")
    chat.invoke([SystemMessage("s"), HumanMessage("u", name="ann"), AIMessage("a")])
    chat.invoke("x", stop=["END"], temperature=0.5)
    first, second = (r.body for r in recording_endpoint.requests)
    assert first == {"model": "m", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "ann"},
        {"role": "assistant", "content": "a"}]}
    assert second == {"model": "m", "messages": [{"role": "user", "content": "x"}],
                      "stop": ["END"], "temperature": 0.5}
    assert recording_endpoint.requests[0].headers["Authorization"] == "Bearer sk-1"


class TestChatLLMAPIUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatLLMAPI]:
        return ChatLLMAPI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": "http://127.0.0.1:8000", "model": "tiny"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return ({"LLM_API_KEY": "sk-env", "LLM_API_BASE_URL": "http://10.0.0.1:9000"},
                {"model": "tiny"},
                {"api_key": "sk-env", "base_url": "http://10.0.0.1:9000", "model": "tiny"})

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestChatLLMAPIIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _server(self, llm_api_server: ServerProcess) -> None:
        self.server = llm_api_server

    @property
    def chat_model_class(self) -> type[ChatLLMAPI]:
        return ChatLLMAPI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Greedy: each case's outcome is the same on every run (sampled, the pydantic cases
        # passed now and then, whenever the random model happened to close a string early).
        return {**self.server.client_params(), "model": "tiny", "temperature": 0}

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "tiny2"

    @pytest.mark.xfail(reason=RANDOM_MODEL, raises=OutputParserException, strict=True)
    def test_json_mode(self, model: Any) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(reason=BOUNDS_REFUSED + "; past that the test checks that the model "
                       "read 3 from the question (args == {'input': 3})",
                       raises=BadRequestError, strict=True)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model: Any) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=BOUNDS_REFUSED + "; past that the test checks that the model "
                       "read 3 from the question (args == {'input': 3})",
                       raises=BadRequestError, strict=True)
    async def test_tool_calling_async(self, model: Any) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=BOUNDS_REFUSED, raises=BadRequestError, strict=True)
    def test_tool_choice(self, model: Any) -> None:
        super().test_tool_choice(model)

    @pytest.mark.xfail(reason=UNBOUNDED_STRING.format("answer_style"), raises=AssertionError,
                       strict=True)
    def test_bind_runnables_as_tools(self, model: Any) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason="magic_function_no_args' schema ({'properties': {}}) allows "
                       "additional properties, and the random-weight model fills the forced "
                       "call's arguments with an endless key instead of {} (under "
                       "bind_tools(strict=True) it writes {}, then, parallel calls allowed, "
                       "calls again; the test wants exactly one call)", raises=AssertionError,
                       strict=True)
    def test_tool_calling_with_no_arguments(self, model: Any) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @pytest.mark.xfail(reason=NO_CHOICE_OF_ITS_OWN + " (the loop with a forced call: "
                       "test_lc_tools.py::test_round_trip_call_result_answer and the README's "
                       "agent)", raises=AssertionError, strict=True)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: Any) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason="checks that the model copied the Chinese name from the "
                       "question into the call; besides, " + UNBOUNDED_STRING.format(
                           "customer_name"), raises=AssertionError, strict=True)
    def test_unicode_tool_call_integration(self, model: Any, *, tool_choice: str | None = None,
                                           force_tool_call: bool = True) -> None:
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice,
                                                   force_tool_call=force_tool_call)

    @ONLY_THE_MARKED_CASE
    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    def test_structured_output(self, model: Any, schema_type: str) -> None:
        super().test_structured_output(model, schema_type)

    @ONLY_THE_MARKED_CASE
    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    async def test_structured_output_async(self, model: Any, schema_type: str) -> None:
        await super().test_structured_output_async(model, schema_type)

    @CUT
    def test_structured_output_pydantic_2_v1(self, model: Any) -> None:
        super().test_structured_output_pydantic_2_v1(model)


def test_structured_output_request(recording_endpoint: RecordingEndpoint) -> None:
    content = json.dumps({"name": "Rex", "legs": 4, "kind": "dog"})
    recording_endpoint.reply(200, {
        "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}})
    chat = ChatLLMAPI(base_url=recording_endpoint.url, model="m")
    assert chat.with_structured_output(Pet, strict=True).invoke("x") == \
        Pet(name="Rex", legs=4, kind="dog")
    assert chat.with_structured_output(None, method="json_mode").invoke("x") == \
        {"name": "Rex", "legs": 4, "kind": "dog"}
    schema_format, json_mode = (r.body["response_format"] for r in recording_endpoint.requests)
    assert schema_format == {"type": "json_schema", "json_schema": {
        "name": "Pet", "schema": convert_to_json_schema(Pet), "strict": True}}
    assert json_mode == {"type": "json_object"}
