"""The OpenAI-compatible and queue-style routes are metered like the native ones, on SQLite
and on Postgres: the key's counters and /usage agree with the `usage` the responses report.
Each of `n` choices is a generation of its own: a request, and its prompt processed again
(OpenAI's `usage` counts the prompt once)."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.auth.conftest import ADMIN, ADMIN_KEY, bearer, create_key, key_info, models_config
from tests.conftest import parse_sse

CHAT = [{"role": "user", "content": "tell me a story"}]


def usage_totals(server: Any, key_id: int) -> dict[str, int]:
    report = server.client.get("/admin/usage", params={"key_id": key_id}, headers=ADMIN)
    totals: dict[str, int] = report.json()["totals"]
    return totals


def test_chat_with_n_choices_counts_each_choice(auth_server: Any,
                                                store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    key_id, secret = create_key(server.client, max_tokens=100_000, max_requests=10)
    answer = server.client.post("/v1/chat/completions", headers=bearer(secret), json={
        "model": "tiny", "messages": CHAT, "max_tokens": 6, "n": 3, "temperature": 0})
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    info = key_info(server.client, key_id)
    assert (info["used_requests"], info["reserved_tokens"]) == (3, 0)
    assert info["used_tokens"] == 3 * usage["prompt_tokens"] + usage["completion_tokens"]
    totals = usage_totals(server, key_id)
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == \
        (3, 3 * usage["prompt_tokens"], usage["completion_tokens"])
    assert totals["words"] == 3 * 4


def test_streamed_completion_usage_matches(auth_server: Any,
                                           store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    key_id, secret = create_key(server.client, max_tokens=100_000)
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 8, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    with server.client.stream("POST", "/v1/completions", json=body,
                              headers=bearer(secret)) as response:
        events = [data for _, data in parse_sse(response.iter_lines())]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    info = key_info(server.client, key_id)
    assert (info["used_requests"], info["reserved_tokens"]) == (2, 0)
    assert info["used_tokens"] == 2 * usage["prompt_tokens"] + usage["completion_tokens"]


def test_embeddings_usage_matches(auth_server: Any,
                                  store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    key_id, secret = create_key(server.client, max_tokens=1000)
    answer = server.client.post("/v1/embeddings", headers=bearer(secret), json={
        "model": "tiny", "input": ["hello world", "a brown fox"]})
    assert answer.status_code == 200, answer.text
    tokens = answer.json()["usage"]["prompt_tokens"]
    assert tokens > 0
    assert key_info(server.client, key_id)["used_tokens"] == tokens
    assert usage_totals(server, key_id)["prompt_tokens"] == tokens


def test_clamped_queue_job_is_one_request(auth_server: Any,
                                          store_config: dict[str, Any]) -> None:
    """A tokens_limit beyond the context is lowered to what the context leaves: the key
    pays for one request and what was generated (however many attempts the server made).
    A small context keeps the clamped generation small (tens of tokens, not thousands)."""
    small = models_config()["models"]
    small["tiny"] = {**small["tiny"], "model_params": {"n_ctx": 64, "n_threads": 2}}
    server = auth_server(models=small, **store_config)
    key_id, secret = create_key(server.client, max_tokens=100_000, max_requests=5)
    answer = server.client.post("/generate", headers=bearer(secret), json={
        "job_id": "big", "meta": {"model": "tiny", "tokens_limit": 5000}, "content": "hi"})
    assert answer.status_code == 200, answer.text
    clamped = re.search(r"clamped to (\d+)", answer.headers["warning"])
    assert clamped is not None, answer.headers["warning"]
    room = int(clamped.group(1))
    assert 0 < room < 5000
    info = key_info(server.client, key_id)
    assert (info["used_requests"], info["reserved_tokens"]) == (1, 0)
    totals = usage_totals(server, key_id)
    assert (totals["requests"], totals["errors"]) == (1, 0)
    assert 0 < totals["completion_tokens"] <= room
    assert info["used_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"]


LONG_CHAT = [{"role": "system", "content": "You answer questions about the shop's opening "
              "hours, repairs and rentals, in two sentences at most, politely. " * 3},
             {"role": "user", "content": "When do you open on Saturday?"}]


def _two_chats(server: Any, secret: str) -> list[dict[str, int]]:
    """The same long chat twice: the second reuses the first's cached prompt cells."""
    usages = []
    for _ in range(2):
        answer = server.client.post("/v1/chat/completions", headers=bearer(secret), json={
            "model": "tiny", "messages": LONG_CHAT, "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200, answer.text
        usages.append(answer.json()["usage"])
    return usages


def test_cached_prompt_tokens_are_reported_and_charged_in_full_by_default(
        auth_server: Any) -> None:
    server = auth_server()
    key_id, secret = create_key(server.client, max_tokens=100_000)
    first, second = _two_chats(server, secret)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == second["prompt_tokens"] - 1
    info = key_info(server.client, key_id)
    assert info["used_tokens"] == first["total_tokens"] + second["total_tokens"]


def test_cached_prompt_tokens_are_free_when_so_configured(auth_server: Any) -> None:
    server = auth_server(auth={"enabled": True, "admin_key": ADMIN_KEY,
                               "charge_cached_prompt_tokens": False})
    key_id, secret = create_key(server.client, max_tokens=100_000)
    first, second = _two_chats(server, secret)
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached > 20
    info = key_info(server.client, key_id)
    assert info["used_tokens"] == first["total_tokens"] + second["total_tokens"] - cached
    totals = usage_totals(server, key_id)
    assert totals["prompt_tokens"] == first["prompt_tokens"] + second["prompt_tokens"] - cached


def _chat_usage(server: Any, secret: str) -> dict[str, Any]:
    answer = server.client.post("/v1/chat/completions", headers=bearer(secret), json={
        "model": "tiny", "messages": LONG_CHAT, "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200, answer.text
    usage: dict[str, Any] = answer.json()["usage"]
    return usage


def test_a_key_never_reuses_another_keys_cached_prompt_by_default(auth_server: Any) -> None:
    """Otherwise cached_tokens (and the time to first token) would tell a key what another
    key's prompts begin with."""
    server = auth_server()
    _, alice = create_key(server.client, max_tokens=100_000)
    _, mallory = create_key(server.client, max_tokens=100_000)
    assert _chat_usage(server, alice)["prompt_tokens_details"]["cached_tokens"] == 0
    probe = _chat_usage(server, mallory)
    assert probe["prompt_tokens_details"]["cached_tokens"] == 0
    again = _chat_usage(server, alice)  # her own cache still serves her
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1


def test_keys_share_cached_prompts_when_the_scope_is_all(auth_server: Any) -> None:
    server = auth_server(auth={"enabled": True, "admin_key": ADMIN_KEY,
                               "prefix_cache_scope": "all"})
    _, alice = create_key(server.client, max_tokens=100_000)
    _, bob = create_key(server.client, max_tokens=100_000)
    _chat_usage(server, alice)
    shared = _chat_usage(server, bob)
    assert shared["prompt_tokens_details"]["cached_tokens"] == shared["prompt_tokens"] - 1
