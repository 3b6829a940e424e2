"""Markdown tables of bench/serving.py: medians with their min-max spread, ratios and targets."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

Samples = dict[str, dict[str, list[float]]]  # system -> metric -> one value per round
OURS, CPP, LCP = "llm-api", "llama-server", "llama-cpp-python"


def med(values: Sequence[float] | None) -> float | None:
    return statistics.median(values) if values else None


def cell(values: Sequence[float] | None) -> str:
    if not values:
        return "–"
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.3g}"
    return f"{middle:.3g} ({min(values):.3g}–{max(values):.3g})"


def ratio(ours: float | None, other: float | None) -> str:
    return "–" if ours is None or not other else f"{ours / other:.2f}×"


def verdict(value: float | None, base: float | None, bound: float, higher: bool) -> str:
    """'≥ 1.0× ✓' style: is ours ÷ base on the right side of `bound`?"""
    sign = "≥" if higher else "≤"
    if value is None or not base:
        return f"{sign} {bound}× (n/a)"
    r = value / base
    ok = r >= bound if higher else r <= bound
    return f"{sign} {bound}× {'✓' if ok else '✗'}"


def targets(metric: str) -> list[tuple[str, float, bool]]:
    """(baseline, bound, higher is better) of the issue's targets for a metric."""
    if metric.startswith("1x") and metric.endswith("tok/s"):
        return [(CPP, 0.95, True)]
    if metric == "sweep 8 tok/s":
        return [(CPP, 1.0, True), (LCP, 3.0, True)]
    if metric == "chat turn-2 TTFT s":
        return [(CPP, 1.1, False)]
    return []


def llama_table(samples: Samples, systems: list[str]) -> str:
    metrics = list(dict.fromkeys(k for s in systems for k in samples.get(s, {})))
    others = [s for s in systems if s != OURS]
    head = ["metric", *systems, *(f"{OURS} ÷ {o}" for o in others), "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for metric in metrics:
        values = {s: samples.get(s, {}).get(metric) for s in systems}
        ours = med(values.get(OURS))
        ratios = [ratio(ours, med(values[o])) for o in others]
        goal = "; ".join(f"{verdict(ours, med(values.get(base)), bound, hi)} vs {base}"
                         for base, bound, hi in targets(metric) if base in systems)
        label = metric.replace("sweep 8 tok/s", "sweep 8 tok/s (8 streams together)")
        row = [label, *(cell(values[s]) for s in systems), *ratios, goal]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(runs: Sequence[Samples], base: str = CPP) -> str:
    """llm-api ÷ llama-server pooled over back-to-back pairs of one or more results: run i of
    a metric on llm-api and run i on llama-server were made one after the other (same round,
    same repetition), so their ratio is free of the machine's slower and faster spells. The
    median of every pair's ratio over all `runs`, with the lowest and highest pair."""
    lines = [f"| metric | {OURS} ÷ {base}, median of pairs | lowest–highest pair | pairs |",
             "|---|---|---|---|"]
    metrics = list(dict.fromkeys(k for run in runs for k in run.get(OURS, {})))
    for metric in metrics:
        ratios = [a / b for run in runs
                  for a, b in zip(run.get(OURS, {}).get(metric, []),
                                  run.get(base, {}).get(metric, []), strict=False) if b]
        if ratios:
            lines.append(f"| {metric} | {statistics.median(ratios):.3f}× | "
                         f"{min(ratios):.2f}–{max(ratios):.2f}× | {len(ratios)} |")
    return "\n".join(lines)


def hf_table(samples: dict[str, list[float]]) -> str:
    ours = med(samples.get("llm-api 8 concurrent (HTTP)"))
    lines = ["| system | aggregate tok/s | llm-api ÷ system | target |", "|---|---|---|---|"]
    for name, values in samples.items():
        goal = verdict(ours, med(values), 0.9, True) if "generate_batch" in name else ""
        lines.append(f"| {name} | {cell(values)} | {ratio(ours, med(values))} | {goal} |")
    return "\n".join(lines)
