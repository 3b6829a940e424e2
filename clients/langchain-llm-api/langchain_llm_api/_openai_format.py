"""LangChain messages ⇄ the OpenAI chat-completions wire format (text only)."""

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
    SystemMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from langchain_llm_api.errors import error_from_event

_ROLES: tuple[tuple[type[BaseMessage], str], ...] = (
    (SystemMessage, "system"), (HumanMessage, "user"), (AIMessage, "assistant"),
)


def message_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    return [_message_dict(m) for m in messages]


def _role(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage):
        return message.role
    for cls, role in _ROLES:
        if isinstance(message, cls):
            return role
    raise ValueError(f"{type(message).__name__} is not supported: ChatLLMAPI sends system, "
                     "user and assistant messages (no tool calling)")


def _message_dict(message: BaseMessage) -> dict[str, Any]:
    if isinstance(message, AIMessage) and message.tool_calls:
        raise ValueError("AIMessage with tool_calls is not supported: no tool calling")
    out: dict[str, Any] = {"role": _role(message), "content": _content(message.content)}
    if message.name:
        out["name"] = message.name
    return out


def _content(content: str | list[Any]) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, str]] = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
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
    message = AIMessage(content=choice["message"].get("content") or "",
                        id=answer.get("id"), response_metadata=metadata,
                        usage_metadata=usage_metadata(answer.get("usage")))
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
    message = AIMessageChunk(content=delta.get("content") or "", id=answer.get("id"),
                             usage_metadata=usage, response_metadata=metadata)
    return ChatGenerationChunk(message=message, generation_info=info)
