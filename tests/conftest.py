"""Shared test machinery: real servers (uvicorn on a free port) over real models."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from app.http import server_config
from app.main import create_app
from app.settings import SettingsError, load_settings
from engine.local import preload

# Every test server's model workers fork from one server that imported these once.
preload(["backends.llama", "backends.hf"])

FIXTURES = Path(__file__).parent / "fixtures"
REDIS_URL = "redis://127.0.0.1:6379/0"
TINY_GGUF = FIXTURES / "tiny-llama-q8_0.gguf"


def wait_for(predicate: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line saying what was skipped and why: a local run skips the Postgres/Redis cases
    when those services are missing, and that should not pass unnoticed."""
    reports = terminalreporter.stats.get("skipped", [])
    if not reports:
        return
    reasons: Counter[str] = Counter()
    for report in reports:
        longrepr = report.longrepr  # (file, line, "Skipped: why") for a skip
        why = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
        first_line = (why.removeprefix("Skipped: ").splitlines() or ["(no reason given)"])[0]
        reasons[first_line[:120]] += 1
    parts = "; ".join(f"{count} x {why}" for why, count in reasons.most_common())
    ci = os.environ.get("CI", "").lower() in ("true", "1", "yes")
    hint = "" if ci else " (with CI=true a missing Postgres or Redis fails instead)"
    terminalreporter.write_line(f"SKIPPED {len(reports)} tests: {parts}{hint}", yellow=True)


def without_auth(config: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Tests that do not configure `auth` run without keys, each with its own data_dir."""
    return {"auth": {"enabled": False}, "data_dir": str(directory / "data"), **config}


class LiveServer:
    """create_app(load_settings(config)) behind uvicorn, in a thread of the test process."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = without_auth(config, directory)
        self.config_path = directory / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        settings = load_settings(self.config_path)
        self.app = create_app(settings)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        # the production server's configuration (bounded request heads, no trusted proxy)
        self._server = uvicorn.Server(server_config(self.app, settings.server,
                                                    log_level="warning"))
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def start(self, wait_ready: bool = True) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = self.client.get("/ready")
            body: dict[str, Any] = response.json()
            if response.status_code == 200:
                return body
            failed = [m for m in body["models"] if m["state"] == "failed"]
            assert not failed, f"model failed to load: {failed}"
            assert time.monotonic() < deadline, f"not ready in {timeout}s: {body}"
            time.sleep(0.05)

    def model_stats(self, name: str | None = None) -> dict[str, Any]:
        models = self.client.get("/ready").json()["models"]
        return next(m for m in models if name is None or m["name"] == name)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (tests run coroutines in it to hold its state)."""
        loop: asyncio.AbstractEventLoop = self._server.servers[0].get_loop()
        return loop

    def stop(self) -> None:
        self.client.close()
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: `live_server(config_dict)` starts a server, stopped after the test."""
    servers: list[LiveServer] = []

    def start(config: dict[str, Any], wait_ready: bool = True, name: str = "srv") -> LiveServer:
        server = LiveServer(config, tmp_path / f"{name}{len(servers)}")
        servers.append(server)
        return server.start(wait_ready)

    yield start
    for server in servers:
        server.stop()


def tiny_config(**model_params: Any) -> dict[str, Any]:
    """Classic single-model config over the committed tiny GGUF."""
    return {"model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
            "model_params": {"n_ctx": 8192, "n_threads": 2, **model_params}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server over the tiny GGUF, shared by a module's tests."""
    config = {"models": {"tiny": {**tiny_config(), "default_max_tokens": 64}}}
    server = LiveServer(config, tmp_path_factory.mktemp("tiny")).start()
    yield server
    server.stop()


def service_missing(what: str, why: Exception) -> None:
    """A service a test needs is not there: fail under CI (`CI` true/1/yes), skip locally."""
    message = f"{what} is not reachable: {why}"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):  # CI: never skip
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis on loopback (see service_missing when it is not there)."""
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no Redis here"
        service_missing("Redis on 127.0.0.1:6379", exc)
        raise
    return REDIS_URL


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from an environment without LLM_API_* or hub settings."""
    for key in list(os.environ):
        if key.startswith("LLM_API_") or key in {"HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN"}:
            monkeypatch.delenv(key)


def parse_sse(lines: Any) -> Iterator[tuple[str, str]]:
    """(event, data) per SSE event, per the spec: data lines joined by newlines,
    comment lines (keep-alives) ignored, an event ends at a blank line."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


def stream_events(client: httpx.Client, body: dict[str, Any],
                  path: str = "/agenerate") -> list[tuple[str, str]]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(response.iter_lines()))


def assert_error(response: httpx.Response, status: int, code: str | None = None,
                 mentions: tuple[str, ...] = ()) -> dict[str, Any]:
    """The one error shape, with the expected status and code, mentioning `mentions`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code, error
    for word in mentions:
        assert word in error["message"], (word, error["message"])
    assert "Traceback" not in error["message"]
    return error


def assert_bad_settings(tmp_path: Path, config: dict[str, Any],
                        mentions: tuple[str, ...]) -> None:
    """Loading `config` (one model's entry as a config file) fails with a SettingsError whose
    message holds every word of `mentions`."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    for word in mentions:
        assert word in str(err.value), (word, str(err.value))


def generate(server: LiveServer, prompt: str, model: str = "tiny", **params: Any) -> str:
    """`/generate`'s text for `prompt` on `model` with `params` (asserting a 200)."""
    response = server.client.post("/generate", json={"prompt": prompt, "model": model,
                                                     "params": params})
    assert response.status_code == 200, response.text
    text: str = response.json()
    return text
