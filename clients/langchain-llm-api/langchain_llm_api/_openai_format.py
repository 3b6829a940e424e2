"""LangChain messages ⇄ the OpenAI chat-completions wire format: text content, an
assistant's tool calls and tool results in the history; answers' tool calls, whole or
streamed as chunks that LangChain merges by index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    InvalidToolCall,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from langchain_llm_api.errors import error_from_event

_ROLES: tuple[tuple[type[BaseMessage], str], ...] = (
    (SystemMessage, "system"), (HumanMessage, "user"), (AIMessage, "assistant"),
    (ToolMessage, "tool"),
)
# Content blocks of an AIMessage that repeat its tool calls (Anthropic's `tool_use`,
# LangChain's v1 `tool_call` blocks) or hold its reasoning: `tool_calls` carries the calls,
# and reasoning is not sent back.
_AI_BLOCKS_NOT_SENT = frozenset({"tool_use", "tool_call", "tool_call_chunk",
                                 "invalid_tool_call", "reasoning", "thinking"})


def message_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    return [_message_dict(m) for m in messages]


def _role(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage):
        return message.role
    for cls, role in _ROLES:
        if isinstance(message, cls):
            return role
    raise ValueError(f"{type(message).__name__} is not supported: ChatLLMAPI sends system, "
                     "user, assistant and tool messages")


def _message_dict(message: BaseMessage) -> dict[str, Any]:
    ai = isinstance(message, AIMessage)
    out: dict[str, Any] = {"role": _role(message),
                           "content": _content(message.content, ai)}
    if message.name:
        out["name"] = message.name
    if isinstance(message, AIMessage):
        calls = [_call_out(c) for c in message.tool_calls]
        calls += [_invalid_call_out(c) for c in message.invalid_tool_calls]
        if calls:
            out["tool_calls"] = calls
            if not out["content"]:
                out["content"] = None  # OpenAI's way: an assistant turn of only calls
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    return out


def _call_out(call: ToolCall) -> dict[str, Any]:
    return {"id": call["id"] or "", "type": "function",
            "function": {"name": call["name"],
                         "arguments": json.dumps(call["args"], ensure_ascii=False)}}


def _invalid_call_out(call: InvalidToolCall) -> dict[str, Any]:
    """A call whose arguments did not parse goes back as the model wrote it."""
    return {"id": call.get("id") or "", "type": "function",
            "function": {"name": call.get("name") or "", "arguments": call.get("args") or ""}}


def _content(content: str | list[Any], ai: bool = False) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, str]] = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif ai and isinstance(part, dict) and part.get("type") in _AI_BLOCKS_NOT_SENT:
            continue
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content part of type {kind!r} is not supported; "
                             "only text parts are")
    return parts


def usage_metadata(usage: Any) -> UsageMetadata | None:
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    total = int(usage.get("total_tokens") or prompt + completion)
    return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=total)


def chat_result(answer: dict[str, Any]) -> ChatResult:
    """A ChatResult from a `chat.completion` object."""
    choice = answer["choices"][0]
    finish_reason = choice.get("finish_reason")
    metadata = {"model_name": answer.get("model"), "finish_reason": finish_reason,
                "model_provider": "llm-api"}
    if answer.get("system_fingerprint"):
        metadata["system_fingerprint"] = answer["system_fingerprint"]
    calls, invalid = _calls_in(choice["message"].get("tool_calls") or [])
    message = AIMessage(content=choice["message"].get("content") or "",
                        id=answer.get("id"), response_metadata=metadata,
                        usage_metadata=usage_metadata(answer.get("usage")),
                        tool_calls=calls, invalid_tool_calls=invalid)
    generation = ChatGeneration(message=message,
                                generation_info={"finish_reason": finish_reason})
    return ChatResult(generations=[generation],
                      llm_output={"token_usage": answer.get("usage"),
                                  "model_name": answer.get("model")})


def chunk_from_event(data: str) -> ChatGenerationChunk | None:
    """A ChatGenerationChunk from one `chat.completion.chunk` (None if it carries nothing);
    an error object (a failure after the stream began) raises its exception."""
    answer = json.loads(data)
    if "error" in answer:
        raise error_from_event(data)
    usage = usage_metadata(answer.get("usage"))
    choices = answer.get("choices") or []
    if not choices and usage is None:
        return None
    delta = choices[0].get("delta") or {} if choices else {}
    finish_reason = choices[0].get("finish_reason") if choices else None
    metadata: dict[str, Any] = {"model_provider": "llm-api"}
    info: dict[str, Any] | None = None
    if finish_reason:
        metadata.update(finish_reason=finish_reason, model_name=answer.get("model"))
        info = {"finish_reason": finish_reason}
    chunks = [tool_call_chunk(name=(c.get("function") or {}).get("name"),
                              args=(c.get("function") or {}).get("arguments"),
                              id=c.get("id"), index=c.get("index"))
              for c in delta.get("tool_calls") or []]
    message = AIMessageChunk(content=delta.get("content") or "", id=answer.get("id"),
                             usage_metadata=usage, response_metadata=metadata,
                             tool_call_chunks=chunks)
    return ChatGenerationChunk(message=message, generation_info=info)


def _calls_in(raw_calls: list[dict[str, Any]]) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """An answer's `tool_calls`; a call whose arguments are not a JSON object is kept as an
    invalid tool call (with the text the model wrote)."""
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for raw in raw_calls:
        function = raw.get("function") or {}
        name, text = function.get("name") or "", function.get("arguments") or ""
        try:
            args = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            invalid.append(invalid_tool_call(name=name, args=text, id=raw.get("id"),
                                             error=f"arguments are not JSON: {exc}"))
            continue
        if not isinstance(args, dict):
            invalid.append(invalid_tool_call(name=name, args=text, id=raw.get("id"),
                                             error="arguments are not a JSON object"))
            continue
        calls.append(tool_call(name=name, args=args, id=raw.get("id")))
    return calls, invalid
