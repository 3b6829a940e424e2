"""llm-api: open LLMs behind a protected HTTP API."""

__version__ = "0.1.0"
