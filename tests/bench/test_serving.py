"""bench/serving.py parses its options and prints its plan (no timing: speed lives in bench/)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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


def _import(name: str) -> Any:
    """A module of bench/ (a folder of scripts, not a package)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_pairs_are_pooled_run_by_run_over_results() -> None:
    report = _import("serving_report")
    first = {"llm-api": {"sweep 8 tok/s": [2.0, 4.0]},
             "llama-server": {"sweep 8 tok/s": [1.0, 2.0]}}
    second = {"llm-api": {"sweep 8 tok/s": [3.0], "1x128 tok/s": [1.0]},
              "llama-server": {"sweep 8 tok/s": [1.0]}}  # no llama-server 1x128: no pair
    table = report.paired_table([first, second])
    assert "| sweep 8 tok/s | 2.000× | 2.00–3.00× | 3 |" in table
    assert "1x128" not in table


def test_report_of_several_results_prints_their_pooled_pairs(tmp_path: Path) -> None:
    files = []
    for i, (ours, cpp) in enumerate([([300.0, 310.0], [290.0, 320.0]), ([280.0], [300.0])]):
        path = tmp_path / f"serving-{i}.json"
        path.write_text(json.dumps({"llama": {"llm-api": {"sweep 8 tok/s": ours},
                                              "llama-server": {"sweep 8 tok/s": cpp}}}))
        files.append(str(path))
    done = run("--report", *files)
    assert done.returncode == 0, done.stderr
    pooled = done.stdout.split("## paired, 2 result(s) pooled")[1]
    assert "| sweep 8 tok/s | 0.969× | 0.93–1.03× | 3 |" in pooled  # 310/320, 300/290, 280/300


def test_phases_split_a_together_case_at_each_first_token() -> None:
    client = _import("serving_client")
    serving = _import("serving")
    streams = [client.Stream(start=0.0, first=0.5, end=2.5, usage=101),
               client.Stream(start=0.1, first=0.7, end=2.7, usage=101),
               client.Stream(start=0.2, first=0.6, end=3.6, usage=101)]
    phases = serving.phases(streams, "sweep 8")
    assert phases["sweep 8 first token s"] == pytest.approx(0.6)
    assert phases["sweep 8 ms per token after the first"] == pytest.approx(20.0)  # 2 s, 100 tokens


def test_large_vocabulary_model_is_a_choice() -> None:
    done = run("--dry-run", "--model", "large-vocab", "--skip-hf")
    assert done.returncode == 0, done.stderr
    assert "model rand-262k-vocab-q8_0-noeos.gguf" in done.stdout


def test_made_up_pieces_are_new_words_of_six_letters_or_more() -> None:
    randmodel = _import("randmodel")
    taken = {"\u2581the", "ing"}
    pieces = randmodel.extra_pieces(taken, 2000, 0)
    assert len(set(pieces)) == 2000 and not taken & set(pieces)
    assert all(6 <= len(p.removeprefix("\u2581")) <= 12 and p.removeprefix("\u2581").isalpha()
               for p in pieces)
    assert 0.5 < sum(p.startswith("\u2581") for p in pieces) / 2000 < 0.8
    assert randmodel.extra_pieces(taken, 2000, 0) == pieces  # the same model every build
