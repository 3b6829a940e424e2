"""Plot aggregate tokens/s vs concurrency from bench/serving.py's JSON (run in the bench venv,
which has matplotlib): python bench/plot_serving.py RESULTS.json OUT.png"""

from __future__ import annotations

import json
import statistics
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    data = json.loads(open(source).read())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, metrics in data["llama"].items():
        points = sorted((int(k.split()[1]), v) for k, v in metrics.items()
                        if k.startswith("sweep ") and k.endswith(" tok/s"))
        if not points:
            continue
        xs = [x for x, _ in points]
        ax.plot(xs, [statistics.median(v) for _, v in points], marker="o", label=system)
        ax.fill_between(xs, [min(v) for _, v in points], [max(v) for _, v in points], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate completion tokens/s")
    ax.set_title(data.get("title", "serving benchmark"), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
