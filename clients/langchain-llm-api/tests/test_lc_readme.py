"""The README's example runs as written against a live server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lc_servers import ServerProcess

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(llm_api_server: ServerProcess) -> None:
    [example, *_] = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert 'base_url = "http://localhost:8000"' in example
    source = example.replace("http://localhost:8000", llm_api_server.url)
    if llm_api_server.api_key:  # the example reads LLM_API_KEY when the server has keys
        env = {"LLM_API_KEY": llm_api_server.api_key}
    else:
        env = {}
    done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", **env})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "2 64"  # two vectors of the tiny model's 64 dimensions
    assert "name=" in lines[-2] and "country=" in lines[-2]
