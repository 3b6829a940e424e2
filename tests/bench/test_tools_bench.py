"""bench/tools.py end to end, small: its own `llm-api serve` over the tiny GGUF, 2 tools, 2
requests per case, one at a time and 2 together. Asserts what the bench reports (prompt tokens
from usage, the prefix-reuse counter, the server stopped), never speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_GGUF

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tools.py"


def test_small_run_against_a_real_server(tmp_path: Path) -> None:
    out = tmp_path / "tools.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(TINY_GGUF), "--tools", "2", "--n", "2",
         "--block", "2", "--clients", "2", "--max-tokens", "4", "--n-ctx", "2048",
         "--deadline", "100", "--json", str(out)],
        capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| (c) tools (auto), warm prefix | 2 |" in done.stdout
    result = json.loads(out.read_text())
    assert result["failures"] == []
    for clients in ("1", "2"):
        stats = result["stats"][clients]
        a, b, c, d = (stats[case] for case in "abcd")
        assert all(s["requests"] == 2 and s["errors"] == 0 for s in (a, b, c, d))
        assert b["prompt_tokens"] > a["prompt_tokens"] + 200  # the tools are in the prompt
        assert abs(c["prompt_tokens"] - b["prompt_tokens"]) < 10
        # warm: all but the question reused; cold: only the template's first few tokens
        assert c["reused_per_request"] > 0.8 * c["prompt_tokens"]
        assert b["reused_per_request"] < 40 and d["reused_per_request"] < 40
        assert c["server_ttft_mean"] is not None and a["ttft_p50"] is not None
