"""Model families, loaded lazily by name.

Built-in families are import paths, so choosing `llama` never imports torch. Third-party
families come from the `llm_api.backends` entry-point group: a pip-installed package that
declares `myfamily = my_package.module:MyBackend` there is usable as `model_family: myfamily`.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import EntryPoint, entry_points

from backends.base import Backend

ENTRY_POINT_GROUP = "llm_api.backends"

BUILTIN_FAMILIES: dict[str, str] = {
    "llama": "backends.llama:LlamaBackend",
    "huggingface": "backends.hf:HFBackend",
    "gptq": "backends.gptq:GPTQBackend",
    "gptq_llama": "backends.gptq:GPTQBackend",  # the name older configs use
}


class UnknownFamily(ValueError):
    pass


def _plugin_entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def family_names() -> list[str]:
    """Every family this installation can serve, built-in first."""
    plugins = [name for name in sorted(_plugin_entry_points()) if name not in BUILTIN_FAMILIES]
    return [*BUILTIN_FAMILIES, *plugins]


@cache
def backend_class(family: str) -> type[Backend]:
    """Import and return the backend class of `family`."""
    if family in BUILTIN_FAMILIES:
        module_name, _, attr = BUILTIN_FAMILIES[family].partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
    else:
        plugin = _plugin_entry_points().get(family)
        if plugin is None:
            raise UnknownFamily(
                f"unknown model_family '{family}'; available: {', '.join(family_names())}"
            )
        cls = plugin.load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise UnknownFamily(f"model_family '{family}' does not point at a Backend subclass")
    return cls
