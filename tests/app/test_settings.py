"""The settings tree: YAML, env overrides deep-merged, per-family validation, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.settings import SettingsError, load_settings, model_entries

CLASSIC = {
    "models_dir": "/models",
    "model_family": "llama",
    "setup_params": {"repo_id": "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                     "filename": "qwen2.5-0.5b-instruct-q4_k_m.gguf"},
    "model_params": {"n_ctx": 2048, "n_threads": 4},
}


def write(tmp_path: Path, data: object, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def test_classic_form_becomes_one_named_model(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CLASSIC))
    assert settings.models_dir == Path("/models")
    [entry] = model_entries(settings)
    assert entry.name == "qwen2.5-0.5b-instruct-q4_k_m"
    assert entry.family == "llama"
    assert entry.params.n_ctx == 2048 and entry.params.n_threads == 4  # type: ignore[attr-defined]
    assert entry.setup.repo_id == "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
    assert entry.max_queue == 16


def test_multi_model_form_and_per_model_limits(tmp_path: Path) -> None:
    config = {"server": {"max_queue": 3}, "models": {
        "tiny": {"setup_params": {"model_path": "a.gguf"}, "model_params": {"n_ctx": 256}},
        "echo": {"model_family": "reverse", "max_queue": 0, "request_timeout": 5}}}
    entries = model_entries(load_settings(write(tmp_path, config)))
    assert [(e.name, e.family, e.max_queue, e.request_timeout) for e in entries] == [
        ("tiny", "llama", 3, 600.0), ("echo", "reverse", 0, 5.0)]


def test_env_overrides_deep_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, CLASSIC)
    monkeypatch.setenv("LLM_API_MODELS_DIR", "/data/models")
    monkeypatch.setenv("LLM_API_SETUP_PARAMS__FILENAME", "b.gguf")
    monkeypatch.setenv("LLM_API_MODEL_PARAMS__N_CTX", "512")
    monkeypatch.setenv("LLM_API_SERVER__PORT", "9999")
    settings = load_settings(path)
    [entry] = model_entries(settings)
    assert settings.models_dir == Path("/data/models") and settings.server.port == 9999
    assert entry.setup.filename == "b.gguf"
    assert entry.setup.repo_id == "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
    assert entry.params.n_ctx == 512 and entry.params.n_threads == 4  # type: ignore[attr-defined]


def test_env_json_value_merges_keeping_other_keys(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_API_SETUP_PARAMS", '{"filename": "b.gguf"}')
    [entry] = model_entries(load_settings(write(tmp_path, CLASSIC)))
    assert entry.setup.filename == "b.gguf"
    assert entry.setup.repo_id == "Qwen/Qwen2.5-0.5B-Instruct-GGUF"


def test_env_override_of_one_model_in_the_multi_form(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"models": {"tiny": {"setup_params": {"model_path": "a.gguf"},
                                  "model_params": {"n_ctx": 2048, "n_threads": 2}}}}
    monkeypatch.setenv("LLM_API_MODELS__TINY__MODEL_PARAMS__N_CTX", "512")
    [entry] = model_entries(load_settings(write(tmp_path, config)))
    assert entry.params.n_ctx == 512 and entry.params.n_threads == 2  # type: ignore[attr-defined]


def test_config_file_from_env_var_and_default_location(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, CLASSIC, "elsewhere.yaml")
    monkeypatch.setenv("LLM_API_CONFIG", str(path))
    assert load_settings().models_dir == Path("/models")
    monkeypatch.delenv("LLM_API_CONFIG")
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {**CLASSIC, "models_dir": "/from-cwd"})
    assert load_settings().models_dir == Path("/from-cwd")


@pytest.mark.parametrize(("config", "mentions"), [
    ({**CLASSIC, "model_params": {"num_threads": 4}},
     ["model_params.num_threads", "unknown key", "n_threads", "n_ctx", "config.yaml"]),
    ({**CLASSIC, "model_params": {"n_ctx": "big"}}, ["model_params.n_ctx", "integer"]),
    ({**CLASSIC, "model_params": {"n_ctx": -5}}, ["model_params.n_ctx", "greater than"]),
    ({**CLASSIC, "model_family": "nope"}, ["model_family", "nope", "llama", "reverse"]),
    ({**CLASSIC, "server": {"port": 0}}, ["server.port"]),
    ({**CLASSIC, "setup_params": {"repo": "x"}}, ["setup_params.repo", "unknown key"]),
    ({**CLASSIC, "colour": "red"}, ["colour"]),
    ({"models_dir": "/m"}, ["(root): no model configured"]),
    ({"models": {"a": {"model_params": {}}}}, ["models.a.setup_params", "model_path"]),
    ({"models": {"a": {"setup_params": {"model_path": "x"},
                       "model_params": {"n_threads": 0}}}}, ["models.a.model_params.n_threads"]),
    ({**CLASSIC, "models": {"a": {}}}, ["either the classic keys"]),
    ("models: [unclosed", ["not valid YAML"]),
    ("- a list", ["must hold a mapping"]),
])
def test_invalid_settings_name_the_key_and_the_file(tmp_path: Path, config: object,
                                                    mentions: list[str]) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(write(tmp_path, config))
    for word in mentions:
        assert word in str(err.value), (word, str(err.value))


def test_invalid_env_value_names_the_variable(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_API_MODEL_PARAMS__NUM_THREADS", "3")
    with pytest.raises(SettingsError, match="environment variable LLM_API_MODEL_PARAMS__NUM_THR"):
        load_settings(write(tmp_path, CLASSIC))
    monkeypatch.delenv("LLM_API_MODEL_PARAMS__NUM_THREADS")
    monkeypatch.setenv("LLM_API_SERVER__PORT", "not-a-port")
    with pytest.raises(SettingsError, match="server.port.*environment variable LLM_API_SERVER"):
        load_settings(write(tmp_path, CLASSIC))


def test_without_any_config_file_the_error_says_where_it_looked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match="no model configured.*no config file at '"
                       + re.escape(str(tmp_path / "config.yaml"))):
        load_settings()
    monkeypatch.setenv("LLM_API_SETUP_PARAMS__MODEL_PATH", "/m/a.gguf")
    [entry] = model_entries(load_settings())  # env alone is enough
    assert entry.name == "a" and entry.family == "llama"


def test_a_named_config_that_does_not_exist_is_an_error(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="missing.yaml' does not exist"):
        load_settings(tmp_path / "missing.yaml")
    monkeypatch.setenv("LLM_API_CONFIG", str(tmp_path / "gone.yaml"))
    with pytest.raises(SettingsError, match="gone.yaml' does not exist"):
        load_settings()


def test_cli_exits_non_zero_with_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, {**CLASSIC, "model_params": {"num_threads": 4}})
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "model_params.num_threads" in done.stderr and "n_threads" in done.stderr


def test_a_json_config_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CLASSIC))
    [entry] = model_entries(load_settings(path))
    assert entry.setup.filename == "qwen2.5-0.5b-instruct-q4_k_m.gguf"
