"""bench/embeddings.py end to end, small: its own `llm-api serve` with the tiny transformers
model as an embedding model and the tiny GGUF, no baselines. Asserts what the bench reports
(every case ran, no error, no 503 at the default max_queue), never speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import FIXTURES, TINY_GGUF

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "embeddings.py"


def test_small_run_against_a_real_server(tmp_path: Path) -> None:
    out = tmp_path / "embeddings.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--hf-model", str(FIXTURES / "tiny-llama-hf"),
         "--gguf", str(TINY_GGUF), "--baselines", "none", "--texts", "12",
         "--per-request", "4", "--singles", "20", "--clients", "20", "--rounds", "2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| hf singles | 20 |" in done.stdout and "PASS" in done.stdout
    result = json.loads(out.read_text())
    assert result["failures"] == []
    assert set(result["rows"]) == {"hf batch", "hf singles", "gguf batch", "gguf singles"}
    for name, times in result["times"].items():
        assert len(times["ours"]) == 2 and times["base"] == [], name
