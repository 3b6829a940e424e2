"""The shipped config.yaml: its default and every commented example are valid settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.settings import load_settings, model_entries

CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


def test_default_config_is_valid() -> None:
    [entry] = model_entries(load_settings(CONFIG))
    assert entry.family == "llama" and entry.setup.repo_id and entry.setup.filename


def _commented_models_block() -> dict[str, dict[str, object]]:
    lines = CONFIG.read_text().splitlines()
    start = lines.index("# models:")
    block = [line[2:] for line in lines[start:] if line.startswith("# ") or line == "#"]
    data: dict[str, dict[str, dict[str, object]]] = yaml.safe_load("\n".join(block))
    return data["models"]


def test_every_commented_example_is_valid(tmp_path: Path) -> None:
    models = _commented_models_block()
    families = {cfg.get("model_family", "llama") for cfg in models.values()}
    assert {"llama", "huggingface", "gptq"} <= families, "an example per built-in family"
    plugin = {name for name, cfg in models.items() if cfg.get("model_family") == "my_plugin"}
    assert plugin, "the plugin example is there (its family is not installed here)"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": {
        name: cfg for name, cfg in models.items() if name not in plugin}}))
    entries = model_entries(load_settings(config))
    assert {entry.name for entry in entries} == set(models) - plugin


def test_commented_store_and_auth_settings_are_valid(tmp_path: Path) -> None:
    lines = CONFIG.read_text().splitlines()
    start = lines.index("# auth:")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    data = yaml.safe_load("\n".join(block))
    assert {"auth", "data_dir", "database_url", "redis_url"} <= set(data)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(CONFIG.read_text()), **data}))
    settings = load_settings(config)
    assert settings.auth.enabled and settings.database_url and settings.redis_url
