"""Metrics, request ids and logs of a real `llm-api serve` (auth on, JSON log, debug level):
what an operator scrapes and reads, checked against what the requests really did.

The metric names and types are checked against the dashboard's contract in
tests/docker/test_monitoring.py; here the values: counts, tokens and histograms that match
the usage the server recorded, per-key series, 429s by reason, engine figures.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.app.test_cli import LLM_API, free_port
from tests.conftest import TINY_GGUF, parse_sse

ADMIN_KEY = "llmapi-observability-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT_MARK = "zebra quartz lantern"  # a prompt text that must not reach the log
#: Lines llama.cpp's C code writes to stderr itself, around the logging module.
NATIVE = ("llama_", "ggml_", "load", "print_info", "gguf", "main:", "system_info", "common_")


class Served:
    """`llm-api serve` in a subprocess; its output lines collected as they come."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        path = directory / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.proc = subprocess.Popen([LLM_API, "serve", "--config", str(path), "--port",
                                      str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 90
        while True:
            try:
                if self.client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError("server did not start:\n" + "\n".join(self.lines))
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (llama.cpp's own stderr lines left out)."""
        time.sleep(0.3)  # the last lines of a request are written after its response
        found = []
        for line in list(self.lines):
            if line.startswith(NATIVE) or not line.strip():
                continue
            found.append(json.loads(line))  # anything else must be one JSON object
        return found

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        response = self.client.get("/metrics", headers=ADMIN)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.text)
                for s in family.samples}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        finally:
            self.proc.kill()
            self._reader.join(timeout=5)


def sample(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("observability")
    config = {
        "models": {"tiny": {"model_family": "llama",
                            "setup_params": {"model_path": str(TINY_GGUF)},
                            "model_params": {"n_ctx": 1024, "n_threads": 2, "parallel": 2}}},
        "auth": {"enabled": True, "admin_key": ADMIN_KEY},
        "server": {"log_format": "json", "log_level": "debug"},
        "metrics": {"per_key": True},
        "data_dir": str(directory / "data"),
    }
    server = Served(config, directory)
    yield server
    server.stop()


def new_key(served: Served, **limits: Any) -> tuple[int, str]:
    response = served.client.post("/admin/keys", headers=ADMIN,
                                  json={"name": "observed", **limits})
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["secret"]


def test_a_streamed_chat_is_counted_in_every_metric_as_its_usage_says(served: Served) -> None:
    key_id, secret = new_key(served, max_tokens=100_000)
    before = served.metrics()
    body = {"model": "tiny", "stream": True, "max_tokens": 6, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPT_MARK}]}
    with served.client.stream("POST", "/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {secret}"}) as response:
        assert response.status_code == 200
        events = [data for _, data in parse_sse(response.iter_lines()) if data != "[DONE]"]
    chunks = [json.loads(e) for e in events]
    usage = chunks[-1]["usage"]
    pieces = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    after = served.metrics()

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    route = "/v1/chat/completions"
    assert grew("llm_api_requests_total", model="tiny", route=route, status="200") == 1
    assert grew("llm_api_prompt_tokens_total", model="tiny") == usage["prompt_tokens"]
    assert grew("llm_api_generation_tokens_total", model="tiny") == usage["completion_tokens"]
    assert grew("llm_api_time_to_first_token_seconds_count", model="tiny") == 1
    assert grew("llm_api_inter_token_latency_seconds_count", model="tiny") == pieces - 1
    assert grew("llm_api_queue_wait_seconds_count", model="tiny") == 1
    assert grew("llm_api_request_duration_seconds_count", model="tiny", route=route) == 1
    assert grew("llm_api_request_duration_seconds_sum", model="tiny", route=route) > 0
    key = str(key_id)
    assert grew("llm_api_key_requests_total", key_id=key, model="tiny") == 1
    assert grew("llm_api_key_tokens_total", key_id=key, model="tiny",
                type="prompt") == usage["prompt_tokens"]
    assert grew("llm_api_key_tokens_total", key_id=key, model="tiny",
                type="completion") == usage["completion_tokens"]
    assert sample(after, "llm_api_key_quota_remaining", key_id=key, quota="tokens") == \
        100_000 - usage["total_tokens"]


def test_engine_figures_come_from_the_worker(served: Served) -> None:
    metrics = served.metrics()
    assert sample(metrics, "llm_api_model_state", model="tiny", state="ready") == 1
    assert sample(metrics, "llm_api_model_state", model="tiny", state="failed") == 0
    assert sample(metrics, "llm_api_workers", model="tiny") == 1
    assert sample(metrics, "llm_api_engine_restarts_total", model="tiny") == 0
    assert sample(metrics, "llm_api_requests_running", model="tiny") == 0
    assert sample(metrics, "llm_api_kv_cells_total", model="tiny") == 1024 * 2
    assert 0 <= sample(metrics, "llm_api_kv_cells_used", model="tiny") <= 1024 * 2
    assert sample(metrics, "process_resident_memory_bytes") > 0
    # The same prompt again: the slot's cached prefix is reused, and counted.
    reused = sample(metrics, "llm_api_prefix_cache_hit_tokens_total", model="tiny")
    body = {"model": "tiny", "prompt": "one two three four five six", "max_tokens": 2}
    for _ in range(2):
        assert served.client.post("/v1/completions", json=body,
                                  headers=ADMIN).status_code == 200
    again = served.metrics()
    assert sample(again, "llm_api_prefix_cache_hit_tokens_total", model="tiny") > reused
    assert sample(again, "llm_api_kv_cells_used", model="tiny") > 0


def test_429s_are_counted_per_key_by_the_limit_that_refused_them(served: Served) -> None:
    key_id, secret = new_key(served, rpm=1, max_requests=50)
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    assert served.client.post("/v1/completions", json=body, headers=headers).status_code == 200
    refused = served.client.post("/v1/completions", json=body, headers=headers)
    assert refused.status_code == 429
    metrics = served.metrics()
    key = str(key_id)
    assert sample(metrics, "llm_api_key_rejections_total", key_id=key, reason="rpm") == 1
    assert sample(metrics, "llm_api_key_quota_remaining", key_id=key, quota="requests") == 49


def test_request_ids_are_taken_when_valid_made_otherwise_and_returned(served: Served) -> None:
    mine = "trace-4bf92f3577b34da6"
    assert served.client.get("/v1/models", headers={
        **ADMIN, "X-Request-ID": mine}).headers["x-request-id"] == mine
    for bad in ("has space", "x" * 201, "tab\there", ""):
        got = served.client.get("/v1/models", headers={**ADMIN, "X-Request-ID": bad})
        assert got.headers["x-request-id"] != bad
        assert len(got.headers["x-request-id"]) == 32
    # errors carry one too, and a queue-style job's id is its request id
    assert len(served.client.get("/v1/models").headers["x-request-id"]) == 32
    job = served.client.post("/generate", headers={**ADMIN, "X-Request-ID": "ignored"}, json={
        "job_id": "job-77", "meta": {"model": "tiny", "tokens_limit": 2}, "content": "hi"})
    assert job.status_code == 200
    assert job.headers.get_list("x-request-id") == ["job-77"]


def test_one_json_access_line_per_request_and_the_worker_names_the_request(
        served: Served) -> None:
    key_id, secret = new_key(served)
    rid = "obs-access-line-1"
    response = served.client.post(
        "/v1/completions", headers={"Authorization": f"Bearer {secret}", "X-Request-ID": rid},
        json={"model": "tiny", "prompt": PROMPT_MARK, "max_tokens": 3})
    assert response.status_code == 200
    usage = response.json()["usage"]
    records = served.records()
    mine = [r for r in records if r.get("request_id") == rid]
    access = [r for r in mine if r["logger"] == "llm_api.access"]
    assert len(access) == 1, mine
    line = access[0]
    assert {k: line[k] for k in ("route", "status", "key_id", "model", "prompt_tokens",
                                 "completion_tokens")} == {
        "route": "/v1/completions", "status": 200, "key_id": key_id, "model": "tiny",
        "prompt_tokens": usage["prompt_tokens"], "completion_tokens":
            usage["completion_tokens"]}
    assert line["latency_ms"] > 0 and line["level"] == "info" and line["time"].endswith("Z")
    # the worker process's own line about this request (debug level) names it too
    assert any(r["message"].startswith("[worker tiny] generation completed") for r in mine), \
        mine
    # no uvicorn access line of its own
    assert not [r for r in records if r["logger"] == "uvicorn.access"]


def test_no_secret_key_prefix_or_prompt_is_ever_logged(served: Served) -> None:
    _, secret = new_key(served)
    headers = {"Authorization": f"Bearer {secret}"}
    served.client.post("/v1/completions", headers=headers,
                       json={"model": "tiny", "prompt": PROMPT_MARK, "max_tokens": 2})
    served.client.post("/v1/completions", headers={"Authorization": f"Bearer {secret}x"},
                       json={"model": "tiny", "prompt": PROMPT_MARK})  # a wrong key: 401
    served.client.post("/v1/completions", headers=headers, json={"model": "tiny",
                       "prompt": PROMPT_MARK, "max_tokens": "many"})  # invalid: 400
    served.records()
    text = "\n".join(served.lines)
    for secret_part in (secret, secret[:16], ADMIN_KEY, ADMIN_KEY[:16]):
        assert secret_part not in text
    assert PROMPT_MARK not in text
    assert "zebra" not in text


def test_startup_lines_say_what_was_loaded_and_where_to_connect(served: Served) -> None:
    messages = [r["message"] for r in served.records()]
    loaded = [m for m in messages if m.startswith("model tiny ready:")]
    assert len(loaded) == 1
    line = loaded[0]
    for part in ("family=llama", f"file={TINY_GGUF}", "context=1024", "parallel=2",
                 "placement=local", "load=", "memory="):
        assert part in line, line
    assert f"llm-api ready on http://127.0.0.1:{served.port} (models: tiny)" in messages


def test_log_prompts_logs_prompt_and_completion_with_the_request_id(tmp_path: Path) -> None:
    config = {"models": {"tiny": {"model_family": "llama",
                                  "setup_params": {"model_path": str(TINY_GGUF)},
                                  "model_params": {"n_ctx": 512, "n_threads": 2}}},
              "auth": {"enabled": False}, "data_dir": str(tmp_path / "data"),
              "server": {"log_prompts": True}}
    server = Served(config, tmp_path)
    try:
        answer = server.client.post("/v1/completions", headers={"X-Request-ID": "rid-p1"},
                                    json={"model": "tiny", "prompt": PROMPT_MARK,
                                          "max_tokens": 3, "temperature": 0})
        assert answer.status_code == 200
        text = answer.json()["choices"][0]["text"]
        time.sleep(0.3)
        logged = [line for line in server.lines if "llm_api.prompts [rid-p1]" in line]
        assert any(f"prompt: {PROMPT_MARK}" in line for line in logged), server.lines
        assert any(line.endswith(f"completion: {text}") for line in logged), logged
        # A path with a decoded newline stays on its access line.
        server.client.get("/v1/models%0A2026-01-01 00:00:00 INFO forged: line")
        time.sleep(0.3)
        assert not [line for line in server.lines if line.startswith("2026-01-01")]
        assert any("/v1/models\\n2026-01-01" in line for line in server.lines)
    finally:
        server.stop()
