"""The README's examples run as written against a live server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lc_servers import ServerProcess

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_example_runs(llm_api_server: ServerProcess) -> None:
    [example, *_] = examples()
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


def test_readme_agent_calls_the_tool_and_answers(
        llm_api_server: ServerProcess, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The agent loop goes call → tool → answer (its first turn forces the call, so the
    random-weight model makes one too; the call is constrained to the tool's schema)."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    [example] = [e for e in examples() if "create_agent" in e]
    assert 'base_url = "http://localhost:8000"' in example
    monkeypatch.delenv("LLM_API_BASE_URL", raising=False)
    if llm_api_server.api_key:
        monkeypatch.setenv("LLM_API_KEY", llm_api_server.api_key)
    else:
        monkeypatch.delenv("LLM_API_KEY", raising=False)
    scope: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(example.replace("http://localhost:8000", llm_api_server.url),  # noqa: S102
                 "README.md", "exec"), scope)
    human, called, result, answer = scope["result"]["messages"]
    assert isinstance(human, HumanMessage)
    assert isinstance(called, AIMessage) and len(called.tool_calls) == 1
    [call] = called.tool_calls
    tool = scope["get_weather"]
    assert call["name"] == "get_weather"
    arguments = tool.tool_call_schema.model_validate(call["args"])  # schema-valid
    assert len(arguments.city) <= 40
    assert isinstance(result, ToolMessage) and result.status == "success"
    assert result.tool_call_id == call["id"]
    assert result.content == f"Sunny and 21 °C in {arguments.city}."  # the tool ran
    assert isinstance(answer, AIMessage) and not answer.tool_calls  # and the agent ended
    assert answer.response_metadata["finish_reason"] in {"stop", "length"}
    printed = capsys.readouterr().out
    assert "Tool Calls:" in printed and "Sunny and 21 °C" in printed
