"""Fixtures of the auth tests: servers with keys, a fresh Postgres database, Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_GGUF, LiveServer, service_missing

ADMIN_KEY = "llmapi-test-admin-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def models_config() -> dict[str, Any]:
    """Two models: the tiny GGUF (real tokens) and the reverse plugin (instant)."""
    return {"models": {
        "tiny": {"model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
                 "model_params": {"n_ctx": 2048, "n_threads": 2}, "default_max_tokens": 16},
        "rev": {"model_family": "reverse"},
    }}


def auth_config(**extra: Any) -> dict[str, Any]:
    return {**models_config(), "auth": {"enabled": True, "admin_key": ADMIN_KEY}, **extra}


def create_key(client: httpx.Client, **fields: Any) -> tuple[int, str]:
    """A new key through the admin API: (id, secret)."""
    response = client.post("/admin/keys", json={"name": "tester", **fields}, headers=ADMIN)
    assert response.status_code == 201, response.text
    body = response.json()
    return body["id"], body["secret"]


def key_info(client: httpx.Client, key_id: int) -> dict[str, Any]:
    response = client.get(f"/admin/keys/{key_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, uniquely named Postgres database for this test run, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure means "no Postgres here"
        service_missing("Postgres on 127.0.0.1:5432", exc)
        raise
    name = f"llmapi_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


STORES = ["sqlite", "postgres"]


def store_settings(request: pytest.FixtureRequest, store: str) -> dict[str, Any]:
    """Config keys selecting `store` (a fresh Postgres schema each time); for fixtures of any
    scope that run over both stores."""
    if store == "sqlite":
        return {}
    url: str = request.getfixturevalue("postgres_url")
    return {"database_url": _fresh_schema(url)}


@pytest.fixture(params=STORES)
def store_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Config keys selecting each store in turn (a fresh Postgres schema each time)."""
    return store_settings(request, request.param)


def _fresh_schema(url: str) -> str:
    """A new schema in the run's database, as the default search_path of the URL."""
    import psycopg

    schema = f"s_{uuid.uuid4().hex[:10]}"
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    return f"{url}?options=-csearch_path%3D{schema}"


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: a started server with auth on (admin key ADMIN_KEY) and `extra` config."""
    servers: list[LiveServer] = []

    def start(name: str = "auth", **extra: Any) -> LiveServer:
        server = LiveServer(auth_config(**extra), tmp_path / f"{name}{len(servers)}")
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
