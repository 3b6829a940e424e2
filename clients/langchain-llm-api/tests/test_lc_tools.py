"""Tool calling: `bind_tools`, tool calls in answers (whole and streamed), tool history, and
`with_structured_output(method="function_calling")`.

Live against the server's tiny random-weight GGUF, under its own template (no tools: the
server describes them in the system turn and reads JSON calls) and under Qwen 2.5's
(`<tool_call>` markup). What the random model says is noise, so the live tests force calls
(tool_choice required or named), which the server constrains to the tools' schemas; free
strings are bounded (maxLength) so that the noise ends. The recording endpoint checks the
exact wire shapes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_llm_api import ChatLLMAPI
from lc_servers import RecordingEndpoint, ServerProcess
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

MODELS = ["tiny", "qwen"]
ASK = "What is the weather in Zürich?"


class Weather(BaseModel):
    """Current weather in a city."""

    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


@tool(args_schema=Weather)
def get_weather(city: str, unit: str) -> str:
    """Current weather in a city."""
    return f"21 degrees {unit} in {city}"


@tool
def get_time(zone: Annotated[str, Field(max_length=8)]) -> str:
    """The time in a time zone."""
    return f"12:00 in {zone}"


class Pet(BaseModel):
    """A pet, bounded: a random model's strings would otherwise run past max_tokens."""

    name: str = Field(max_length=12)
    legs: int
    kind: Literal["cat", "dog", "bird"]


class PetDict(TypedDict):
    """A pet (no name: LangChain reads no string bounds from a TypedDict)."""

    legs: int
    kind: Literal["cat", "dog", "bird"]


@pytest.fixture(params=MODELS)
def chat(request: pytest.FixtureRequest, llm_api_server: ServerProcess) -> ChatLLMAPI:
    return ChatLLMAPI(**llm_api_server.client_params(), model=request.param, temperature=0,
                      max_tokens=120)


def merged(chunks: list[Any]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert isinstance(full, AIMessageChunk)
    return full


def valid_calls(message: AIMessage, tools: list[BaseTool]) -> list[dict[str, Any]]:
    """The message's calls, each of one of `tools`, its arguments valid for the tool."""
    schemas = {t.name: t.tool_call_schema for t in tools}
    assert message.tool_calls and not message.invalid_tool_calls
    for call in message.tool_calls:
        assert call["id"] and call["type"] == "tool_call"
        schema = schemas[call["name"]]
        assert isinstance(schema, type) and issubclass(schema, BaseModel)
        schema.model_validate(call["args"])
    blocks = [b for b in message.content_blocks if b["type"] == "tool_call"]
    assert [b["name"] for b in blocks] == [c["name"] for c in message.tool_calls]
    return [{"name": c["name"], "args": c["args"]} for c in message.tool_calls]


# -- live ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tool_choice", ["get_time", "any", True])
def test_a_forced_call_matches_its_schema(chat: ChatLLMAPI, tool_choice: Any) -> None:
    bound = chat.bind_tools([get_weather, get_time], tool_choice=tool_choice,
                            parallel_tool_calls=False)
    answer = bound.invoke(ASK)
    assert isinstance(answer, AIMessage)
    [call] = valid_calls(answer, [get_weather, get_time])
    if tool_choice == "get_time":
        assert call["name"] == "get_time"
    assert answer.response_metadata["finish_reason"] == "tool_calls"
    assert answer.usage_metadata and answer.usage_metadata["output_tokens"] > 3


@pytest.mark.parametrize("output_version", ["v0", "v1"])
def test_streamed_calls_merge_into_the_whole_answers(chat: ChatLLMAPI,
                                                     output_version: str) -> None:
    """Parallel calls allowed: the random model may go on calling; every complete call is
    in both, in order, streamed as chunks that carry id and name first, then arguments
    (v1: the calls are content blocks too)."""
    chat = chat.model_copy(update={"output_version": output_version})
    bound = chat.bind_tools([get_weather, get_time], tool_choice="required")
    whole = bound.invoke(ASK)
    chunks = list(bound.stream(ASK))
    streamed = merged(chunks)
    assert valid_calls(streamed, [get_weather, get_time]) == \
        valid_calls(whole, [get_weather, get_time])
    # "length" when max_tokens cut a further call short (the complete ones are returned)
    assert streamed.response_metadata["finish_reason"] == whole.response_metadata[
        "finish_reason"] in {"tool_calls", "length"}
    pieces = [c for chunk in chunks for c in chunk.tool_call_chunks]
    firsts = [p for p in pieces if p["id"]]
    assert len(firsts) == len(whole.tool_calls)
    assert all(p["name"] for p in firsts)
    assert len(pieces) > len(firsts)  # arguments come in fragments after the first delta
    assert streamed.usage_metadata == whole.usage_metadata
    if output_version == "v1":
        assert [b["id"] for b in streamed.content if isinstance(b, dict)
                and b["type"] == "tool_call"] == [c["id"] for c in streamed.tool_calls]


async def test_astream_equals_ainvoke(chat: ChatLLMAPI) -> None:
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    whole = await bound.ainvoke(ASK)
    streamed = merged([c async for c in bound.astream(ASK)])
    assert valid_calls(streamed, [get_weather]) == valid_calls(whole, [get_weather])


@pytest.mark.parametrize("output_version", ["v0", "v1"])
def test_round_trip_call_result_answer(chat: ChatLLMAPI, output_version: str) -> None:
    """call → the tool runs → its result goes back → an answer (v1: the call's content
    blocks go back as tool_calls)."""
    chat = chat.model_copy(update={"output_version": output_version})
    ask = HumanMessage(ASK)
    called = chat.bind_tools([get_weather], tool_choice="any",
                             parallel_tool_calls=False).invoke([ask])
    [call] = called.tool_calls
    result = get_weather.invoke(call)
    assert isinstance(result, ToolMessage) and result.status == "success"
    assert result.content == f"21 degrees {call['args']['unit']} in {call['args']['city']}"
    answer = chat.bind_tools([get_weather], tool_choice="none").invoke([ask, called, result])
    assert isinstance(answer, AIMessage) and not answer.tool_calls
    assert answer.response_metadata["finish_reason"] in {"stop", "length"}
    # tool_choice none: the tools are not described, but the call and its result are there
    alone = chat.invoke([ask]).usage_metadata
    assert alone and answer.usage_metadata
    assert answer.usage_metadata["input_tokens"] > alone["input_tokens"] + 10


@pytest.mark.parametrize("schema", [Pet, PetDict, convert_to_openai_tool(Pet)],
                         ids=["pydantic", "typeddict", "openai-tool"])
def test_structured_output_through_a_forced_call(chat: ChatLLMAPI, schema: Any) -> None:
    structured = chat.with_structured_output(schema, method="function_calling")
    pet = structured.invoke("Describe a pet.")
    if schema is PetDict:
        assert set(pet) == {"legs", "kind"} and isinstance(pet["legs"], int)
        assert pet["kind"] in {"cat", "dog", "bird"}
    else:
        assert Pet.model_validate(pet if isinstance(pet, dict) else pet.model_dump())
    assert list(structured.stream("Describe a pet."))[-1] == pet
    raw = chat.with_structured_output(schema, method="function_calling",
                                      include_raw=True).invoke("Describe a pet.")
    assert raw["parsing_error"] is None and raw["parsed"] == pet
    assert [c["name"] for c in raw["raw"].tool_calls] == ["Pet" if schema is not PetDict
                                                          else "PetDict"]


async def test_structured_output_through_a_forced_call_async(chat: ChatLLMAPI) -> None:
    structured = chat.with_structured_output(Pet, method="function_calling")
    pet = await structured.ainvoke("Describe a pet.")
    assert isinstance(pet, Pet)
    assert [p async for p in structured.astream("Describe a pet.")][-1] == pet


# -- the wire -----------------------------------------------------------------------------

ANSWER = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
          "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}


def reply_with(endpoint: RecordingEndpoint, message: dict[str, Any],
               finish_reason: str = "tool_calls") -> None:
    endpoint.reply(200, {**ANSWER, "choices": [
        {"index": 0, "message": {"role": "assistant", **message},
         "finish_reason": finish_reason}]})


def test_tools_go_out_in_openai_format(recording_endpoint: RecordingEndpoint) -> None:
    reply_with(recording_endpoint, {"content": "hi"}, "stop")

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    as_dict = convert_to_openai_tool(get_time)
    chat = ChatLLMAPI(base_url=recording_endpoint.url, model="m")
    chat.bind_tools([get_weather, Pet, add, as_dict], parallel_tool_calls=False,
                    strict=True).invoke("x")
    body = recording_endpoint.requests[0].body
    assert body["tools"] == [convert_to_openai_tool(t, strict=True)
                             for t in (get_weather, Pet, add, as_dict)]
    assert [t["function"]["name"] for t in body["tools"]] == \
        ["get_weather", "Pet", "add", "get_time"]
    assert body["parallel_tool_calls"] is False and "tool_choice" not in body


@pytest.mark.parametrize(("given", "sent"), [
    (None, None), (False, None), ("auto", "auto"), ("none", "none"),
    ("required", "required"), ("any", "required"), (True, "required"),
    ("get_time", {"type": "function", "function": {"name": "get_time"}}),
    ({"type": "function", "function": {"name": "get_time"}},
     {"type": "function", "function": {"name": "get_time"}}),
])
def test_tool_choice_in_the_servers_words(recording_endpoint: RecordingEndpoint, given: Any,
                                          sent: Any) -> None:
    reply_with(recording_endpoint, {"content": "hi"}, "stop")
    chat = ChatLLMAPI(base_url=recording_endpoint.url, model="m")
    chat.bind_tools([get_weather, get_time], tool_choice=given).invoke("x")
    assert recording_endpoint.requests[0].body.get("tool_choice") == sent


@pytest.mark.parametrize(("given", "mentions"), [
    ("get_date", "get_weather, get_time"), ({"type": "function", "function": {}}, "name"),
    ({"type": "retrieval"}, "type"), (3, "str, bool, dict"),
])
def test_a_bad_tool_choice_fails_before_sending(given: Any, mentions: str) -> None:
    chat = ChatLLMAPI(base_url="http://127.0.0.1:9", model="m")
    with pytest.raises(ValueError, match=mentions):
        chat.bind_tools([get_weather, get_time], tool_choice=given)


def test_tool_history_goes_out_in_openai_shape(recording_endpoint: RecordingEndpoint) -> None:
    reply_with(recording_endpoint, {"content": "done"}, "stop")
    call = {"name": "get_weather", "args": {"city": "Zürich", "unit": "celsius"}, "id": "c-1",
            "type": "tool_call"}
    sent_call = {"id": "c-1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Zürich", "unit": "celsius"}'}}
    history: list[BaseMessage] = [
        HumanMessage(ASK),
        AIMessage("", tool_calls=[call]),
        ToolMessage('{"temperature": 21}', tool_call_id="c-1", name="get_weather"),
        # Anthropic-style content: the tool_use block repeats the call
        AIMessage([{"type": "text", "text": "Let me look."},
                   {"type": "tool_use", "id": "c-1", "name": "get_weather",
                    "input": call["args"]}], tool_calls=[call]),
        ToolMessage("Error: no such city", tool_call_id="c-1", status="error"),
        # LangChain's v1 content blocks
        AIMessage([{"type": "tool_call", "id": "c-1", "name": "get_weather",
                    "args": call["args"]}], tool_calls=[call]),
        ToolMessage([{"type": "text", "text": "21"}], tool_call_id="c-1"),
        # a call whose arguments did not parse goes back as the model wrote it
        AIMessage("", invalid_tool_calls=[{"name": "get_weather", "args": '{"city": "Zü',
                                           "id": "c-2", "error": "cut",
                                           "type": "invalid_tool_call"}]),
        ToolMessage("bad arguments", tool_call_id="c-2"),
    ]
    ChatLLMAPI(base_url=recording_endpoint.url, model="m").invoke(history)
    assert recording_endpoint.requests[0].body["messages"] == [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [sent_call]},
        {"role": "tool", "content": '{"temperature": 21}', "name": "get_weather",
         "tool_call_id": "c-1"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}],
         "tool_calls": [sent_call]},
        {"role": "tool", "content": "Error: no such city", "tool_call_id": "c-1"},
        {"role": "assistant", "content": None, "tool_calls": [sent_call]},
        {"role": "tool", "content": [{"type": "text", "text": "21"}], "tool_call_id": "c-1"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c-2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Zü'}}]},
        {"role": "tool", "content": "bad arguments", "tool_call_id": "c-2"},
    ]


def test_answer_tool_calls_become_tool_calls(recording_endpoint: RecordingEndpoint) -> None:
    reply_with(recording_endpoint, {"content": None, "tool_calls": [
        {"id": "a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "celsius"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"zo'}},
        {"id": "d", "type": "function", "function": {"name": "get_time", "arguments": "[1]"}},
    ]})
    answer = ChatLLMAPI(base_url=recording_endpoint.url, model="m").invoke("x")
    assert answer.content == ""
    assert answer.tool_calls == [
        {"name": "get_weather", "args": {"city": "Zürich", "unit": "celsius"}, "id": "a",
         "type": "tool_call"},
        {"name": "get_time", "args": {}, "id": "b", "type": "tool_call"}]
    assert [(c["id"], c["args"]) for c in answer.invalid_tool_calls] == \
        [("c", '{"zo'), ("d", "[1]")]
    assert answer.response_metadata["finish_reason"] == "tool_calls"


def test_streamed_call_deltas_merge_by_index(recording_endpoint: RecordingEndpoint) -> None:
    """As the server streams them: id, type and name in a call's first delta, argument
    fragments after; two calls, by index."""

    def frame(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {"id": "s1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk)}\n\n"

    def call(index: int, arguments: str, name: str | None = None) -> dict[str, Any]:
        piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
        if name:
            piece.update(id=f"call-{index}", type="function")
            piece["function"]["name"] = name
        return {"tool_calls": [piece]}

    stream = "".join([
        frame({"role": "assistant", "content": ""}),
        frame(call(0, "", "get_weather")), frame(call(0, '{"city": "Zü')),
        frame(call(0, 'rich", "unit": "celsius"}')),
        frame(call(1, "", "get_time")), frame(call(1, '{"zone": "CET"}')),
        frame({}, "tool_calls"), "data: [DONE]\n\n"])
    recording_endpoint.reply(200, stream.encode(), content_type="text/event-stream")
    chunks = list(ChatLLMAPI(base_url=recording_endpoint.url, model="m").stream("x"))
    full = merged(chunks)
    assert full.tool_calls == [
        {"name": "get_weather", "args": {"city": "Zürich", "unit": "celsius"},
         "id": "call-0", "type": "tool_call"},
        {"name": "get_time", "args": {"zone": "CET"}, "id": "call-1", "type": "tool_call"}]
    assert full.content == "" and full.response_metadata["finish_reason"] == "tool_calls"
    assert chunks[2].tool_call_chunks == [
        {"name": None, "args": '{"city": "Zü', "id": None, "index": 0,
         "type": "tool_call_chunk"}]


def test_structured_output_request_forces_one_call(
        recording_endpoint: RecordingEndpoint) -> None:
    reply_with(recording_endpoint, {"content": None, "tool_calls": [
        {"id": "a", "type": "function",
         "function": {"name": "Pet", "arguments": '{"name": "Rex", "legs": 4, "kind": "dog"}'}}]})
    chat = ChatLLMAPI(base_url=recording_endpoint.url, model="m")
    assert chat.with_structured_output(Pet, method="function_calling", strict=True).invoke(
        "x") == Pet(name="Rex", legs=4, kind="dog")
    assert chat.with_structured_output(Pet.model_json_schema(),
                                       method="function_calling").invoke("x") == \
        {"name": "Rex", "legs": 4, "kind": "dog"}
    first, second = (r.body for r in recording_endpoint.requests)
    assert first["tools"] == [convert_to_openai_tool(Pet, strict=True)]
    assert first["tool_choice"] == second["tool_choice"] == \
        {"type": "function", "function": {"name": "Pet"}}
    assert first["parallel_tool_calls"] is False and "response_format" not in first
    with pytest.raises(ValueError, match="needs a schema"):
        chat.with_structured_output(None, method="function_calling")
