"""API keys on a live server: the classes send the key, and the server's 401/403/429 answers
become typed exceptions. Needs a server with keys (llm-api's issue 4); skips on one without,
except in CI (CI=true), where a missing server must fail, not hide."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from langchain_llm_api import (
    LLMAPI,
    AuthenticationError,
    ChatLLMAPI,
    LLMAPIEmbeddings,
    PermissionDeniedError,
    RateLimitError,
)
from lc_servers import ServerProcess, server_has_auth

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
pytestmark = pytest.mark.skipif(not IN_CI and not server_has_auth(),
                                reason="this llm-api has no API keys")


def create_key(server: ServerProcess, **limits: Any) -> str:
    answer = httpx.post(f"{server.url}/admin/keys", headers=server.headers(), timeout=30,
                        json={"name": "langchain tests", **limits})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["secret"])


@pytest.mark.parametrize("cls", [LLMAPI, ChatLLMAPI, LLMAPIEmbeddings])
def test_missing_or_wrong_key_is_an_authentication_error(
        llm_api_server: ServerProcess, monkeypatch: pytest.MonkeyPatch, cls: Any) -> None:
    monkeypatch.delenv("LLM_API_KEY", raising=False)
    for key in (None, "llmapi-not-a-real-key"):
        client = cls(base_url=llm_api_server.url, api_key=key, model="tiny")
        call = client.embed_query if cls is LLMAPIEmbeddings else client.invoke
        with pytest.raises(AuthenticationError) as refused:
            call("hi")
        assert refused.value.status_code == 401 and refused.value.message
        assert "llmapi-not-a-real-key" not in str(refused.value)


def test_a_user_key_works_and_its_model_list_is_enforced(
        llm_api_server: ServerProcess) -> None:
    key = create_key(llm_api_server, allowed_models=["tiny"])
    llm = LLMAPI(base_url=llm_api_server.url, api_key=key, max_tokens=4)
    assert isinstance(llm.invoke("hi"), str)
    with pytest.raises(PermissionDeniedError) as denied:
        llm.invoke("hi", model="rev")
    assert denied.value.status_code == 403 and "tiny" in denied.value.message


async def test_rate_limit_is_a_rate_limit_error_with_retry_after(
        llm_api_server: ServerProcess) -> None:
    key = create_key(llm_api_server, rpm=1)
    llm = LLMAPI(base_url=llm_api_server.url, api_key=key, max_tokens=4)
    assert isinstance(await llm.ainvoke("hi"), str)
    with pytest.raises(RateLimitError) as limited:
        await llm.ainvoke("hi")
    assert limited.value.status_code == 429
    assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 60
