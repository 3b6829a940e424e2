"""Keys changing while they are used, on SQLite and on Postgres: many keys created at once,
a key rotated or revoked while its requests run.

The rule for a running request is the same for both: it was admitted under the key as it was,
so it finishes and is charged to the key (its id, not its secret); new requests see the key as
it is now. The running requests are held at a gate (tests/gated.py), so "still running" is a
state the test sees, not a guess about speed.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from tests.auth.conftest import ADMIN, bearer, create_key, key_info
from tests.auth.test_quotas import in_parallel, usage_of
from tests.conftest import assert_error, parse_sse, wait_for
from tests.gated import Gate, gated_family

CREATORS = 24
PIECES = 5  # what each gated generation yields (max_tokens)


def test_concurrent_key_creation(auth_server: Any, store_config: dict[str, Any]) -> None:
    server = auth_server(**store_config)
    responses = in_parallel(server, CREATORS, lambda client, i: client.post(
        "/admin/keys", json={"name": f"key {i}", "max_requests": 3}, headers=ADMIN))
    assert [r.status_code for r in responses] == [201] * CREATORS, \
        [r.text for r in responses if r.status_code != 201]
    created = [r.json() for r in responses]
    ids = {body["id"] for body in created}
    assert len(ids) == CREATORS
    assert len({body["secret"] for body in created}) == CREATORS
    listed = server.client.get("/admin/keys", headers=ADMIN).json()
    assert ids <= {k["id"] for k in listed} and len(listed) == CREATORS + 1  # + the admin
    for body in created:  # each secret opens its own key, and only that one
        usage = server.client.get("/usage", headers=bearer(body["secret"]))
        assert usage.status_code == 200 and usage.json()["key_id"] == body["id"]
        assert key_info(server.client, body["id"])["name"] == body["name"]


def start_stream(server: Any, secret: str, gate: Gate
                 ) -> tuple[httpx.Response, Any]:
    """An /agenerate stream held at `gate` after its first piece: (response, its events)."""
    body = {"prompt": "one two three", "model": "gated", "params": {"max_tokens": PIECES}}
    request = server.client.build_request("POST", "/agenerate", json=body,
                                          headers=bearer(secret))
    response = server.client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    events = parse_sse(response.iter_lines())
    assert next(events) == ("message", ".")
    gate.wait_reached()
    return response, events


def finish(response: httpx.Response, events: Any) -> str:
    try:
        return "." + "".join(data for _, data in events)
    finally:
        response.close()


def gated_server(auth_server: Any, store_config: dict[str, Any],
                 request: pytest.FixtureRequest) -> tuple[Any, Gate]:
    gate = gated_family(request)
    return auth_server(models={"gated": gate.model()}, **store_config), gate


def test_rotate_during_a_running_stream(auth_server: Any, store_config: dict[str, Any],
                                        request: pytest.FixtureRequest) -> None:
    server, gate = gated_server(auth_server, store_config, request)
    key_id, old = create_key(server.client, max_tokens=1000)
    response, events = start_stream(server, old, gate)

    rotated = server.client.post(f"/admin/keys/{key_id}/rotate", headers=ADMIN)
    assert rotated.status_code == 200 and rotated.json()["id"] == key_id
    new = rotated.json()["secret"]
    assert_error(server.client.get("/usage", headers=bearer(old)), 401, "invalid_api_key")
    assert server.client.get("/usage", headers=bearer(new)).json()["key_id"] == key_id

    gate.opened.set()
    assert finish(response, events) == "." * PIECES  # the running stream was not cut
    info = key_info(server.client, key_id)
    assert (info["used_requests"], info["used_tokens"], info["reserved_tokens"]) == \
        (1, 3 + PIECES, 0)  # charged to the key: 3 prompt words + the pieces
    totals = usage_of(server, key_id)["totals"]
    assert (totals["requests"], totals["errors"], totals["completion_tokens"]) == \
        (1, 0, PIECES)
    assert_error(server.client.post("/generate", json={"prompt": "x", "model": "gated"},
                                    headers=bearer(old)), 401, "invalid_api_key")
    assert server.client.post("/generate", json={
        "prompt": "x", "model": "gated", "params": {"max_tokens": 2}},
        headers=bearer(new)).json() == ".."


def test_revoke_during_in_flight_requests(auth_server: Any, store_config: dict[str, Any],
                                          request: pytest.FixtureRequest) -> None:
    """Two requests in flight (one running at the gate, one queued behind it) when the key
    is revoked: both finish and are charged; any new request is a 401 'revoked'."""
    server, gate = gated_server(auth_server, store_config, request)
    # a request quota, not a token one: admission then needs no token count (which would
    # wait for the engine thread, held at the gate), so the second request is admitted
    key_id, secret = create_key(server.client, max_requests=10)
    response, events = start_stream(server, secret, gate)
    queued: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: queued.append(server.client.post(
        "/generate", headers=bearer(secret), json={
            "prompt": "four five", "model": "gated", "params": {"max_tokens": PIECES}})))
    waiting.start()
    wait_for(lambda: server.model_stats("gated")["queued"] == 1, what="a queued request")
    assert key_info(server.client, key_id)["used_requests"] == 2  # both admitted

    revoked = server.client.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN,
                                 json={"reason": "rotated out"})
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    for attempt in (server.client.get("/usage", headers=bearer(secret)),
                    server.client.post("/generate", headers=bearer(secret),
                                       json={"prompt": "x", "model": "gated"})):
        assert_error(attempt, 401, "api_key_revoked", ("rotated out",))

    gate.opened.set()
    assert finish(response, events) == "." * PIECES
    waiting.join(60)
    assert [(r.status_code, r.json()) for r in queued] == [(200, "." * PIECES)]
    info = key_info(server.client, key_id)
    assert (info["used_requests"], info["used_tokens"], info["reserved_tokens"]) == \
        (2, (3 + PIECES) + (2 + PIECES), 0)
    totals = usage_of(server, key_id)["totals"]
    assert (totals["requests"], totals["errors"], totals["completion_tokens"]) == \
        (2, 0, 2 * PIECES)
