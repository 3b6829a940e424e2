"""Tool calls and reasoning in a model's generated text, turned into OpenAI's shapes
(`tool_calls`, `reasoning_content`), for whole answers and streamed ones.

Pure Python with no heavy imports: the API process uses it on every chat answer, backends
to describe their format. One scanner serves both the streamed and the whole answer
(`parse_tool_calls` is the stream fed everything at once), so the two cannot disagree.

How calls are found (`ToolFormat.triggers`, `closer`, `bare_json`): a *region* opens at a
trigger text (`<tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`, a code fence) or at bare JSON
where the format allows it; it holds one JSON object or a list of them, or several objects
separated by whitespace, "," or ";"; a trigger's region may end with the closer. Each
complete object that names a known tool becomes a call the moment its closing brace
arrives; the region ends at the first thing that is not a call. A region that yields no
call is text, verbatim. Whitespace touching calls is their markup (so "Sure.\\n<tool_call>"
gives content "Sure."); text with no calls comes back unchanged.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes tool calls.

    The first fields say how calls are *written*, which is what a constrained-decoding
    grammar for `tool_choice: required` produces: `block_open`, then the calls joined by
    `separator`, each `call_open` + `{"name": <name>, <args_key>: <arguments>}` +
    `call_close`, then `block_close` (see `render`). The last three say how the parser
    *finds* calls in free text, more leniently, because models drift from their documented
    format (llama.cpp drops control tokens when detokenizing, models fence JSON, ...).
    """

    name: str
    call_open: str
    call_close: str
    block_open: str
    block_close: str
    separator: str
    args_key: str
    #: texts that open a region of calls anywhere in the output
    triggers: tuple[str, ...] = ()
    #: text that may end a region opened by a trigger (consumed with the calls)
    closer: str = ""
    #: where bare JSON ("{" or "[") opens a region: never, at the start of the output
    #: (after whitespace), or anywhere
    bare_json: Literal["never", "start", "anywhere"] = "never"

    def render(self, calls: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
        """`calls` (name, arguments) written the way the grammar writes them."""
        return self.block_open + self.separator.join(
            self.call_open + json.dumps({"name": name, self.args_key: dict(arguments)},
                                        ensure_ascii=False) + self.call_close
            for name, arguments in calls) + self.block_close


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (
    # Qwen2.5/Qwen3, Hermes 2 Pro/3: one <tool_call> element per call.
    ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "", "", "\n", "arguments",
               triggers=("<tool_call>",), closer="</tool_call>"),
    # Llama 3.1-3.3 JSON tool calling: the bare object; <|python_tag|> is a control token,
    # so the grammar cannot write it, but the model may.
    ToolFormat("llama3", "", "", "", "", "; ", "parameters",
               triggers=("<|python_tag|>",), bare_json="start"),
    # Mistral v3 tokenizer: [TOOL_CALLS] then a JSON list; llama.cpp may drop the token.
    ToolFormat("mistral", "", "", "[TOOL_CALLS][", "]", ", ", "arguments",
               triggers=("[TOOL_CALLS]",), bare_json="start"),
    # No native format: JSON objects (or a list, or a ```json fence) after any text.
    ToolFormat("json", "", "", "", "", "\n", "arguments",
               triggers=("```json", "```"), closer="```", bare_json="anywhere"),
)}


def detect_format(template: str | None) -> str:
    """The name in FORMATS of the format a chat template teaches (the markers it writes
    an assistant's calls with, or describes to the model); "json" when it names none."""
    text = template or ""
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or "ipython" in text or '"parameters"' in text:
        return "llama3"
    return "json"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, compact


@dataclass(frozen=True)
class Parsed:
    content: str  # the text outside the calls, without their markup; "" if none
    tool_calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallDelta:
    """A call's first delta has its id and name (and no arguments), the next ones only
    argument text: what OpenAI streams and its SDK and LangChain merge by `index`."""

    index: int
    id: str | None
    name: str | None
    arguments: str


Delta = ContentDelta | CallDelta

_ALNUM = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def parse_tool_calls(text: str, fmt: ToolFormat, names: Collection[str]) -> Parsed:
    """The calls of known tools in a whole answer, and the text around them. Never raises:
    what is not a call (malformed, truncated, unknown tool) stays in `content`."""
    stream = ToolCallStream(fmt, names)
    return collect(stream.feed(text) + stream.close())


def collect(deltas: Iterable[Delta]) -> Parsed:
    """The answer a stream's deltas add up to."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            content.append(delta.text)
        elif delta.index in calls:
            calls[delta.index][2] += delta.arguments
        else:
            calls[delta.index] = [delta.id or new_call_id(), delta.name or "", delta.arguments]
    return Parsed("".join(content), tuple(ToolCall(*c) for _, c in sorted(calls.items())))


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")  # NaN and Infinity would not re-serialise


def _call_of(raw: str, names: Collection[str]) -> tuple[str, str] | None:
    """(name, compact arguments) when `raw` is a call of a known tool, else None.

    Accepts "arguments" or "parameters" (Llama writes either), arguments given as a JSON
    string of an object, none at all ({}), and OpenAI's {"function": {...}} nesting."""
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
        if isinstance(obj, dict) and "name" not in obj and isinstance(obj.get("function"), dict):
            obj = obj["function"]
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
        if isinstance(args, str):
            args = json.loads(args, parse_constant=_reject_constant) if args.strip() else None
        if obj["name"] not in names or not isinstance(args, dict | None):
            return None
        return obj["name"], json.dumps(args or {}, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):
        return None


class _Trimmer:
    """Passes text on, but whitespace touching a block (a call, a think block) is part of
    the block's markup: it is held until text follows. Between two texts one joint stays:
    the whitespace before the blocks, else the one after them ("a\\n<call>b" gives "a\\nb")."""

    def __init__(self) -> None:
        self.seen = False  # non-blank text went out
        self._held = ""  # trailing whitespace, not out yet
        self._joint = ""  # the whitespace before the current run of blocks
        self._after = ""  # the whitespace after it so far
        self._after_block = False

    def text(self, text: str) -> str:
        if self._after_block:
            core = text.lstrip()
            self._after += text[:len(text) - len(core)]
            if not core:
                return ""
            joint = (self._joint or self._after) if self.seen else ""
            text, self._joint, self._after, self._after_block = joint + core, "", "", False
        core = text.rstrip()
        if not core:
            self._held += text
            return ""
        out, self._held, self.seen = self._held + core, text[len(core):], True
        return out

    def block(self) -> None:
        if not self._after_block:
            self._joint, self._after_block = self._held, True
        self._held = self._after = ""

    def close(self) -> str:
        return "" if self._after_block else self._held


@dataclass
class _Region:
    """A region being read: where it began (to give it back as text) and how far it got."""

    start: int  # its opener (a trigger, or the bare "{" / "[") in the buffer
    body: int  # just after a trigger (== start for bare JSON)
    closer: str
    pos: int  # the next character to read
    state: str = "body"  # body, list, object_key, object, after_object, after_sep, closer
    in_list: bool = False
    calls: int = 0
    end: int = 0  # just past the last thing consumed (a call, "]", the closer)
    rejected: int = 0  # just past a whole object that is not a call (it stays text whole)
    obj_start: int = 0
    depth: int = 0
    in_string: bool = False


_OBJECT_STOP = re.compile(r'[{}"]')
_STRING_STOP = re.compile(r'["\\]')


class ToolCallStream:
    """`parse_tool_calls`, incrementally: text that cannot be part of a call goes out at
    once; text that may still become one (a partial trigger, an open region, whitespace
    that would touch a call) is held until decided, and `close()` decides the rest."""

    def __init__(self, fmt: ToolFormat, names: Collection[str]) -> None:
        self._fmt = fmt
        self._names = frozenset(names)
        self._buf = ""
        self._pos = 0  # where the undecided text begins in _buf
        self._region: _Region | None = None
        self._had_region = False
        self._calls = 0
        self._content = _Trimmer()
        self._out: list[Delta] = []
        firsts = {t[0] for t in fmt.triggers if t}
        if fmt.bare_json != "never":
            firsts |= {"{", "["}
        self._starts = re.compile("[" + re.escape("".join(sorted(firsts))) + "]") \
            if firsts else None

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        self._run(final=False)
        return self._take()

    def close(self) -> list[Delta]:
        self._run(final=True)
        self._emit_content(self._content.close())
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _run(self, final: bool) -> None:
        while self._scan_region(final) if self._region else self._scan_text(final):
            pass
        if self._region is None and self._pos:
            self._buf, self._pos = self._buf[self._pos:], 0

    def _text(self, text: str) -> None:
        self._emit_content(self._content.text(text))

    def _emit_content(self, text: str) -> None:
        if text:
            self._out.append(ContentDelta(text))

    def _scan_text(self, final: bool) -> bool:
        """Text up to the next region's opener goes out; True when a region opened."""
        buf, i = self._buf, self._pos
        while self._starts and (match := self._starts.search(buf, i)):
            k = match.start()
            opener = self._opener_at(k, final)
            if opener is None:
                i = k + 1
                continue
            self._text(buf[self._pos:k])
            self._pos = k
            if opener == "wait":
                return False
            self._had_region = True
            body = k + len(opener)
            self._region = _Region(start=k, body=body, pos=body, end=body,
                                   closer=self._fmt.closer if opener else "")
            return True
        self._text(buf[self._pos:])
        self._pos = len(buf)
        return False

    def _opener_at(self, k: int, final: bool) -> str | None:
        """The trigger at `k`, "" for bare JSON, "wait" if a trigger may still be
        arriving there, None for neither."""
        buf, found = self._buf, ""
        for trigger in self._fmt.triggers:
            if buf.startswith(trigger, k):
                found = max(found, trigger, key=len)
            elif not final and len(buf) - k < len(trigger) and trigger.startswith(buf[k:]):
                return "wait"  # (also when a shorter one matched: "```" may be "```json")
        if found:
            return found
        bare = self._fmt.bare_json
        if buf[k] in "{[" and (bare == "anywhere" or bare == "start" and not (
                self._had_region or self._content.seen or buf[self._pos:k].strip())):
            return ""
        return None

    def _scan_region(self, final: bool) -> bool:
        """Reads the open region; True when it ended (calls out, or given back as text)."""
        r, buf = self._region, self._buf
        assert r is not None
        while True:
            if r.state == "object":
                if not self._scan_object(r):
                    return False if not final else self._end_region(r)
                call = _call_of(buf[r.obj_start:r.pos], self._names)
                if call is None:
                    r.rejected = r.pos
                    return self._end_region(r)
                self._emit_call(*call)
                r.calls, r.end, r.state = r.calls + 1, r.pos, "after_object"
                continue
            j = r.pos
            while j < len(buf) and buf[j].isspace():
                j += 1
            if j == len(buf):
                return False if not final else self._end_region(r)
            char, state = buf[j], r.state
            if state == "object_key":  # a call begins {"; prose's lone "{" goes at once
                if char != '"':
                    return self._end_region(r)
                r.state, r.pos, r.depth, r.in_string = "object", r.obj_start, 0, False
            elif char == "{" and state in ("body", "list", "after_object", "after_sep"):
                r.state, r.obj_start, r.pos = "object_key", j, j + 1
            elif char == "[" and state == "body":
                r.state, r.pos, r.in_list = "list", j + 1, True
            elif char in ",;" and state == "after_object":
                r.state, r.pos = "after_sep", j + 1
            elif char == "]" and r.in_list and state in ("after_object", "after_sep"):
                r.state, r.pos, r.end, r.in_list = "closer", j + 1, j + 1, False
            elif r.closer and not r.in_list and state in ("after_object", "closer"):
                if buf.startswith(r.closer, j):
                    r.end = j + len(r.closer)
                    return self._end_region(r)
                if not final and len(buf) - j < len(r.closer) and r.closer.startswith(buf[j:]):
                    return False
                return self._end_region(r)
            else:
                return self._end_region(r)

    def _scan_object(self, r: _Region) -> bool:
        """Advances over a JSON object (strings and escapes understood); True at its end."""
        buf, i = self._buf, r.pos
        while i < len(buf):
            if r.in_string:
                if not (match := _STRING_STOP.search(buf, i)):
                    i = len(buf)
                    break
                i = match.end() + (buf[match.start()] == "\\")  # an escape skips a char
                r.in_string = buf[match.start()] == "\\"
                continue
            if not (match := _OBJECT_STOP.search(buf, i)):
                i = len(buf)
                break
            i, char = match.end(), match.group()
            if char == '"':
                r.in_string = True
            elif char == "{":
                r.depth += 1
            else:
                r.depth -= 1
                if r.depth == 0:
                    r.pos = i
                    return True
        r.pos = i
        return False

    def _end_region(self, r: _Region) -> bool:
        """Calls made: reading goes on after what the region consumed. None: its opener
        (and a whole object that is not a call: {"plan": {"name": ...}} is no call) is
        text, and what followed is read again as text."""
        self._region = None
        if r.calls:
            self._pos = r.end
        else:
            opener_end = max(r.body, r.start + 1, r.rejected)
            self._text(self._buf[r.start:opener_end])
            self._pos = opener_end
        return True

    def _emit_call(self, name: str, arguments: str) -> None:
        self._content.block()
        index, self._calls = self._calls, self._calls + 1
        self._out.append(CallDelta(index, new_call_id(), name, ""))
        self._out.append(CallDelta(index, None, None, arguments))


def split_reasoning(text: str, open_tag: str = "<think>", close_tag: str = "</think>",
                    *, started: bool | None = None) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer; reasoning None when it has no think block.

    `started`: True when the prompt opened the block (the answer begins inside it), False
    when it did not (only `open_tag` opens one), None to tell from the text: a `close_tag`
    before any `open_tag` means the answer began inside the block (DeepSeek-R1, QwQ)."""
    stream = ReasoningStream(open_tag, close_tag, started=started)
    parts = stream.feed(text) + stream.close()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    return (reasoning if stream.found else None), "".join(
        t for kind, t in parts if kind == "content")


class ReasoningStream:
    """`split_reasoning`, incrementally: feed() and close() return ("reasoning" or
    "content", text) pieces. Partial markers are held back. With `started=None` and no
    marker yet, everything is held (a "</think>" may still show it was reasoning): pass
    `started` when the prompt tells (it ends with the open tag, or it does not)."""

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>",
                 *, started: bool | None = None) -> None:
        self._open, self._close = open_tag, close_tag
        self._auto = started is None
        self._phase = "inside" if started else "before"
        self.found = bool(started)  # a think block was seen
        self._buf = ""
        self._searched = 0  # (auto) where the next search for a marker starts
        self._content = _Trimmer()
        self._reasoning = _Trimmer()
        self._reasoning.block()  # its edges' whitespace goes
        self._out: list[tuple[str, str]] = []

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        self._run(final=False)
        out, self._out = self._out, []
        return out

    def close(self) -> list[tuple[str, str]]:
        self._run(final=True)
        self._emit("content", self._content.close())
        out, self._out = self._out, []
        return out

    def _emit(self, kind: str, text: str) -> None:
        if text:
            self._out.append((kind, text))

    def _pass(self, kind: str, text: str) -> None:
        trimmer = self._reasoning if kind == "reasoning" else self._content
        self._emit(kind, trimmer.text(text))

    def _run(self, final: bool) -> None:
        while self._step(final):
            pass

    def _step(self, final: bool) -> bool:
        buf = self._buf
        if self._phase == "after":
            self._pass("content", buf)
            self._buf = ""
            return False
        if self._phase == "before" and self._auto:
            return self._step_auto(final)
        tag, kind = (self._open, "content") if self._phase == "before" \
            else (self._close, "reasoning")
        at = buf.find(tag)
        if at == -1:
            keep = 0 if final else _partial_tail(buf, tag)
            self._pass(kind, buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        self._pass(kind, buf[:at])
        self._buf = buf[at + len(tag):]
        self._enter("inside" if self._phase == "before" else "after")
        return True

    def _step_auto(self, final: bool) -> bool:
        """Nothing decided yet: held until a marker shows which side the text is on."""
        buf, start = self._buf, self._searched
        opened, closed = buf.find(self._open, start), buf.find(self._close, start)
        if closed != -1 and (opened == -1 or closed < opened):
            self._pass("reasoning", buf[:closed])  # the prompt had opened the block
            self._buf = buf[closed + len(self._close):]
            self._enter("after")
            return True
        if opened != -1 and (final or len(buf) >= opened + len(self._close) - 1):
            self._pass("content", buf[:opened])
            self._buf = buf[opened + len(self._open):]
            self._enter("inside")
            return True
        if final:
            self._pass("content", buf)
            self._buf = ""
            return False
        self._searched = max(0, len(buf) - max(len(self._open), len(self._close)) + 1)
        return False

    def _enter(self, phase: str) -> None:
        self._phase, self.found = phase, True
        self._content.block()


def _partial_tail(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
