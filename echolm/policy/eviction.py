"""Utility-aware eviction (paper, "Replay and cache management": 0/1 knapsack under a memory budget,
weight = stored size, value = number of successful offloads the example enabled, decayed x0.9 per hour).

Keeping a subset of examples is a 0/1 knapsack: maximise the total decayed value of the kept examples
with total size <= budget; everything else is evicted.

* Exact dynamic programming over integer weights when the table fits: sizes and budget are first divided
  by their greatest common divisor (lossless). If the capacity is still larger than ``max_cells``, weights
  are put on a grid of ``unit = ceil(budget / max_cells)`` bytes, each item's weight rounded **up**
  (``ceil(size / unit)``) and the capacity rounded down (``budget // unit``): every kept set then fits the
  true budget, at the price of at most ``unit`` bytes of over-estimate per kept item.
* Greedy by value density (value / size, ties by id) when ``n * cells`` would exceed ``max_table``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Literal

import numpy as np

DECAY_PER_HOUR = 0.9


def decayed_value(value: float, updated_at: float, now: float, decay_per_hour: float = DECAY_PER_HOUR) -> float:
    """``value * decay_per_hour ** hours_since_update`` (timestamps in seconds; a future update counts as now)."""
    hours = max(0.0, now - updated_at) / 3600.0
    return value * decay_per_hour**hours


def add_offloads(
    value: float, updated_at: float, now: float, count: float = 1.0, decay_per_hour: float = DECAY_PER_HOUR
) -> float:
    """The value after ``count`` more successful offloads at ``now``: decay the old value, then add."""
    return decayed_value(value, updated_at, now, decay_per_hour) + count


@dataclass(frozen=True, slots=True)
class EvictionItem:
    """One cached example: ``size`` in bytes (or 1 for a row budget), value as of ``updated_at`` (seconds)."""

    id: int
    size: int
    value: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    evict: list[int]
    kept_value: float
    kept_size: int
    method: Literal["none", "dp", "greedy"]


def plan_eviction(
    items: Sequence[EvictionItem],
    budget: int,
    now: float,
    *,
    decay_per_hour: float = DECAY_PER_HOUR,
    max_cells: int = 100_000,
    max_table: int = 20_000_000,
) -> EvictionPlan:
    """Ids to evict (sorted) so the rest fits in ``budget`` with the most decayed value kept."""
    if budget < 0:
        raise ValueError(f"budget must be non-negative, got {budget}")
    sizes = [max(0, int(i.size)) for i in items]
    values = [max(0.0, decayed_value(i.value, i.updated_at, now, decay_per_hour)) for i in items]
    if sum(sizes) <= budget:
        return EvictionPlan([], sum(values), sum(sizes), "none")

    weights, capacity = _integer_grid(sizes, budget, max_cells)
    method: Literal["dp", "greedy"]
    if len(items) * (capacity + 1) <= max_table:
        keep, method = knapsack_keep(weights, values, capacity), "dp"
    else:
        keep, method = _greedy_keep(sizes, values, budget, [i.id for i in items]), "greedy"
    evict = sorted(item.id for index, item in enumerate(items) if index not in keep)
    return EvictionPlan(evict, sum(values[i] for i in keep), sum(sizes[i] for i in keep), method)


def _integer_grid(sizes: Sequence[int], budget: int, max_cells: int) -> tuple[list[int], int]:
    divisor = reduce(math.gcd, [s for s in sizes if s > 0], budget) or 1
    weights = [s // divisor for s in sizes]
    capacity = budget // divisor
    if capacity <= max_cells:
        return weights, capacity
    unit = math.ceil(budget / max_cells)
    return [math.ceil(s / unit) for s in sizes], budget // unit


def knapsack_keep(weights: Sequence[int], values: Sequence[float], capacity: int) -> set[int]:
    """Exact 0/1 knapsack by DP over capacities; returns the indices to keep.

    An item is taken only if it strictly improves the value, so zero-value items are never kept.
    """
    best = np.zeros(capacity + 1)
    taken = np.zeros((len(weights), capacity + 1), dtype=bool)
    for index, (w, v) in enumerate(zip(weights, values, strict=True)):
        if w > capacity or v <= 0:
            continue
        with_item = best[: capacity + 1 - w] + v
        improves = with_item > best[w:]
        taken[index, w:] = improves
        best[w:] = np.where(improves, with_item, best[w:])
    keep: set[int] = set()
    remaining = capacity
    for index in range(len(weights) - 1, -1, -1):
        if taken[index, remaining]:
            keep.add(index)
            remaining -= weights[index]
    return keep


def _greedy_keep(sizes: Sequence[int], values: Sequence[float], budget: int, ids: Sequence[int]) -> set[int]:
    """Highest value per byte first, skipping what no longer fits (zero-size items are free)."""
    order = sorted(range(len(sizes)), key=lambda i: (-(values[i] / sizes[i]) if sizes[i] else -math.inf, ids[i]))
    keep: set[int] = set()
    used = 0
    for i in order:
        if values[i] > 0 and used + sizes[i] <= budget:
            keep.add(i)
            used += sizes[i]
    return keep
