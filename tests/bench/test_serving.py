"""bench/serving.py parses its options and prints its plan (no timing: speed lives in bench/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serving.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)


def test_dry_run_prints_the_plan() -> None:
    done = run("--quick", "--dry-run", "--systems", "llm-api,llama-server")
    assert done.returncode == 0, done.stderr
    assert "concurrency sweep 1, 2, 8 streams" in done.stdout
    assert "3 streams together of mixed lengths (8, 16, 64 tokens)" in done.stdout
    assert "systems: llm-api, llama-server; transformers rows: True" in done.stdout
    assert "medians of 1 alternating round(s) x 1 interleaved run(s)" in done.stdout


def test_runs_per_round_default_to_three() -> None:
    done = run("--dry-run", "--rounds", "2")
    assert done.returncode == 0, done.stderr
    assert "medians of 2 alternating round(s) x 3 interleaved run(s)" in done.stdout


def test_unknown_system_is_a_clear_error() -> None:
    done = run("--dry-run", "--systems", "vllm")
    assert done.returncode == 2
    assert "unknown systems ['vllm']; known: llm-api, llama-server, llama-cpp-python" in done.stderr
