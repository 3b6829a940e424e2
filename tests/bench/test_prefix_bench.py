"""bench/prefix.py end to end, small: llm-api only, on the tiny GGUF, 3 streams, short contexts.
Asserts what the bench measures and reports (contexts of the asked size in the model's
tokens, every case's metrics, the JSON), never speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_GGUF

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "prefix.py"


def test_small_run_against_llm_api(tmp_path: Path) -> None:
    out = tmp_path / "prefix.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--systems", "llm-api", "--model", str(TINY_GGUF),
         "--streams", "3", "--prefix-tokens", "200", "--tokens", "4", "--reps", "1",
         "--n-ctx", "512", "--parallel", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| shared TTFT p50 s |" in done.stdout and "| chat wall s |" in done.stdout
    samples = json.loads(out.read_text())["samples"]["llm-api"]
    for metric in ("shared TTFT p50 s", "shared TTFT max s", "shared wall s",
                   "chat turn-1 TTFT p50 s", "chat turn-2 TTFT p50 s", "chat wall s",
                   "unique TTFT p50 s", "unique prompt tok/s"):
        assert len(samples[metric]) == 1 and samples[metric][0] > 0, metric
    assert samples["shared TTFT max s"][0] <= samples["shared wall s"][0]
    # a context of 200 tokens, then the question and "Answer:" (a few dozen more)
    assert 200 < samples["shared prompt tokens"][0] < 260
    assert 200 < samples["unique prompt tokens"][0] < 260
    # turn 2 holds turn 1's prompt and answer
    assert samples["chat turn-2 prompt tokens"][0] > samples["chat turn-1 prompt tokens"][0]


def test_dry_run_and_unknown_case() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "contexts of 300 tokens, 32 new tokens each" in done.stdout
    assert "systems: llm-api, llama-server" in done.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--cases", "rag"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown cases ['rag']" in bad.stderr
