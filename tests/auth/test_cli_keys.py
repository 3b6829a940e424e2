"""`llm-api keys ...` and `llm-api usage`, run as a user runs them, on the server's store."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.app.test_cli import LLM_API
from tests.auth.conftest import auth_config, bearer
from tests.conftest import LiveServer, assert_error

SECRET = re.compile(r"llmapi-[A-Za-z0-9_-]{43}")


def run(config: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([LLM_API, *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "250"})
    if ok:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def row(output: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│ \n").split("│")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{output}")


def test_keys_and_usage_end_to_end(tmp_path: Path, store_config: dict[str, Any]) -> None:
    config = {**auth_config(), **store_config, "data_dir": str(tmp_path / "data")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    created = run(path, "keys", "create", "--name", "Carol", "--email", "carol@example.org",
                  "--max-requests", "3", "--rpm", "100", "--model", "rev",
                  "--expires-at", "2999-01-31")
    [secret] = SECRET.findall(created.stdout)
    assert row(created.stdout, "name")[1] == "Carol"
    assert row(created.stdout, "expires_at")[1] == "2999-02-01 00:00"  # through the 31st
    key_id = row(created.stdout, "id")[1]

    server = LiveServer(config, tmp_path / "server").start()  # the same store
    try:
        for _ in range(2):
            assert server.client.post("/generate", json={"prompt": "one two", "model": "rev"},
                                      headers=bearer(secret)).json() == "owt eno"
        assert_error(server.client.post("/generate", json={"prompt": "x", "model": "tiny"},
                                        headers=bearer(secret)), 403, "model_not_allowed")
        listed = run(path, "keys", "list").stdout
        cells = row(listed, key_id)
        assert cells[2:6] == ["Carol", "user", "active", "2/3"]

        assert row(run(path, "keys", "update", key_id, "--max-requests", "10",
                       "--clear", "rpm").stdout, "rpm")[1] == "-"
        assert row(run(path, "keys", "show", key_id).stdout, "max_requests")[1] == "10"

        usage = run(path, "usage", "--key", key_id).stdout
        assert row(usage, "total")[1:] == ["3", "1", "0", "2", "5"]  # 403s are recorded too
        assert row(run(path, "usage", "--model", "rev").stdout, "total")[1] == "2"

        rotated = run(path, "keys", "rotate", key_id).stdout
        [new_secret] = SECRET.findall(rotated)
        assert_error(server.client.get("/usage", headers=bearer(secret)), 401)
        assert server.client.get("/usage", headers=bearer(new_secret)).status_code == 200

        run(path, "keys", "revoke", key_id, "--reason", "project ended")
        assert row(run(path, "keys", "list").stdout, key_id)[4] == "revoked"
        assert_error(server.client.get("/usage", headers=bearer(new_secret)), 401,
                     "api_key_revoked", ("project ended",))
    finally:
        server.stop()

    missing = run(path, "keys", "show", "999", ok=False)
    assert missing.returncode == 1 and "no key with id 999" in missing.stderr
    bad = run(path, "keys", "create", "--name", "x", "--role", "root", ok=False)
    assert bad.returncode == 2 and "role" in bad.stderr
