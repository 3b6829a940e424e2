"""Tool calling through real families' chat templates (tests/fixtures/templates): the tools,
an assistant's call, its result and a follow-up land where each format puts them, the same
in llama.cpp (llama-cpp-python's Jinja2ChatFormatter, built by backends/llama.py) and in
transformers (the tokenizer's apply_chat_template, backends/hf.py); OpenAI-shaped messages
are made template-ready first (backends/chat_messages.py), and a template that has no place
for tools gets them described in the system turn."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from transformers import AutoTokenizer

from backends.base import Backend, GenerationParams, GenerationRequest, ModelSpec
from backends.chat_messages import (
    nine_char_id,
    template_arguments,
    template_messages,
    template_reads_tools,
    tools_system_prompt,
)
from backends.errors import InvalidRequest
from backends.hf import HFBackend, HFParams
from backends.llama import LlamaBackend, LlamaParams
from tests.conftest import FIXTURES, TINY_GGUF

TEMPLATES = FIXTURES / "templates"
TINY_HF = FIXTURES / "tiny-llama-hf"
QWEN = "Qwen-Qwen2.5-7B-Instruct.jinja"
LLAMA31 = "tools/meta-llama-Llama-3.1-8B-Instruct.jinja"
MISTRAL = "mistralai-Mistral-7B-Instruct-v0.3.jinja"
GEMMA = "google-gemma-2-2b-it.jinja"

PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "description": "Name der Stadt, z. B. „Zürich“"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Das aktuelle Wetter einer Stadt",
    "parameters": PARAMETERS}}
TOOLS = [WEATHER]
ARGUMENTS = {"city": "Zürich", "unit": "celsius"}
RESULT = json.dumps({"temperature": 21, "sky": "sonnig ☀"}, ensure_ascii=False)
CALL_ID = "call12345"  # Mistral v0.3 insists on 9 characters
# What an OpenAI client sends: arguments as JSON text, content null beside the calls.
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Wie ist das Wetter in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": CALL_ID, "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": RESULT},
    {"role": "assistant", "content": "21 °C und sonnig."},
    {"role": "user", "content": "Und morgen?"},
]


def dumps(value: Any, **options: Any) -> str:
    """JSON as the templates' `tojson` writes it (both renderers: unicode kept)."""
    return json.dumps(value, ensure_ascii=False, **options)


CALL = dumps({"name": "get_weather", "arguments": ARGUMENTS})
LLAMA_HEAD = "<|start_header_id|>{}<|end_header_id|>\n\n"
# family: its template and the pieces of the prompt, in the order they must appear
FAMILIES: dict[str, tuple[str, list[str]]] = {
    # ChatML: tools one JSON per line in <tools> of the system turn, calls in <tool_call>,
    # results as a user turn of <tool_response>.
    "qwen2.5": (QWEN, [
        "<|im_start|>system\nYou are brief.\n\n# Tools\n",
        f"<tools>\n{dumps(WEATHER)}\n</tools>",
        "<|im_start|>user\nWie ist das Wetter in Zürich?<|im_end|>\n",
        f"<|im_start|>assistant\n<tool_call>\n{CALL}\n</tool_call><|im_end|>\n",
        f"<|im_start|>user\n<tool_response>\n{RESULT}\n</tool_response><|im_end|>\n",
        "<|im_start|>assistant\n21 °C und sonnig.<|im_end|>\n",
        "<|im_start|>user\nUnd morgen?<|im_end|>\n<|im_start|>assistant\n"]),
    # Tools (indented JSON) in the first user turn, the call as {"name", "parameters"}, the
    # result in an `ipython` turn: this template writes string content through tojson.
    "llama3.1": (LLAMA31, [
        "<s>" + LLAMA_HEAD.format("system") + "Environment: ipython\n",
        "You are brief.<|eot_id|>" + LLAMA_HEAD.format("user") + "Given the following "
        "functions",
        dumps(WEATHER, indent=4) + "\n\nWie ist das Wetter in Zürich?<|eot_id|>",
        LLAMA_HEAD.format("assistant") + '{"name": "get_weather", "parameters": '
        + dumps(ARGUMENTS) + "}<|eot_id|>",
        LLAMA_HEAD.format("ipython") + dumps(RESULT) + "<|eot_id|>",
        LLAMA_HEAD.format("assistant") + "21 °C und sonnig.<|eot_id|>",
        LLAMA_HEAD.format("user") + "Und morgen?<|eot_id|>" + LLAMA_HEAD.format("assistant")]),
    # [TOOL_CALLS] with the call's id, [TOOL_RESULTS] with the call_id, the tools in
    # [AVAILABLE_TOOLS] right before the last user turn, which also gets the system prompt.
    "mistral-v0.3": (MISTRAL, [
        "<s>[INST] Wie ist das Wetter in Zürich?[/INST]",
        f'[TOOL_CALLS] [{CALL[:-1]}, "id": "{CALL_ID}"}}]</s>',
        f'[TOOL_RESULTS] {{"content": {RESULT}, "call_id": "{CALL_ID}"}}[/TOOL_RESULTS]',
        " 21 °C und sonnig.</s>",
        f"[AVAILABLE_TOOLS] [{dumps(WEATHER)}][/AVAILABLE_TOOLS]",
        "[INST] You are brief.\n\nUnd morgen?[/INST]"]),
}


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def assert_in_order(text: str, pieces: list[str], ends: bool = True) -> None:
    at = 0
    for piece in pieces:
        found = text.find(piece, at)
        assert found >= 0, f"{piece!r} missing after position {at} of:\n{text}"
        at = found + len(piece)
    assert not ends or at == len(text), f"unexpected tail {text[at:]!r}"


def load_llama(chat_template: str | None) -> Backend:
    return LlamaBackend.load(ModelSpec(name="t", path=TINY_GGUF, params=LlamaParams(
        n_ctx=4096, n_threads=2, embeddings=False, chat_template=chat_template)))


def load_hf(chat_template: str | None) -> Backend:
    return HFBackend.load(ModelSpec(name="t", path=TINY_HF, params=HFParams(
        device_map="cpu", chat_template=chat_template)))


@pytest.fixture(scope="module")
def backends() -> Iterator[Callable[[str | None], tuple[Backend, Backend]]]:
    """The tiny model in both families with a given template (None: its own), loaded once."""
    loaded: dict[str | None, tuple[Backend, Backend]] = {}

    def pair(name: str | None) -> tuple[Backend, Backend]:
        if name not in loaded:
            text = template(name) if name else None
            loaded[name] = (load_llama(text), load_hf(text))
        return loaded[name]

    yield pair
    for llama, hf in loaded.values():
        llama.close()
        hf.close()


def render_both(backends: Callable[[str | None], tuple[Backend, Backend]], name: str | None,
                messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """The prompt from llama.cpp's and from transformers' renderer, which must agree."""
    llama, hf = backends(name)
    render: list[Any] = [llama.apply_chat_template, hf.apply_chat_template]
    by_llama, by_hf = (r(messages, **kwargs) for r in render)
    assert by_llama == by_hf
    prompt: str = by_llama
    return prompt


# -- the three tool formats ----------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tools_call_result_and_follow_up_land_where_the_family_puts_them(
        backends: Callable[[str | None], tuple[Backend, Backend]], family: str) -> None:
    name, pieces = FAMILIES[family]
    prompt = render_both(backends, name, template_messages(MESSAGES), tools=TOOLS)
    assert_in_order(prompt, pieces)
    # the schema went in whole, unicode as written (no \\u escapes)
    schema = dumps(WEATHER, indent=4) if family == "llama3.1" else dumps(PARAMETERS)
    assert schema in prompt and "„Zürich“" in prompt and "\\u" not in prompt
    # chat_prompt does the normalising itself, in both families
    for backend in backends(name):
        assert backend.chat_prompt(MESSAGES, TOOLS) == prompt
        assert backend.chat_template_text == template(name)


def test_llama31_writes_a_builtin_tool_call_after_python_tag(
        backends: Callable[[str | None], tuple[Backend, Backend]]) -> None:
    """Llama 3.1's built-in tools (brave_search, wolfram_alpha) are called in Python form,
    which walks the arguments: they must be an object, not JSON text."""
    messages = template_messages([
        {"role": "user", "content": "Suche das Wetter"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": CALL_ID, "type": "function", "function": {
                "name": "brave_search", "arguments": '{"query": "Wetter Zürich"}'}}]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": "Sonnig, 21 °C"}])
    assert messages[2]["name"] == "brave_search"
    text = template(LLAMA31)
    # the renderers themselves: the backends pass no builtin_tools
    formatter: Any = Jinja2ChatFormatter(template=text, eos_token="</s>", bos_token="<s>")
    by_llama = formatter(messages=messages, builtin_tools=["brave_search"]).prompt
    by_hf = AutoTokenizer.from_pretrained(TINY_HF).apply_chat_template(
        messages, chat_template=text, builtin_tools=["brave_search"], tokenize=False,
        add_generation_prompt=True)
    assert by_llama == by_hf
    prompt: str = by_llama
    assert_in_order(prompt, [
        LLAMA_HEAD.format("system") + "Environment: ipython\nTools: brave_search\n\n",
        LLAMA_HEAD.format("assistant")
        + '<|python_tag|>brave_search.call(query="Wetter Zürich")<|eom_id|>',
        LLAMA_HEAD.format("ipython") + '"Sonnig, 21 °C"<|eot_id|>',
        LLAMA_HEAD.format("assistant")])


def test_mistral_v03_gets_9_character_call_ids_consistently(
        backends: Callable[[str | None], tuple[Backend, Backend]]) -> None:
    """Its template refuses OpenAI's ids ("call_…", longer): a Mistral-format model gets each
    id mapped to 9 alphanumerics, the same for the call and its result."""
    messages = copy.deepcopy(MESSAGES)
    messages[2]["tool_calls"][0]["id"] = messages[3]["tool_call_id"] = "call_8f2a1c9e4b7d"
    short = nine_char_id("call_8f2a1c9e4b7d")
    assert len(short) == 9 and short.isalnum() and nine_char_id(short) == short
    for backend in backends(MISTRAL):
        assert backend.tool_format == "mistral"
        prompt = backend.chat_prompt(messages, TOOLS)
        assert prompt.count(short) == 2 and "call_8f2a" not in prompt


def test_the_tool_template_is_the_published_file() -> None:
    """Byte-identical to llama.cpp's models/templates copy (which is the chat_template of
    meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json)."""
    digest = hashlib.sha256((TEMPLATES / LLAMA31).read_bytes()).hexdigest()
    assert digest == "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65"


# -- message normalisation -----------------------------------------------------------------


def test_openai_messages_become_template_ready_without_being_changed() -> None:
    before = copy.deepcopy(MESSAGES)
    ready = template_messages(MESSAGES)
    assert MESSAGES == before
    call = ready[2]
    assert call["content"] == "" and call["tool_calls"][0]["function"]["arguments"] == ARGUMENTS
    assert call["tool_calls"][0]["id"] == CALL_ID
    assert ready[3] == {"role": "tool", "tool_call_id": CALL_ID, "content": RESULT,
                        "name": "get_weather"}
    assert ready[0] == MESSAGES[0] and ready[5] == MESSAGES[5]


@pytest.mark.parametrize(("arguments", "expected"), [
    ('{"city": "Zürich"}', {"city": "Zürich"}),
    ({"city": "Zürich"}, {"city": "Zürich"}),  # already an object
    ('{"city": "Zürich"', '{"city": "Zürich"'),  # not JSON: kept
    ("city=Zürich", "city=Zürich"),
    ('["Zürich"]', '["Zürich"]'),  # JSON, but not an object: kept
    ("42", "42"),
    ("", {}), ("  ", {}),  # no arguments
], ids=["json-object", "object", "truncated", "not-json", "array", "number", "empty", "blank"])
def test_arguments_become_objects_only_from_json_object_text(arguments: Any,
                                                             expected: Any) -> None:
    assert template_arguments(arguments) == expected
    [message] = template_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": arguments}}]}])
    assert message["tool_calls"][0]["function"]["arguments"] == expected


def test_null_fields_and_names_of_tool_results() -> None:
    ready = template_messages([
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "plain", "tool_calls": None, "refusal": None},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": None},
        {"role": "tool", "tool_call_id": "a", "content": "1", "name": "mine"},
        {"role": "tool", "tool_call_id": "unknown", "content": "2"}])
    assert ready[0] == {"role": "user", "content": "hi"}
    assert ready[1] == {"role": "assistant", "content": "plain"}
    assert ready[2] == {"role": "assistant", "content": ""}
    assert [m.get("name") for m in ready[4:]] == ["g", "mine", None]
    assert ready[4]["content"] == ""


def test_bad_json_arguments_render_as_text_in_both_renderers(
        backends: Callable[[str | None], tuple[Backend, Backend]]) -> None:
    messages = copy.deepcopy(MESSAGES)
    messages[2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Zürich"'
    prompt = render_both(backends, QWEN, template_messages(messages), tools=TOOLS)
    assert '{"name": "get_weather", "arguments": "{\\"city\\": \\"Zürich\\""}' in prompt


def test_plain_assistant_turns_with_null_tool_calls_render(
        backends: Callable[[str | None], tuple[Backend, Backend]]) -> None:
    """Clients echo `tool_calls: null` on plain answers; Llama 3.1 tests `'tool_calls' in
    message`, so the key must go (else: `None | length`, a refused conversation)."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Hallo"},
        {"role": "assistant", "content": "Hi", "tool_calls": None},
        {"role": "user", "content": "Wetter?"}]
    render: Any = backends(LLAMA31)[0].apply_chat_template
    with pytest.raises(InvalidRequest):
        render(messages, tools=TOOLS)
    prompt = render_both(backends, LLAMA31, template_messages(messages), tools=TOOLS)
    assert LLAMA_HEAD.format("assistant") + "Hi<|eot_id|>" in prompt


# -- templates without tools -----------------------------------------------------------------


def test_which_templates_read_tools() -> None:
    for name in (QWEN, LLAMA31, MISTRAL, "meta-llama-Llama-3.2-3B-Instruct.jinja"):
        assert template_reads_tools(template(name)), name
    assert not template_reads_tools(template(GEMMA))
    assert not template_reads_tools((TINY_HF / "chat_template.jinja").read_text())
    assert not template_reads_tools("{{ messages }} {# no tools here #} {{ 'tools' }}")
    assert template_reads_tools(None)  # the family does not say: trusted
    # jinja2 alone cannot parse transformers' {% generation %}: the text decides
    assert template_reads_tools("{% generation %}{{ tools }}{% endgeneration %}")
    assert not template_reads_tools("{% generation %}{{ messages }}{% endgeneration %}")


def test_the_tools_description_names_the_tools_their_schemas_and_the_call_form() -> None:
    search = {"type": "function", "function": {"name": "search"}}  # no description, no params
    text = tools_system_prompt([WEATHER, search])
    assert dumps({"name": "get_weather", "description": "Das aktuelle Wetter einer Stadt",
                  "parameters": PARAMETERS}) in text
    assert dumps({"name": "search", "parameters": {"type": "object", "properties": {}}}) in text
    assert '{"name": <the tool\'s name>, "arguments": {' in text


def tiny_turn(role: str, content: str) -> str:
    """A turn of the tiny models' own template (which knows no tools)."""
    return f"<s>{role}\n{content}</s>\n"


def test_a_template_without_tools_gets_them_in_the_system_turn(
        backends: Callable[[str | None], tuple[Backend, Backend]]) -> None:
    """The tiny models' template: tools after the system text, the earlier call in the
    answer's text in the requested form, the result as a user turn."""
    expected = (tiny_turn("system", "You are brief.\n\n" + tools_system_prompt(TOOLS))
                + tiny_turn("user", "Wie ist das Wetter in Zürich?")
                + tiny_turn("assistant", CALL)
                + tiny_turn("user", f"Result of get_weather:\n{RESULT}")
                + tiny_turn("assistant", "21 °C und sonnig.")
                + tiny_turn("user", "Und morgen?") + "<s>assistant\n")
    for backend in backends(None):
        assert backend.chat_template_text is not None
        assert backend.chat_prompt(MESSAGES, TOOLS) == expected
        # without a system message, one is added; without tools, none is described
        assert backend.chat_prompt(MESSAGES[1:2], TOOLS) == (
            tiny_turn("system", tools_system_prompt(TOOLS))
            + tiny_turn("user", "Wie ist das Wetter in Zürich?") + "<s>assistant\n")
        assert backend.chat_prompt(MESSAGES[:2]) == (
            tiny_turn("system", "You are brief.")
            + tiny_turn("user", "Wie ist das Wetter in Zürich?") + "<s>assistant\n")


def test_a_template_without_a_system_role_gets_the_tools_in_the_first_user_turn(
        backends: Callable[[str | None], tuple[Backend, Backend]]) -> None:
    """Gemma 2 refuses a system turn and roles that do not alternate: the tools go before
    the first question, calls and results become alternating turns."""
    described = tools_system_prompt(TOOLS)
    for backend in backends(GEMMA):
        prompt = backend.chat_prompt(MESSAGES[1:], TOOLS)
        assert_in_order(prompt, [
            f"<s><start_of_turn>user\n{described}\n\nWie ist das Wetter in Zürich?"
            "<end_of_turn>\n",
            f"<start_of_turn>model\n{CALL}<end_of_turn>\n",
            f"<start_of_turn>user\nResult of get_weather:\n{RESULT}<end_of_turn>\n",
            "<start_of_turn>model\n21 °C und sonnig.<end_of_turn>\n",
            "<start_of_turn>user\nUnd morgen?<end_of_turn>\n<start_of_turn>model\n"])
        # a system turn the client sent is still refused, as without tools
        with pytest.raises(InvalidRequest) as refused:
            backend.chat_prompt(MESSAGES, TOOLS)
        assert "System role not supported" in refused.value.message


# -- end to end through the GGUF -------------------------------------------------------------


def test_a_gguf_with_the_qwen_template_prompts_with_the_tools() -> None:
    backend = load_llama(template(QWEN))
    try:
        assert backend.chat_template_text == template(QWEN)
        prompt = backend.chat_prompt(MESSAGES, TOOLS)
        assert f"<tools>\n{dumps(WEATHER)}\n</tools>" in prompt
        assert f"<tool_call>\n{CALL}\n</tool_call>" in prompt
        # a request with tools feeds exactly that prompt
        request = GenerationRequest(messages=tuple(MESSAGES), tools=tuple(TOOLS),
                                    params=GenerationParams(temperature=0, max_tokens=1))
        *_, final = backend.generate(request)
        assert final.prompt_tokens == len(backend.tokenize(prompt, add_special=False))
        assert final.prompt_tokens > len(backend.tokenize(backend.chat_prompt(MESSAGES)))
    finally:
        backend.close()
