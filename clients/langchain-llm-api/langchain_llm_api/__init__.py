"""LangChain integration for llm-api servers: `LLMAPI`, `ChatLLMAPI`, `LLMAPIEmbeddings`."""

from langchain_llm_api.chat_models import ChatLLMAPI
from langchain_llm_api.embeddings import LLMAPIEmbeddings
from langchain_llm_api.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    LLMAPIError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
)
from langchain_llm_api.llms import LLMAPI

__version__ = "0.1.0"

__all__ = [
    "LLMAPI",
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ChatLLMAPI",
    "InternalServerError",
    "LLMAPIEmbeddings",
    "LLMAPIError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitError",
]
