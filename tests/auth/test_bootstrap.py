"""Auth is on by default; the first start creates an admin key and prints it once; keys
never reach a log."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.app.test_cli import serve_file
from tests.auth.conftest import ADMIN_KEY, bearer, create_key, models_config
from tests.conftest import LiveServer, assert_error

SECRET = re.compile(r"llmapi-[A-Za-z0-9_-]{43}")


def start(config_path: Path) -> tuple[subprocess.Popen[str], httpx.Client]:
    return serve_file(config_path)


def stop(proc: subprocess.Popen[str], client: httpx.Client) -> str:
    client.close()
    proc.terminate()
    return proc.communicate(timeout=30)[0]


def test_default_is_auth_on_and_the_first_admin_key_is_printed_once(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"  # no auth section at all: the real default
    config.write_text(yaml.safe_dump({**models_config(), "data_dir": str(tmp_path / "data"),
                                      "server": {"log_level": "debug"}}))
    proc, client = start(config)
    try:
        assert_error(client.post("/generate", json={"prompt": "x", "model": "rev"}), 401,
                     "missing_api_key")
    finally:
        output = stop(proc, client)
    [admin_key] = SECRET.findall(output)
    assert output.count(admin_key) == 1
    banner = output[output.index("no API key existed"):output.index(admin_key) + 120]
    assert "shown only this once" in banner and "Authorization: Bearer" in banner
    assert (tmp_path / "data" / "llm-api.db").is_file()
    assert admin_key not in (tmp_path / "data" / "llm-api.db").read_bytes().decode("latin-1")

    proc, client = start(config)  # second start: the key works, nothing is printed
    try:
        admin = bearer(admin_key)
        created = client.post("/admin/keys", json={"name": "bob"}, headers=admin)
        assert created.status_code == 201
        user_key = created.json()["secret"]
        for headers in (admin, bearer(user_key), {"X-API-Key": user_key},
                        bearer(user_key + "x"), {"Authorization": user_key}):
            client.post("/generate", json={"prompt": "ab", "model": "rev"}, headers=headers)
            client.get("/usage", headers=headers)
        client.post("/generate", json={"prompt": "fail", "model": "rev"},
                    headers=bearer(user_key))
    finally:
        output = stop(proc, client)
    assert "GET /usage" in output  # the access log was on
    assert "no API key existed" not in output
    assert admin_key not in output and user_key not in output
    assert not SECRET.search(output)


def test_admin_key_from_the_environment_or_a_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LLM_API_AUTH__ADMIN_KEY", ADMIN_KEY)
    server = LiveServer({**models_config(), "auth": {"enabled": True}}, tmp_path / "env")
    server.start()
    try:
        assert server.client.get("/admin/keys", headers=bearer(ADMIN_KEY)).status_code == 200
    finally:
        server.stop()
    monkeypatch.delenv("LLM_API_AUTH__ADMIN_KEY")
    secret_file = tmp_path / "admin.key"
    secret_file.write_text("llmapi-from-a-mounted-secret-file\n")
    server = LiveServer({**models_config(), "auth": {"admin_key_file": str(secret_file)}},
                        tmp_path / "file")
    server.start()
    try:
        keys = server.client.get("/admin/keys",
                                 headers=bearer("llmapi-from-a-mounted-secret-file"))
        assert keys.status_code == 200 and keys.json()[0]["role"] == "admin"
    finally:
        server.stop()
    assert "no API key existed" not in capfd.readouterr().err


def test_auth_disabled_warns_and_keeps_the_admin_api_closed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    server = LiveServer({**models_config(), "auth": {"enabled": False}}, tmp_path)
    server.start()
    try:
        assert server.client.post("/generate", json={"prompt": "ab", "model": "rev"}).json() \
            == "ba"
        assert_error(server.client.get("/admin/keys"), 403, "admin_required",
                     ("llm-api keys",))
        report = server.client.get("/usage").json()
        assert report["key_id"] is None and report["totals"]["requests"] == 1
    finally:
        server.stop()
    assert "auth.enabled is false" in caplog.text


def test_keys_never_reach_the_log(auth_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = auth_server()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(caplog.handler)
    access.setLevel(logging.INFO)
    caplog.set_level(logging.DEBUG)
    try:
        key_id, secret = create_key(server.client, max_requests=1)
        for headers in (bearer(secret), bearer(secret), bearer(secret[:-1]),
                        {"X-API-Key": secret}):
            server.client.post("/generate", json={"prompt": "fail", "model": "rev"},
                               headers=headers)
        rotated = server.client.post(f"/admin/keys/{key_id}/rotate",
                                     headers=bearer(ADMIN_KEY)).json()["secret"]
        server.client.get("/usage", headers=bearer(rotated))
    finally:
        access.removeHandler(caplog.handler)
    assert "POST /generate" in caplog.text and "unexpected failure" in caplog.text
    for value in (secret, secret[:-1], rotated, ADMIN_KEY):
        assert value not in caplog.text


def test_replicas_starting_together_on_postgres_migrate_once(
        tmp_path: Path, postgres_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.auth.conftest import _fresh_schema

    config = {**models_config(), "auth": {"enabled": True},
              "database_url": _fresh_schema(postgres_url)}
    servers = [LiveServer(config, tmp_path / f"replica{i}") for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda server: server.start(), servers))
    try:
        admin_keys = SECRET.findall(capfd.readouterr().err)
        assert len(admin_keys) == 1  # one bootstrap, not one per replica
        for server in servers:
            listed = server.client.get("/admin/keys", headers=bearer(admin_keys[0]))
            assert [k["role"] for k in listed.json()] == ["admin"]
    finally:
        for server in servers:
            server.stop()
