"""Every route × every kind of caller: who gets in, and the error each one gets, on SQLite
and on Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.auth.conftest import ADMIN, STORES, auth_config, bearer, create_key, store_settings
from tests.conftest import LiveServer, assert_error

# (method, path, body, kind): kind "model" = uses a model, "card" = shows a model (a model
# the key may not use is not shown), "user" = any key, "admin"
ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("POST", "/generate", {"prompt": "hello", "model": "tiny"}, "model"),
    ("POST", "/agenerate", {"prompt": "hello", "model": "tiny"}, "model"),
    ("POST", "/embeddings", {"text": "hello", "model": "tiny"}, "model"),
    ("POST", "/generate", {"job_id": "j1", "meta": {"model": "tiny", "tokens_limit": 4},
                           "content": "hello"}, "model"),
    ("POST", "/chat_completion", {"job_id": "j2", "meta": {"model": "tiny", "tokens_limit": 4},
                                  "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("POST", "/tokenize", {"model": "tiny", "text": "hello"}, "model"),
    ("POST", "/detokenize", {"model": "tiny", "tokens": [1, 2]}, "model"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "max_tokens": 4,
                                      "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "max_tokens": 4, "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 4}, "model"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 4,
                                 "stream": True}, "model"),
    ("POST", "/v1/embeddings", {"model": "tiny", "input": "hello"}, "model"),
    ("GET", "/v1/models/tiny", None, "card"),
    ("GET", "/v1/models", None, "user"),
    ("GET", "/usage", None, "user"),
    ("GET", "/admin/keys", None, "admin"),
    ("POST", "/admin/keys", {"name": "made in the matrix"}, "admin"),
    ("GET", "/admin/keys/1", None, "admin"),
    ("PATCH", "/admin/keys/1", {"email": "admin@example.org"}, "admin"),
    ("POST", "/admin/keys/999/revoke", None, "admin"),
    ("POST", "/admin/keys/999/rotate", None, "admin"),
    ("GET", "/admin/usage", None, "admin"),
    ("GET", "/metrics", None, "admin"),
]
CALLERS = ["no key", "malformed header", "unknown key", "expired", "not yet valid", "revoked",
           "wrong model", "user", "admin"]


@pytest.fixture(scope="module", params=STORES)
def matrix(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict]]:
    """One server per store: validity windows and revocation are checked on both."""
    directory: Path = tmp_path_factory.mktemp("matrix")
    config = auth_config(**store_settings(request, request.param))
    config["auth"]["failed_auth_limit"] = 100_000  # its callers fail hundreds of times
    server = LiveServer(config, directory).start()
    client = server.client
    day = timedelta(days=1)
    today = datetime.now(UTC)
    headers = {
        "no key": {},
        "malformed header": {"Authorization": "Basic dXNlcjpwYXNz"},
        "unknown key": bearer("llmapi-" + "x" * 43),
        "expired": bearer(create_key(client, expires_at=(today - 2 * day).date().isoformat())[1]),
        "not yet valid": bearer(create_key(client, valid_from=(today + day).isoformat())[1]),
        "wrong model": bearer(create_key(client, allowed_models=["rev"])[1]),
        "user": {"X-API-Key": create_key(client, allowed_models=["tiny", "rev"])[1]},
        "admin": ADMIN,
    }
    revoked_id, revoked = create_key(client)
    client.post(f"/admin/keys/{revoked_id}/revoke", json={"reason": "left"}, headers=ADMIN)
    headers["revoked"] = bearer(revoked)
    yield server, headers
    server.stop()


def expected(caller: str, kind: str) -> tuple[int, str | None, tuple[str, ...]]:
    """(status, error code, words the message must contain); 0 = the route's success."""
    rejected = {
        "no key": (401, "missing_api_key", ("Authorization: Bearer",)),
        "malformed header": (401, "invalid_api_key", ("malformed",)),
        "unknown key": (401, "invalid_api_key", ("not valid",)),
        "expired": (401, "api_key_not_valid_now", ("expired on", "UTC")),
        "not yet valid": (401, "api_key_not_valid_now", ("not valid yet", "UTC")),
        "revoked": (401, "api_key_revoked", ("revoked", "left")),
    }
    if caller in rejected:
        return rejected[caller]
    if kind == "admin" and caller != "admin":
        return 403, "admin_required", ("admin key",)
    if kind == "model" and caller == "wrong model":
        return 403, "model_not_allowed", ("tiny", "rev")
    if kind == "card" and caller == "wrong model":
        return 404, "model_not_found", ("available: rev.",)
    return 0, None, ()


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("method", "path", "body", "kind"), ROUTES)
def test_route_and_caller(matrix: tuple[LiveServer, dict], caller: str, method: str, path: str,
                          body: dict[str, Any] | None, kind: str) -> None:
    server, headers = matrix
    response = server.client.request(method, path, json=body, headers=headers[caller])
    status, code, mentions = expected(caller, kind)
    if status:
        error = assert_error(response, status, code, mentions)
        if status == 401:
            assert response.headers["www-authenticate"] == "Bearer"
        assert "llmapi-" not in error["message"]  # never echo a key
        return
    if path.endswith("/999/revoke") or path.endswith("/999/rotate"):
        assert_error(response, 404, "key_not_found", ("999",))  # authorised, no such key
        return
    assert response.status_code in (200, 201), response.text
    if path == "/agenerate" or (body or {}).get("stream"):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "data:" in response.text and "event: error" not in response.text
    if path == "/v1/models":  # a key sees the models it may use
        names = {m["id"] for m in response.json()["data"]}
        assert names == ({"rev"} if caller == "wrong model" else {"tiny", "rev"})


@pytest.mark.parametrize("path", ["/health", "/ready", "/check"])
def test_open_routes_need_no_key(matrix: tuple[LiveServer, dict], path: str) -> None:
    server, _ = matrix
    assert server.client.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
def test_api_docs_need_a_key(matrix: tuple[LiveServer, dict], path: str) -> None:
    server, headers = matrix
    response = server.client.get(path)
    if path == "/redoc":  # not served at all
        assert_error(response, 404)
        return
    assert_error(response, 401, "missing_api_key")
    assert server.client.get(path, headers=headers["user"]).status_code == 200


def test_every_route_but_the_open_ones_is_guarded(matrix: tuple[LiveServer, dict]) -> None:
    """A route added later without the router-level guard fails this test."""
    server, headers = matrix
    open_routes = {"/health", "/ready", "/check"}
    tested = {path.replace("/1", "/{key_id}").replace("/999", "/{key_id}")
              .replace("/models/tiny", "/models/{model}") for _, path, _, _ in ROUTES}
    paths = server.client.get("/openapi.json", headers=headers["admin"]).json()["paths"]
    assert len(paths) >= len(tested)
    for path, operations in paths.items():
        if path in open_routes:
            continue
        assert path in tested, f"{path} is not in the auth matrix"
        for method in operations:
            response = server.client.request(
                method, path.replace("{key_id}", "1").replace("{model}", "tiny"))
            assert_error(response, 401, "missing_api_key")
