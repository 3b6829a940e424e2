"""An "algorithm" as users already have one, wrapped as an llm-api family in one line."""

import time

from backends.base import AlgorithmBackend


class ReverseAlgorithm:
    """Answers with the prompt reversed; `load_seconds` simulates a slow model load and the
    prompt "fail" an engine failure."""

    def __init__(self, load_seconds: float = 0.0) -> None:
        time.sleep(load_seconds)

    def run(self, text: str) -> str:
        if text == "fail":
            raise RuntimeError("secret internal detail at /srv/models")
        return text[::-1]


ReverseBackend = AlgorithmBackend.wrap(ReverseAlgorithm, family="reverse")
