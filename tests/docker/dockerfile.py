"""A small reader for our Dockerfiles: the instructions of each stage, continuations joined."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword}, found {found}"
        return found[0]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                values[key] = value
        return values

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.one(keyword))
        assert isinstance(value, list), f"{keyword} must use the JSON (exec) form"
        return [str(v) for v in value]


def stages(path: Path) -> list[Stage]:
    """Stages in order; comments dropped, backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    result: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            result.append(Stage(base=args.split()[0]))
        elif result:
            result[-1].instructions.append((keyword, " ".join(args.split())))
    return result


def install_command(stage: Stage) -> list[str]:
    """The docker/install-app invocation of a stage's RUN lines, as argv."""
    for args in stage.all("RUN"):
        for command in args.split("&&"):
            argv = shlex.split(command)
            if argv and argv[0].endswith("docker/install-app"):
                return argv
    raise AssertionError("no RUN line calls docker/install-app")
