"""The report's figures (matplotlib, Agg backend: no display needed).

* ``pareto_plot``: every system's win rate against the large model vs its throughput normalised to
  always-large (the paper's Fig. 17): routers and caches as their knob sweeps, fixed systems as points.
* ``cache_size_plot``: the small model's win rate with stage 1 examples vs the cache size.
* ``latency_plot``: p50 and p99 latency through the real pipeline vs offered load, per workload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from echolm.evaluation.report import (  # noqa: E402
    ALWAYS_LARGE,
    ALWAYS_SMALL,
    ECHOLM_COLD,
    ECHOLM_FULL,
    ECHOLM_LEARNED,
    ECHOLM_REPLAY,
    ECHOLM_REPLAY_CACHE_FRONT,
    ECHOLM_REPLAY_REUSE,
    ECHOLM_REUSE,
    ECHOLM_SIMILARITY,
    ROUTELLM,
    SEMANTIC_CACHE,
    SEMANTIC_CACHE_REPLAYED,
    SMALL_NEAREST,
    SMALL_RANDOM,
    SMALL_LEARNED,
    SMALL_REPLAYED,
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
    ECHOLM_COLD: {"color": "tab:pink", "marker": "o"},
    SMALL_LEARNED: {"color": "tab:red", "marker": "D"},
    ECHOLM_FULL: {"color": "tab:red", "marker": "o"},
    ECHOLM_REUSE: {"color": "darkgreen", "marker": "*"},
    SEMANTIC_CACHE: {"color": "tab:orange", "marker": "^"},
    ROUTELLM: {"color": "tab:brown", "marker": "P"},
    SMALL_REPLAYED: {"color": "navy", "marker": "D"},
    ECHOLM_REPLAY: {"color": "navy", "marker": "o"},
    ECHOLM_REPLAY_REUSE: {"color": "navy", "marker": "*"},
    ECHOLM_REPLAY_CACHE_FRONT: {"color": "tab:gray", "marker": "*"},
    SEMANTIC_CACHE_REPLAYED: {"color": "goldenrod", "marker": "^"},
}


def pareto_plot(systems: dict[str, list[SystemPoint]], path: Path, *, title: str,
                max_ratio: float = 4.0) -> Path:
    """Win rate vs throughput ratio (linear, as the paper's Fig. 17, up to ``max_ratio``); sweeps drawn as
    their Pareto frontier with every setting faint. Settings beyond ``max_ratio`` (a semantic cache
    answering nearly everything from the cache) are counted in the legend instead of stretching the axis."""
    fig, ax = plt.subplots(figsize=(9.0, 5.0), dpi=120)
    shown = [p for points in systems.values() for p in points if p.throughput_ratio <= max_ratio]
    for name, points in systems.items():
        style = STYLE.get(name, {"marker": "o"})
        beyond = [p for p in points if p.throughput_ratio > max_ratio]
        label = name
        if beyond:
            label += f" ({len(beyond)} settings beyond {max_ratio:g}x, win rate >= {min(p.win_rate for p in beyond):.2f})"
        inside = [p for p in points if p.throughput_ratio <= max_ratio]
        if len(points) == 1:
            p = points[0]
            ax.scatter([min(p.throughput_ratio, max_ratio)], [p.win_rate], label=label, s=60, zorder=3, **style)
            continue
        ax.scatter([p.throughput_ratio for p in inside], [p.win_rate for p in inside], s=12, alpha=0.25,
                   color=style.get("color"), marker=style.get("marker"))
        front = [p for p in frontier(points) if p.throughput_ratio <= max_ratio]
        ax.plot([p.throughput_ratio for p in front], [p.win_rate for p in front], label=label, linewidth=1.8,
                markersize=5, color=style.get("color"), marker=style.get("marker"), zorder=2)
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":")
    wins = [p.win_rate for p in shown] or [0.5]
    ax.set_ylim(max(0.0, min(min(wins), 0.5) - 0.05), min(1.0, max(max(wins), 0.5) + 0.05))
    ratios = [p.throughput_ratio for p in shown] or [1.0]
    ax.set_xlim(min(0.9, min(ratios) - 0.05), min(max_ratio, max(2.0, max(ratios) * 1.05)))
    ax.set_xlabel("throughput relative to always-large (cost model)")
    ax.set_ylabel("win rate vs the large model")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # the legend sits outside the axes
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
    ax.set_xlim(-0.2, 130)
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


def latency_plot(points: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> Path:
    """Latency through the real pipeline vs offered load (a multiple of always-large's capacity), one panel
    per workload: measured p50 solid and p99 dashed, the cost model's p50 for the same arrivals dotted.
    ``points`` are the report's ``pipeline_latency`` rows (``LatencyPoint`` as dicts)."""
    workloads = list(dict.fromkeys(p.get("workload") or "-" for p in points))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.0 * len(workloads), 4.6), dpi=120, squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        mine = [p for p in points if (p.get("workload") or "-") == workload]
        for system in dict.fromkeys(p["system"] for p in mine):
            series = sorted((p for p in mine if p["system"] == system), key=lambda p: p["load"])
            style = STYLE.get(system, {})
            color, marker = style.get("color"), style.get("marker", "o")
            loads = [p["load"] for p in series]
            ax.plot(loads, [p["p50_s"] for p in series], color=color, marker=marker, label=f"{system}: p50")
            ax.plot(loads, [p["p99_s"] for p in series], color=color, marker=marker, linestyle="--",
                    label=f"{system}: p99")
            ax.plot(loads, [p.get("predicted_p50_s", float("nan")) for p in series], color=color, marker=marker,
                    linestyle=":", alpha=0.5, markerfacecolor="none", label=f"{system}: modelled p50")
        ax.set_xlabel("offered load (x always-large's measured capacity)")
        ax.set_ylabel("latency per request (s)")
        ax.set_ylim(bottom=0)
        ax.set_title(workload, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
