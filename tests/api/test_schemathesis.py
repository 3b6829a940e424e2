"""schemathesis over /openapi.json with every check, against a live server with auth on.

What the OpenAPI document promises is checked against what the server does: no 5xx, every
status documented, bodies and headers as documented, schema-valid requests accepted and
schema-violating ones rejected, 405s with the right `Allow`, 401 without a key. The CLI runs
in a subprocess (its phases: coverage, fuzzing, stateful) with a fixed seed, sending the
admin key; tests/fuzz/ holds its configuration and hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.auth.conftest import ADMIN, ADMIN_KEY, create_key
from tests.conftest import TINY_GGUF, LiveServer, assert_error

SEED = int(os.environ.get("FUZZ_SEED", "22"))  # another seed explores further: FUZZ_SEED=7
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "10"))  # per operation and phase
FUZZ = Path(__file__).parents[1] / "fuzz"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The tiny GGUF with a small context (every generation stays short), auth on. Failed
    authentications are not throttled: the run sends requests without a key on purpose."""
    config = {
        "auth": {"enabled": True, "admin_key": ADMIN_KEY, "failed_auth_limit": 1_000_000},
        "models": {"tiny": {"model_family": "llama",
                            "setup_params": {"model_path": str(TINY_GGUF)},
                            "model_params": {"n_ctx": 256, "n_threads": 2},
                            "default_max_tokens": 8}},
    }
    live = LiveServer(config, tmp_path_factory.mktemp("fuzz")).start()
    yield live
    live.stop()


def run_schemathesis(server: LiveServer, report: Path, env: dict[str, str]) -> str:
    """The CLI's output; its JSON report is written to `report` (and its cache next to it,
    not in the working tree)."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file", str(FUZZ / "schemathesis.toml"),
        "run", f"{server.url}/openapi.json", "--checks", "all", "--seed", str(SEED),
        "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--continue-on-failure",
        "--generation-database", "none", "--request-timeout", "120", "--no-color",
        "--header", f"Authorization: Bearer {ADMIN_KEY}",
        "--report", "json", "--report-json-path", str(report),
    ]
    done = subprocess.run(command, cwd=report.parent, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=900, check=False)
    return done.stdout + done.stderr


def test_openapi_document_holds_under_schemathesis(server: LiveServer, tmp_path: Path) -> None:
    own_id = server.client.get("/usage", headers=ADMIN).json()["key_id"]
    spare_id, _ = create_key(server.client, name="fuzz-spare")
    report = tmp_path / "schemathesis.json"
    started = time.monotonic()
    output = run_schemathesis(server, report, {
        "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks", "PYTHONPATH": str(ROOT),
        "FUZZ_OWN_KEY_ID": str(own_id), "FUZZ_SPARE_KEY_ID": str(spare_id)})
    seconds = time.monotonic() - started
    (tmp_path / "schemathesis.txt").write_text(output)
    assert report.exists(), _shortened(output)
    result: dict[str, Any] = json.loads(report.read_text())
    cases = result["test_cases"]
    print(f"schemathesis: seed {SEED}, {cases['generated']} cases, "
          f"{cases['unique_failures']} unique failures, {seconds:.0f} s")
    found = _shortened(output) + f"\n(full output: {tmp_path / 'schemathesis.txt'})"
    assert result["failures"] == [] and result["errors"] == [], found
    assert cases["unique_failures"] == 0 and result["exit_code"] == 0, found
    assert result["operations"]["tested"] == result["operations"]["total"], result["operations"]
    assert cases["generated"] >= 200, cases  # the run really exercised the API
    # No warning either: e.g. a low rate of accepted cases (an operation the run could not
    # reach, as when `model` drew names that are not served) or an unused auth scheme.
    assert not any(result["warnings"].values()), result["warnings"]
    # The hooks kept the caller's own key usable: still an admin, still accepted.
    mine = server.client.get(f"/admin/keys/{own_id}", headers=ADMIN)
    assert mine.status_code == 200 and mine.json()["role"] == "admin", mine.text


def _shortened(output: str, width: int = 400) -> str:
    """The CLI's report with each line cut to `width` characters (a reproduction may carry
    a body of megabytes)."""
    return "\n".join(line[:width] for line in output.splitlines())[-30000:]


# What the first run found, pinned one by one (each failed before its fix).

ODD_MESSAGES = [
    [{"role": [None, None], "content": "x"}],  # an unhashable role was a 500
    [{"role": {}, "content": "x"}],
    [{"role": "user", "content": 0}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [["text"]]}],
]


@pytest.mark.parametrize("messages", ODD_MESSAGES)
def test_odd_message_shapes_are_422(server: LiveServer, messages: list[Any]) -> None:
    bodies = {"/chat_completion": {"job_id": "j1", "messages": messages},
              "/tokenize": {"messages": messages},
              "/v1/chat/completions": {"model": "tiny", "messages": messages}}
    for path, body in bodies.items():
        error = assert_error(server.client.post(path, json=body, headers=ADMIN), 422,
                             "invalid_parameter")
        assert "role" in error["message"] or "content" in error["message"] or \
            "text" in error["message"], (path, error)


@pytest.mark.parametrize(("path", "methods"), [
    ("/admin/keys", "GET, POST"), ("/admin/keys/1", "GET, PATCH"),
    ("/generate", "POST"), ("/v1/models", "GET")])
def test_405_lists_every_method_of_the_path(server: LiveServer, path: str,
                                            methods: str) -> None:
    response = server.client.request("OPTIONS", path, headers=ADMIN)
    error = assert_error(response, 405, "method_not_allowed", ("OPTIONS",))
    allowed = {m.strip() for m in response.headers["allow"].split(",")} - {"HEAD"}
    assert allowed == set(methods.split(", ")), response.headers["allow"]
    assert methods.split(", ")[0] in error["message"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/generate", {"prompt": "x", "params": {"max_tokens": "5"}}, "max_tokens"),
    ("/generate", {"prompt": "x", "params": {"echo": 0}}, "echo"),
    ("/generate", {"prompt": "x", "params": {"temperature": True}}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "false"}, "stream"),
    ("/detokenize", {"tokens": [1, "2"]}, "tokens"),
    ("/admin/keys", {"name": "x", "rpm": "10"}, "rpm"),
    ("/admin/keys", {"name": "x", "valid_from": 0}, "valid_from"),
])
def test_values_of_another_json_type_are_refused(server: LiveServer, path: str,
                                                 body: dict[str, Any], field: str) -> None:
    """pydantic would coerce these ("5" → 5, 0 → false, 0 → 1970-01-01); the document
    allows none of them, so neither does the server."""
    assert_error(server.client.post(path, json=body, headers=ADMIN), 422, "invalid_parameter",
                 (field, "must be"))


def test_whole_floats_are_integers(server: LiveServer) -> None:
    """JSON Schema counts 3.0 as an integer, and so does the server."""
    response = server.client.post("/generate", headers=ADMIN, json={
        "prompt": "x", "params": {"max_tokens": 3.0, "temperature": 0}})
    assert response.status_code == 200, response.text
    assert_error(server.client.post("/generate", headers=ADMIN, json={
        "prompt": "x", "params": {"max_tokens": 2.5}}), 422, "invalid_parameter",
        ("max_tokens",))


@pytest.mark.parametrize("query", ["to=0", "from=1700000000", "to=2026-1-1"])
def test_usage_days_are_iso_dates(server: LiveServer, query: str) -> None:
    assert_error(server.client.get(f"/usage?{query}", headers=ADMIN), 422,
                 "invalid_parameter", ("YYYY-MM-DD",))


@pytest.mark.parametrize("path", [f"/admin/keys/{2**64}", f"/admin/usage?key_id={2**70}",
                                  "/admin/keys/0"])
def test_key_ids_out_of_range_are_422(server: LiveServer, path: str) -> None:
    """A key id beyond 64 bits reached SQLite and failed there (a 500)."""
    assert_error(server.client.get(path, headers=ADMIN), 422, "invalid_parameter", ("key_id",))


def test_every_operation_documents_its_errors(server: LiveServer) -> None:
    schema = server.client.get("/openapi.json", headers=ADMIN).json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path in ("/check", "/health", "/ready"):
                assert "security" not in operation and "401" not in responses
                continue
            assert {"401", "429", "503"} <= set(responses), (method, path, set(responses))
            assert operation["security"] == [{"bearer": []}, {"apiKey": []}]
            if "requestBody" in operation:
                assert {"408", "413", "422"} <= set(responses), (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    body = response["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
