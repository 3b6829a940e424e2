"""Hardening of authentication (issue #22, findings 6, 7, 9, 11): failed-key throttling per
client address, no key material in logs, the configured admin key across restarts, the last
admin key, authentication before the body is read, bounded body reads, what /v1/models shows
to a restricted key, and the permissions of the SQLite store."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth.store import KeyStore
from app.settings import ServerSettings
from tests.auth.conftest import ADMIN, ADMIN_KEY, auth_config, bearer, create_key
from tests.auth.test_cli_keys import run
from tests.conftest import LiveServer, assert_bad_settings, assert_error, wait_for

SECRET = re.compile(r"llmapi-[A-Za-z0-9_-]{43}")
UNKNOWN = bearer("llmapi-" + "u" * 43)
GENERATE = {"prompt": "ab", "model": "rev"}


def auth(**fields: Any) -> dict[str, Any]:
    return {"auth": {"enabled": True, "admin_key": ADMIN_KEY, **fields}}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[LiveServer]]:
    """Servers a test starts (`LiveServer(...)` appended here), stopped after it."""
    started: list[LiveServer] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list[LiveServer], config: dict[str, Any], directory: Path) -> LiveServer:
    server = LiveServer(config, directory)
    servers.append(server)
    return server.start()


# -- finding 6: failed authentications are throttled per client address ---------------------


def test_failed_keys_are_throttled_per_address(servers: list[LiveServer],
                                               tmp_path: Path) -> None:
    server = start(servers, auth_config(**auth(failed_auth_limit=3)), tmp_path / "srv")
    client = server.client
    _, secret = create_key(client)
    for _ in range(5):  # successful authentications do not count
        assert client.post("/generate", json=GENERATE, headers=bearer(secret)).json() == "ba"
    for _ in range(3):
        assert_error(client.get("/usage", headers=UNKNOWN), 401, "invalid_api_key")
    throttled = assert_error(client.get("/usage", headers=UNKNOWN), 429,
                             "too_many_failed_authentications",
                             ("failed_auth_limit", "3", "60"))
    assert "llmapi-" not in throttled["message"]
    retry = client.get("/usage", headers=UNKNOWN).headers["retry-after"]
    assert 0 < int(retry) <= 60
    # The address is refused without the key being looked up: a valid key is refused too.
    assert_error(client.post("/generate", json=GENERATE, headers=bearer(secret)), 429,
                 "too_many_failed_authentications")
    # Another client address is not affected (loopback answers on all of 127.0.0.0/8).
    other = httpx.Client(base_url=server.url, timeout=60,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with other:
        assert other.post("/generate", json=GENERATE, headers=bearer(secret)).json() == "ba"
        assert_error(other.get("/usage", headers=UNKNOWN), 401, "invalid_api_key")
    # Open routes are never throttled.
    assert client.get("/health").status_code == 200


def test_revoked_and_expired_keys_count_as_failures(servers: list[LiveServer],
                                                    tmp_path: Path) -> None:
    server = start(servers, auth_config(**auth(failed_auth_limit=2)), tmp_path / "srv")
    client = server.client
    revoked_id, revoked = create_key(client)
    assert client.post(f"/admin/keys/{revoked_id}/revoke", headers=ADMIN).status_code == 200
    _, expired = create_key(client, expires_at="2020-01-01")
    assert_error(client.get("/usage", headers=bearer(revoked)), 401, "api_key_revoked")
    assert_error(client.get("/usage", headers=bearer(expired)), 401, "api_key_not_valid_now")
    assert_error(client.get("/usage", headers=ADMIN), 429, "too_many_failed_authentications")


def test_throttle_is_shared_by_replicas_through_redis(servers: list[LiveServer],
                                                      tmp_path: Path, redis_url: str) -> None:
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    config = auth_config(**auth(failed_auth_limit=2), redis_url=redis_url, database_url=store)
    first = start(servers, config, tmp_path / "first")
    second = start(servers, config, tmp_path / "second")
    for _ in range(2):
        assert_error(first.client.get("/usage", headers=UNKNOWN), 401, "invalid_api_key")
    response = second.client.get("/usage", headers=UNKNOWN)
    assert_error(response, 429, "too_many_failed_authentications")
    assert 0 < int(response.headers["retry-after"]) <= 60
    # A deployment on another store (another namespace) is not affected.
    other = start(servers, auth_config(**auth(failed_auth_limit=2), redis_url=redis_url),
                  tmp_path / "other")
    assert_error(other.client.get("/usage", headers=UNKNOWN), 401, "invalid_api_key")


def test_unreachable_redis_throttles_in_process(servers: list[LiveServer],
                                                tmp_path: Path) -> None:
    config = auth_config(**auth(failed_auth_limit=2), redis_url="redis://127.0.0.1:1/0")
    client = start(servers, config, tmp_path / "srv").client
    assert client.get("/admin/keys", headers=ADMIN).status_code == 200  # no limits: no Redis
    for _ in range(2):
        assert_error(client.get("/usage", headers=UNKNOWN), 401, "invalid_api_key")
    assert_error(client.get("/usage", headers=ADMIN), 429, "too_many_failed_authentications")


def test_no_key_material_in_the_log(servers: list[LiveServer], tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture,
                                    capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    start(servers, auth_config(**auth()), tmp_path / "configured")
    bootstrap = {**auth_config(), "auth": {"enabled": True}}
    start(servers, bootstrap, tmp_path / "bootstrap")
    [printed] = SECRET.findall(capfd.readouterr().err)
    assert "admin key from the settings: id 1" in caplog.text
    assert "created the first admin key: id 1" in caplog.text
    for secret in (ADMIN_KEY, printed):
        assert secret[:10] not in caplog.text  # not even a prefix


def test_admin_key_needs_32_characters(tmp_path: Path) -> None:
    assert_bad_settings(tmp_path, {**auth_config(), "auth": {"admin_key": "x" * 31}},
                        ("auth.admin_key", "32"))


# -- finding 7: the configured admin key wins, across restarts ------------------------------


def test_configured_admin_key_cannot_be_rotated_or_revoked(tmp_path: Path) -> None:
    config = auth_config()
    server = LiveServer(config, tmp_path / "srv").start()
    try:
        client = server.client
        listing = client.get("/admin/keys", headers=ADMIN)
        [configured] = listing.json()
        assert configured["prefix"] == "(settings)" and ADMIN_KEY[:13] not in listing.text
        for action in ("rotate", "revoke"):
            assert_error(client.post(f"/admin/keys/{configured['id']}/{action}",
                                     headers=ADMIN), 400, "invalid_request",
                         ("auth.admin_key", "restart"))
        assert_error(client.patch(f"/admin/keys/{configured['id']}", json={"role": "user"},
                                  headers=ADMIN), 400, "invalid_request", ("auth.admin_key",))
        other_id, other = create_key(client, role="admin")
        rotated = client.post(f"/admin/keys/{other_id}/rotate", headers=ADMIN)
        assert rotated.status_code == 200  # other keys rotate as before
        new_secret = rotated.json()["secret"]
    finally:
        server.stop()
    cli = run(server.config_path, "keys", "rotate", str(configured["id"]), ok=False)
    assert cli.returncode == 1 and "auth.admin_key" in cli.stderr
    assert not SECRET.search(cli.stdout + cli.stderr)

    again = LiveServer(config, tmp_path / "srv").start()  # the same config and store
    try:
        listed = again.client.get("/admin/keys", headers=ADMIN).json()
        assert [(k["id"], k["role"], k["revoked_at"]) for k in listed] == [
            (configured["id"], "admin", None), (other_id, "admin", None)]  # no second copy
        assert again.client.get("/usage", headers=bearer(new_secret)).status_code == 200
        assert_error(again.client.get("/usage", headers=bearer(other)), 401)
    finally:
        again.stop()


# -- finding 11d: the last active admin key cannot be revoked -------------------------------


def test_last_active_admin_key_cannot_be_revoked(servers: list[LiveServer], tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    config = {**auth_config(), "auth": {"enabled": True}}  # a bootstrap admin, none configured
    server = start(servers, config, tmp_path / "srv")
    [first] = SECRET.findall(capfd.readouterr().err)
    client = server.client
    assert_error(client.post("/admin/keys/1/revoke", headers=bearer(first)), 400,
                 "invalid_request", ("last active admin key",))
    assert_error(client.patch("/admin/keys/1", json={"role": "user"}, headers=bearer(first)),
                 400, "invalid_request", ("last active admin key",))
    second_id, second = _admin(client, first)
    assert client.post("/admin/keys/1/revoke", headers=bearer(second)).status_code == 200
    assert_error(client.post(f"/admin/keys/{second_id}/revoke", headers=bearer(second)), 400,
                 "invalid_request", ("last active admin key",))
    cli = run(server.config_path, "keys", "revoke", str(second_id), ok=False)
    assert cli.returncode == 1 and "last active admin key" in cli.stderr
    assert client.get("/admin/keys", headers=bearer(second)).status_code == 200


def _admin(client: httpx.Client, admin_secret: str) -> tuple[int, str]:
    response = client.post("/admin/keys", json={"name": "second", "role": "admin"},
                           headers=bearer(admin_secret))
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["secret"]


# -- finding 9: authentication before the body, bounded body reads --------------------------


def open_request(server: LiveServer, path: str, body: bytes, sent: int,
                 headers: dict[str, str] | None = None) -> socket.socket:
    """A raw connection that has sent the request head and the first `sent` body bytes."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[:sent])
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of the one response on `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the body"
        rest += chunk
    return int(lines[0].split()[1]), headers, json.loads(rest[:length])


def error_of(status: int, body: Any, expected: int, code: str) -> dict[str, Any]:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


def test_unauthenticated_body_is_refused_before_it_is_read(servers: list[LiveServer],
                                                           tmp_path: Path) -> None:
    server = start(servers, auth_config(**auth()), tmp_path / "srv")
    big = json.dumps({"prompt": "a" * 1_000_000, "model": "rev"}).encode()
    for headers, code in (({}, "missing_api_key"), (UNKNOWN, "invalid_api_key")):
        with open_request(server, "/generate", big, 1000, headers) as sock:
            status, answer_headers, body = read_response(sock)  # the rest was never sent
        error_of(status, body, 401, code)
        assert answer_headers["www-authenticate"] == "Bearer"
    # Admin routes too, and the declared size is still checked first.
    with open_request(server, "/admin/keys", b"x" * 2_000_000, 10) as sock:
        status, _, body = read_response(sock)
    error_of(status, body, 413, "payload_too_large")
    with open_request(server, "/admin/keys", big[:900_000], 10) as sock:
        status, _, body = read_response(sock)
    error_of(status, body, 401, "missing_api_key")


def test_slow_body_gets_408(servers: list[LiveServer], tmp_path: Path) -> None:
    server = start(servers, auth_config(**auth(), server={"body_read_timeout": 1}),
                   tmp_path / "srv")
    body = json.dumps(GENERATE).encode()
    with open_request(server, "/generate", body, 5, ADMIN) as sock:
        status, headers, answer = read_response(sock)  # the body never completes
    error = error_of(status, answer, 408, "request_body_timeout")
    assert "body_read_timeout" in error["message"] and "1" in error["message"]
    assert headers.get("connection") == "close"
    # A complete body within the time is served.
    assert server.client.post("/generate", json=GENERATE, headers=ADMIN).json() == "ba"


def test_concurrent_body_reads_are_capped(servers: list[LiveServer], tmp_path: Path) -> None:
    server = start(servers, auth_config(**auth(), server={"max_body_reads": 2}),
                   tmp_path / "srv")
    reads = server.app.state.body_reads
    body = json.dumps(GENERATE).encode()
    socks = [open_request(server, "/generate", body, 5, ADMIN) for _ in range(5)]
    try:
        wait_for(lambda: (reads.reading, reads.waiting) == (2, 3), what="2 reading, 3 waiting")
        assert server.client.get("/v1/models", headers=ADMIN).status_code == 200  # no body
        for sock in socks:
            sock.sendall(body[5:])
        for sock in socks:
            status, _, answer = read_response(sock)
            assert (status, answer) == (200, "ba")
    finally:
        for sock in socks:
            sock.close()
    assert reads.peak == 2 and (reads.reading, reads.waiting) == (0, 0)


def test_the_key_is_looked_up_once_per_request(servers: list[LiveServer], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server = start(servers, auth_config(**auth()), tmp_path / "srv")
    store = server.app.state.accounts.store
    lookups: list[str] = []
    real_find = store.find

    def counted(secret: str) -> Any:
        lookups.append("find")
        return real_find(secret)

    monkeypatch.setattr(store, "find", counted)
    assert server.client.post("/generate", json=GENERATE, headers=ADMIN).json() == "ba"
    assert server.client.get("/admin/keys", headers=ADMIN).status_code == 200
    assert len(lookups) == 2


def test_oversized_authenticated_bodies_still_get_413(servers: list[LiveServer],
                                                      tmp_path: Path) -> None:
    server = start(servers, auth_config(**auth()), tmp_path / "srv")

    def chunks() -> Iterator[bytes]:  # no Content-Length
        for _ in range(40):
            yield b"a" * 65536

    assert_error(server.client.post("/generate", content=chunks(), headers=ADMIN), 413,
                 "payload_too_large", ("max_body_bytes",))
    assert ServerSettings().max_body_reads == 64 and ServerSettings().body_read_timeout == 30


# -- finding 11a: /v1/models shows only what the key may use --------------------------------


def test_models_routes_show_only_allowed_models(servers: list[LiveServer],
                                                tmp_path: Path) -> None:
    server = start(servers, auth_config(**auth()), tmp_path / "srv")
    client = server.client
    _, restricted = create_key(client, allowed_models=["rev"])
    listed = client.get("/v1/models", headers=bearer(restricted)).json()["data"]
    assert [m["id"] for m in listed] == ["rev"]
    assert client.get("/v1/models/rev", headers=bearer(restricted)).json()["id"] == "rev"
    for name in ("tiny", "nope"):
        error = assert_error(client.get(f"/v1/models/{name}", headers=bearer(restricted)),
                             404, "model_not_found", (name,))
        assert error["message"].endswith("rev.") and "tiny," not in error["message"]
        assert "tiny" not in error["message"].split(";")[-1]
    everything = assert_error(client.get("/v1/models/nope", headers=ADMIN), 404,
                              "model_not_found")
    assert "tiny" in everything["message"] and "rev" in everything["message"]
    # the work routes' 404 for an unknown model lists only what the key may use, too
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
                       ("/v1/completions", {"prompt": "a"}), ("/generate", {"prompt": "a"}),
                       ("/tokenize", {"text": "a"}), ("/v1/embeddings", {"input": "a"})):
        error = assert_error(client.post(path, json={**body, "model": "nope"},
                                         headers=bearer(restricted)), 404, "model_not_found")
        assert error["message"].endswith("available: rev."), (path, error)


# -- finding 11b: the store's files are private ---------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_store_and_data_dir_are_private(servers: list[LiveServer],
                                               tmp_path: Path) -> None:
    data = tmp_path / "state" / "data"
    server = start(servers, {**auth_config(**auth()), "data_dir": str(data)}, tmp_path / "srv")
    assert server.client.post("/generate", json=GENERATE, headers=ADMIN).json() == "ba"
    assert mode(data) == 0o700
    files = [data / name for name in ("llm-api.db", "llm-api.db-wal", "llm-api.db-shm")]
    assert files[0].is_file()
    for path in files:
        if path.exists():
            assert mode(path) == 0o600, (path, oct(mode(path)))


def test_existing_readable_store_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = KeyStore(f"sqlite:///{path}")
    store.migrate()
    store.close()
    os.chmod(path, 0o644)
    KeyStore(f"sqlite:///{path}").close()
    assert mode(path) == 0o600


@pytest.mark.parametrize(("file_mode", "warned"), [(0o644, True), (0o600, False)])
def test_a_readable_admin_key_file_is_warned_about(servers: list[LiveServer], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture,
                                                   file_mode: int, warned: bool) -> None:
    secret_file = tmp_path / "admin.key"
    secret_file.write_text(ADMIN_KEY)
    secret_file.chmod(file_mode)
    caplog.set_level(logging.WARNING)
    config = {**auth_config(), "auth": {"admin_key_file": str(secret_file)}}
    server = start(servers, config, tmp_path / "srv")
    assert server.client.get("/admin/keys", headers=ADMIN).status_code == 200
    assert ("auth.admin_key_file" in caplog.text) is warned
    assert ("chmod 600" in caplog.text) is warned
    assert ADMIN_KEY[:10] not in caplog.text
