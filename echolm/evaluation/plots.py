"""The report's figures (matplotlib, Agg backend: no display needed).

* ``pareto_plot``: every system's win rate against the large model vs its throughput normalised to
  always-large (the paper's Fig. 17): routers and caches as their knob sweeps, fixed systems as points.
* ``cache_size_plot``: the small model's win rate with stage 1 examples vs the cache size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from echolm.evaluation.report import (  # noqa: E402
    ALWAYS_LARGE,
    ALWAYS_SMALL,
    ECHOLM_FULL,
    ECHOLM_LEARNED,
    ECHOLM_SIMILARITY,
    ROUTELLM,
    SEMANTIC_CACHE,
    SMALL_NEAREST,
    SMALL_RANDOM,
    SMALL_SELECTED,
    SystemPoint,
    frontier,
)

STYLE: dict[str, dict[str, object]] = {
    ALWAYS_LARGE: {"color": "black", "marker": "s"},
    ALWAYS_SMALL: {"color": "grey", "marker": "v"},
    SMALL_RANDOM: {"color": "tab:olive", "marker": "x"},
    SMALL_NEAREST: {"color": "tab:green", "marker": "D"},
    SMALL_SELECTED: {"color": "tab:cyan", "marker": "D"},
    ECHOLM_SIMILARITY: {"color": "tab:blue", "marker": "o"},
    ECHOLM_LEARNED: {"color": "tab:purple", "marker": "o"},
    ECHOLM_FULL: {"color": "tab:red", "marker": "o"},
    SEMANTIC_CACHE: {"color": "tab:orange", "marker": "^"},
    ROUTELLM: {"color": "tab:brown", "marker": "P"},
}


def pareto_plot(systems: dict[str, list[SystemPoint]], path: Path, *, title: str,
                max_ratio: float | None = None) -> Path:
    """Win rate vs throughput ratio; sweeps drawn as their Pareto frontier with every point faint."""
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for name, points in systems.items():
        style = STYLE.get(name, {"marker": "o"})
        if len(points) == 1:
            p = points[0]
            ax.scatter([p.throughput_ratio], [p.win_rate], label=name, s=60, zorder=3, **style)
            continue
        ax.scatter([p.throughput_ratio for p in points], [p.win_rate for p in points], s=12, alpha=0.25,
                   color=style.get("color"), marker=style.get("marker"))
        front = frontier(points)
        ax.plot([p.throughput_ratio for p in front], [p.win_rate for p in front], label=name, linewidth=1.8,
                markersize=5, color=style.get("color"), marker=style.get("marker"), zorder=2)
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":")
    # Log scale: a semantic cache answering most requests from the cache is 100x+ faster than always-large,
    # while the routers' interesting range is 1-3x.
    ax.set_xscale("log", base=2)
    ratios = [p.throughput_ratio for points in systems.values() for p in points]
    low = min(0.5, min(ratios) * 0.9)
    high = max(2.0, min(max(ratios) * 1.2, max_ratio or float("inf")))
    ax.set_xlim(low, high)
    ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if low <= t <= high]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.set_xlabel("throughput relative to always-large (cost model; log scale)")
    ax.set_ylabel("win rate vs the large model")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def cache_size_plot(series: dict[str, Sequence[tuple[int, SystemPoint]]], n_cache: dict[str, int], path: Path,
                    *, title: str) -> Path:
    """Win rate of the small model + nearest examples vs cache size (% of the cache part), per workload."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for workload, points in series.items():
        xs = [100.0 * size / n_cache[workload] for size, _ in points]
        ys = [p.win_rate for _, p in points]
        ax.plot(xs, ys, marker="o", label=f"{workload} (cache part: {n_cache[workload]})")
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":", label="parity with the large model")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xticks([0, 1, 2.5, 10, 25, 50, 100])
    ax.set_xticklabels(["0", "1", "2.5", "10", "25", "50", "100"])
    ax.set_xlabel("cache size (% of the cache part; 0 = small model alone)")
    ax.set_ylabel("win rate vs the large model")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
