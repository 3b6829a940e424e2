"""Usage reports add up to exactly what was sent, on SQLite and on Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.auth.conftest import ADMIN, bearer, create_key
from tests.auth.test_quotas import prompt_tokens
from tests.conftest import assert_error

PROMPTS = ["hello world", "the quick brown fox jumps", "one two three four five six"]


def test_usage_report_numbers_equal_what_was_sent(auth_server: Any,
                                                 store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    key_id, secret = create_key(server.client)
    other_id, other = create_key(server.client)
    before = server.model_stats("tiny")["tokens_generated"]
    for i, prompt in enumerate(PROMPTS):
        body = {"prompt": prompt, "model": "tiny", "params": {"max_tokens": 5 + i}}
        if i % 2:
            with server.client.stream("POST", "/agenerate", json=body,
                                      headers=bearer(secret)) as response:
                assert response.status_code == 200
                response.read()
        else:
            assert server.client.post("/generate", json=body,
                                      headers=bearer(secret)).status_code == 200
    generated = server.model_stats("tiny")["tokens_generated"] - before
    assert server.client.post("/generate", json={"prompt": "not mine", "model": "rev"},
                              headers=bearer(other)).status_code == 200
    bad = server.client.post("/generate", json={"prompt": "x y", "model": "tiny", "params": {
        "max_tokens": 4000}}, headers=bearer(secret))
    assert_error(bad, 400, "context_length_exceeded")

    report = server.client.get("/usage", headers=bearer(secret)).json()
    today = datetime.now(UTC).date()
    expected = {"requests": 4, "errors": 1,
                "prompt_tokens": sum(prompt_tokens(p) for p in PROMPTS),
                "completion_tokens": generated,
                "words": sum(len(p.split()) for p in PROMPTS) + 2}
    assert report["key_id"] == key_id
    assert report["totals"] == expected
    assert report["days"] == [{"day": today.isoformat(), **expected}]

    yesterday = (today - timedelta(days=1)).isoformat()
    empty = server.client.get("/usage", params={"from": yesterday, "to": yesterday},
                              headers=bearer(secret)).json()
    assert empty["days"] == [] and empty["totals"]["requests"] == 0
    same = server.client.get("/usage", params={"from": today.isoformat()},
                             headers=bearer(secret)).json()
    assert same["totals"] == expected

    everyone = server.client.get("/admin/usage", headers=ADMIN).json()
    assert everyone["totals"]["requests"] == 5
    one = server.client.get("/admin/usage", params={"key_id": other_id}, headers=ADMIN).json()
    assert one["totals"] == {"requests": 1, "errors": 0, "prompt_tokens": 0,
                             "completion_tokens": 1, "words": 2}
    by_model = server.client.get("/admin/usage", params={"model": "tiny"},
                                 headers=ADMIN).json()
    assert by_model["totals"] == expected


def test_bad_usage_filters(auth_server: Any, store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    assert_error(server.client.get("/usage", params={"from": "yesterday"}, headers=ADMIN),
                 422, "invalid_parameter", ("from",))
    assert_error(server.client.get("/usage", params={"from": "2026-02-02", "to": "2026-02-01"},
                                   headers=ADMIN), 422, "invalid_parameter", ("before",))
