"""Chat messages as chat templates expect them, and tools for templates that know none.

The API hands over OpenAI-shaped messages; the real families' templates were written for
transformers' conventions. A call's `arguments` arrive as JSON text, while templates render
them with `arguments | tojson` (Qwen 2.5, Mistral v0.3, Llama 3.1) or walk them with
`arguments | items` (Llama 3.1's built-in tools): as text they would come out quoted twice
or fail. `content: null` would print "None"; a `tool_calls: null` key makes Llama 3.1 take
a plain answer for a call (it tests `'tool_calls' in message`).

A template that never reads `tools` (Gemma 2, the tiny test models' one) would drop the
tools silently: `render_chat` then describes them in the system turn (`tools_system_prompt`)
and, when the template does not render `tool_calls` either, writes earlier calls and their
results as plain turns, so the model sees the same call format it is asked to use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from backends.errors import InvalidRequest

__all__ = ["render_chat", "template_messages", "template_reads_tools", "tools_system_prompt"]


def template_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` ready for a chat template (the input is left unchanged).

    - a call's `function.arguments` that is a JSON object as text becomes that object
      (blank text: `{}`); any other text (not JSON, or an array, a number) is kept as it is;
    - `content: None` (an assistant message with calls) becomes "", and other keys whose
      value is None are left out (templates test `is defined`, not "is not none");
    - `tool_calls` that is None or empty is left out;
    - a `tool` message keeps `tool_call_id` and gets the called function's `name` from the
      earlier assistant call with that id, unless it names it itself.
    """
    names: dict[str, str] = {}  # call id -> function name, from the assistant turns so far
    ready: list[dict[str, Any]] = []
    for message in messages:
        item = {key: value for key, value in message.items()
                if value is not None and key != "tool_calls"}
        item.setdefault("content", "")
        calls = message.get("tool_calls")
        if calls:
            item["tool_calls"] = [_template_call(call, names) for call in calls]
        if item.get("role") == "tool" and "name" not in item:
            name = names.get(str(item.get("tool_call_id")))
            if name is not None:
                item["name"] = name
        ready.append(item)
    return ready


_NINE = re.compile(r"[A-Za-z0-9]{9}")
_BASE62 = string.digits + string.ascii_letters


def nine_char_id(call_id: str) -> str:
    """`call_id` as Mistral's templates demand call ids (9 alphanumerics): kept when it is
    one, else derived from it (the same id always gives the same, so a call and its result
    still match)."""
    if _NINE.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(digits)


def with_nine_char_ids(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with every call id (assistant calls, tool results) as `nine_char_id`."""
    out = []
    for message in messages:
        item = dict(message)
        if item.get("tool_calls"):
            item["tool_calls"] = [{**call, "id": nine_char_id(str(call.get("id", "")))}
                                  if isinstance(call, Mapping) else call
                                  for call in item["tool_calls"]]
        if item.get("tool_call_id") is not None:
            item["tool_call_id"] = nine_char_id(str(item["tool_call_id"]))
        out.append(item)
    return out


def template_arguments(arguments: Any) -> Any:
    """A call's arguments as templates expect them: a JSON object text parsed, else as is."""
    if not isinstance(arguments, str):
        return arguments
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def _template_call(call: Any, names: dict[str, str]) -> Any:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    function = dict(call["function"])
    if "arguments" in function:
        function["arguments"] = template_arguments(function["arguments"])
    if call.get("id") is not None and isinstance(function.get("name"), str):
        names[str(call["id"])] = function["name"]
    return {**call, "function": function}


# -- templates without tools ---------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _template_variables(template: str) -> frozenset[str] | None:
    """The variables the template reads from its context; None when jinja2 cannot parse it
    alone (e.g. a transformers-only tag)."""
    try:
        import jinja2
        from jinja2 import meta
    except ImportError:  # pragma: no cover - every family with templates installs jinja2
        return None
    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return None
    return frozenset(meta.find_undeclared_variables(parsed))


def template_reads_tools(template: str | None) -> bool:
    """True when the chat template renders `tools` itself; also for None (the family does
    not expose its template, so it is trusted to)."""
    if template is None:
        return True
    variables = _template_variables(template)
    if variables is None:
        return re.search(r"\btools\b", template) is not None
    return "tools" in variables


def _renders_calls(template: str | None) -> bool:
    return template is None or re.search(r"\btool_calls\b", template) is not None


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """A system-prompt description of function `tools` for a model whose chat template has
    no place for them: each tool's name, description and parameter schema as JSON, and the
    form of a call (one JSON object per call, `{"name": ..., "arguments": {...}}`)."""
    lines = []
    for tool in tools:
        function = tool.get("function", tool)
        described = {"name": function.get("name")}
        if function.get("description"):
            described["description"] = function["description"]
        described["parameters"] = function.get("parameters") or {"type": "object",
                                                                  "properties": {}}
        lines.append(json.dumps(described, ensure_ascii=False))
    return ("You can call these tools (functions). Each is described as JSON: its name, "
            "what it does, and the JSON schema of its arguments:\n"
            + "\n".join(lines)
            + "\n\nTo call a tool, answer with a JSON object and nothing else: "
            '{"name": <the tool\'s name>, "arguments": {<argument name>: <value>, ...}} '
            "with arguments that match the tool's schema. For several calls, write one such "
            "object per line. A tool's result comes back in a later message; then use it to "
            "answer. When no tool is needed, answer in plain text.")


def _call_text(call: Any) -> str:
    function = call.get("function", {}) if isinstance(call, Mapping) else {}
    return json.dumps({"name": function.get("name"), "arguments": function.get("arguments")},
                      ensure_ascii=False)


def _plain_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls written into the assistant's text in the fallback's call format, and results
    as user turns (consecutive results in one), for templates that know neither."""
    plain: list[dict[str, Any]] = []
    for message in messages:
        if message.get("tool_calls"):
            text = "\n".join(_call_text(call) for call in message["tool_calls"])
            content = message.get("content")
            content = f"{content}\n{text}" if isinstance(content, str) and content else text
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            plain.append({**rest, "content": content})
        elif message.get("role") == "tool":
            name = message.get("name") or message.get("tool_call_id")
            result = message.get("content")
            result = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
            text = f"Result of {name}:\n{result}"
            if plain and plain[-1].get("from_tools"):
                plain[-1]["content"] += "\n\n" + text
            else:
                plain.append({"role": "user", "content": text, "from_tools": True})
        else:
            plain.append(message)
    return [{k: v for k, v in m.items() if k != "from_tools"} for m in plain]


def _with_text(message: dict[str, Any], text: str, before: bool) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):  # text parts
        part = {"type": "text", "text": text}
        return {**message, "content": [part, *content] if before else [*content, part]}
    if not content:
        return {**message, "content": text}
    return {**message, "content": f"{text}\n\n{content}" if before else f"{content}\n\n{text}"}


def render_chat(render: Callable[..., str], template: str | None,
                messages: Iterable[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The prompt of `messages` (made template-ready) and `tools` through `render` (a
    backend's `apply_chat_template`) and its template's text (None: unknown).

    A template that reads `tools` gets them as `tools=`. Otherwise the tools are described
    (`tools_system_prompt`) after the system message's text, or in a new system message;
    when the template refuses a system turn the conversation did not have (Gemma 2), they go
    before the first user message's text instead."""
    chat = template_messages(messages)
    if not _renders_calls(template):
        chat = _plain_turns(chat)
    if not tools:
        return render(chat)
    if template_reads_tools(template):
        return render(chat, tools=[dict(tool) for tool in tools])
    described = tools_system_prompt(tools)
    if chat and chat[0].get("role") == "system":
        return render([_with_text(chat[0], described, before=False), *chat[1:]])
    try:
        return render([{"role": "system", "content": described}, *chat])
    except InvalidRequest:
        first_user = next((i for i, m in enumerate(chat) if m.get("role") == "user"), None)
        if first_user is None:
            raise
        chat[first_user] = _with_text(chat[first_user], described, before=True)
        return render(chat)
