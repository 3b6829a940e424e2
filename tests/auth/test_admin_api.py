"""The admin API: create, list, show, change, revoke, rotate — on SQLite and on Postgres."""

from __future__ import annotations

from typing import Any

from tests.auth.conftest import ADMIN, ADMIN_KEY, bearer, create_key, key_info
from tests.conftest import assert_error


def test_key_lifecycle(auth_server: Any, store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    client = server.client
    created = client.post("/admin/keys", headers=ADMIN, json={
        "name": "Alice", "email": "alice@example.org", "organisation": "ACME",
        "valid_from": "2020-01-01", "expires_at": "2999-12-31T23:00:00",
        "max_requests": 10, "max_tokens": 5000, "rpm": 60, "tpm": 10_000, "max_parallel": 2,
        "allowed_models": ["rev"]})
    assert created.status_code == 201, created.text
    body = created.json()
    secret, key_id = body["secret"], body["id"]
    assert secret.startswith("llmapi-") and len(secret) == len("llmapi-") + 43
    assert body["prefix"] == secret[:13] and body["role"] == "user"
    assert body["valid_from"] == "2020-01-01T00:00:00Z"
    assert body["expires_at"] == "2999-12-31T23:00:00Z"
    assert client.post("/generate", json={"prompt": "ab", "model": "rev"},
                       headers=bearer(secret)).json() == "ba"

    listed = client.get("/admin/keys", headers=ADMIN).json()
    assert [k["name"] for k in listed] == ["admin (from settings)", "Alice"]
    assert all("secret" not in k and "secret_hash" not in k for k in listed)
    shown = key_info(client, key_id)
    assert shown["used_requests"] == 1 and shown["last_used_at"] is not None

    changed = client.patch(f"/admin/keys/{key_id}", headers=ADMIN,
                           json={"max_tokens": None, "rpm": 5, "allowed_models": None})
    assert changed.status_code == 200
    assert (changed.json()["max_tokens"], changed.json()["rpm"],
            changed.json()["allowed_models"], changed.json()["max_requests"]) == \
        (None, 5, [], 10)

    rotated = client.post(f"/admin/keys/{key_id}/rotate", headers=ADMIN).json()
    assert rotated["id"] == key_id and rotated["secret"] != secret
    assert rotated["used_requests"] == 1  # usage and limits stay with the key
    assert_error(client.get("/usage", headers=bearer(secret)), 401, "invalid_api_key")
    assert client.get("/usage", headers=bearer(rotated["secret"])).status_code == 200

    revoked = client.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN,
                          json={"reason": "laptop stolen"}).json()
    assert revoked["revoked_at"] and revoked["revoked_reason"] == "laptop stolen"
    assert_error(client.get("/usage", headers=bearer(rotated["secret"])), 401,
                 "api_key_revoked", ("laptop stolen",))


def test_admin_keys_can_make_admins(auth_server: Any) -> None:
    server = auth_server()
    _, secret = create_key(server.client, role="admin")
    assert server.client.get("/admin/keys", headers=bearer(secret)).status_code == 200


def test_bad_admin_input(auth_server: Any, store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    client = server.client
    cases: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({}, ("name", "required")),
        ({"name": "x", "role": "root"}, ("role",)),
        ({"name": "x", "max_requests": -1}, ("max_requests",)),
        ({"name": "x", "rpm": 0}, ("rpm",)),
        ({"name": "x", "expires_at": "soon"}, ("expires_at",)),
        ({"name": "x", "valid_from": "2026-05-01", "expires_at": "2026-04-01"},
         ("after valid_from",)),
        ({"name": "x", "quota": 3}, ("quota", "allowed", "max_requests")),
        ({"name": "x", "allowed_models": ["m" * 201]}, ("allowed_models",)),
    ]
    for body, mentions in cases:
        assert_error(client.post("/admin/keys", json=body, headers=ADMIN), 422,
                     "invalid_parameter", mentions)
    assert_error(client.get("/admin/keys/12345", headers=ADMIN), 404, "key_not_found",
                 ("12345",))
    assert_error(client.get("/admin/keys/abc", headers=ADMIN), 422, "invalid_parameter")
    assert_error(client.patch("/admin/keys/1", json={"name": None}, headers=ADMIN), 422,
                 "invalid_parameter", ("name",))
    dated, _ = create_key(client, valid_from="2026-05-01")
    assert_error(client.patch(f"/admin/keys/{dated}", json={"expires_at": "2026-04-01"},
                              headers=ADMIN), 422, "invalid_parameter", ("after valid_from",))
    assert ADMIN_KEY not in client.get("/admin/keys", headers=ADMIN).text
