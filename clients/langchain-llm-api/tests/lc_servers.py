"""Test servers: a live `llm-api serve` (subprocess, free port) over the tiny GGUF, and a
recording HTTP endpoint.

Runs inside the llm-api repository's test venv. Without the `llm-api` command (the package
installed alone) the live tests skip, or fail when CI=true.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
TINY_GGUF = REPO / "tests" / "fixtures" / "tiny-llama-q8_0.gguf"
# A real family's chat template (its tools and `<tool_call>` markup) over the tiny weights.
QWEN_TEMPLATE = REPO / "tests" / "fixtures" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"


def _llm_api_command() -> str | None:
    beside = Path(sys.executable).parent / "llm-api"
    return str(beside) if beside.exists() else shutil.which("llm-api")


def server_has_auth() -> bool:
    """Whether the installed server has API keys (then the fixture runs with auth on)."""
    try:
        from app.settings import Settings
    except ImportError:
        return False
    return "auth" in Settings.model_fields


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _llama(model_params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
            "model_params": {"n_ctx": 4096, "n_threads": 2, **(model_params or {})}, **extra}


# tiny's own template knows no tools: the server describes them in the system turn and reads
# bare JSON calls; qwen's template writes them in its family's format.
MAIN_MODELS = {"tiny": _llama(default_max_tokens=32), "tiny2": _llama(default_max_tokens=32),
               "qwen": _llama({"chat_template": QWEN_TEMPLATE.read_text()},
                              default_max_tokens=32),
               "rev": {"model_family": "reverse"}}
# Never ready while the tests run: its requests get 503 model_not_ready.
LOADING_MODELS = {"loading": {"model_family": "reverse", "model_params": {"load_seconds": 3600}}}


@dataclass
class ServerProcess:
    """`llm-api serve` in a subprocess; `url`, and `api_key` when the server has keys."""

    directory: Path
    models: dict[str, Any]
    wait_models: bool = True
    url: str = ""
    api_key: str | None = None
    proc: subprocess.Popen[str] | None = None
    log: Path = field(init=False)

    def start(self) -> ServerProcess:
        command = _llm_api_command()
        if command is None:
            message = "the llm-api server is not installed: live tests need it"
            if os.environ.get("CI", "").lower() in ("true", "1", "yes"):  # CI: never skip
                pytest.fail(message)
            pytest.skip(message)
        config: dict[str, Any] = {
            "models_dir": str(self.directory / "models"),
            "server": {"sse_ping_seconds": 0.05, "log_level": "warning"},
            "models": self.models,
        }
        if server_has_auth():
            self.api_key = "llmapi-test-" + secrets.token_urlsafe(24)
            config["auth"] = {"enabled": True, "admin_key": self.api_key}
            config["data_dir"] = str(self.directory / "data")
        path = self.directory / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.directory / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_API_")}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [command, "serve", "--config", str(path), "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"llm-api serve exited: {self.log.read_text()}")
            try:
                models = httpx.get(f"{self.url}/ready", timeout=5).json()["models"]
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.1)
                continue
            if not self.wait_models or all(m["state"] == "ready" for m in models):
                return
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout}s: {self.log.read_text()}")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (graceful), or SIGKILL for a server whose model is still loading."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client_params(self) -> dict[str, Any]:
        """base_url and api_key for the package's classes."""
        return {"base_url": self.url, "api_key": self.api_key}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class RecordingEndpoint:
    """A plain HTTP endpoint that records each request and answers what the test scripted.

    It stands in only for what no test server can produce on demand (a given status with
    given headers); it checks what the client sends, not how llm-api behaves.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.status, self.answer, self.answer_headers = 200, b'"ok"', {
            "content-type": "application/json"}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                outer.requests.append(Recorded("POST", self.path, dict(self.headers.items()),
                                               json.loads(raw) if raw else None))
                self.send_response(outer.status)
                for name, value in outer.answer_headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(outer.answer)))
                self.end_headers()
                self.wfile.write(outer.answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,),
                                        daemon=True)

    def start(self) -> RecordingEndpoint:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reply(self, status: int, body: Any, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.status = status
        self.answer = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answer_headers = {"content-type": content_type, **(headers or {})}
