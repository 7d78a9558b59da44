"""Eviction as a 0/1 knapsack (paper, "Replay and cache management")."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echolm.policy.eviction import EvictionItem, add_offloads, decayed_value, knapsack_keep, plan_eviction

HOUR = 3600.0
NOW = 100 * HOUR


def _brute_force_best(items: list[EvictionItem], budget: int, now: float) -> float:
    values = [decayed_value(i.value, i.updated_at, now) for i in items]
    best = 0.0
    for mask in itertools.product((0, 1), repeat=len(items)):
        size = sum(i.size for i, keep in zip(items, mask, strict=True) if keep)
        if size <= budget:
            best = max(best, sum(v for v, keep in zip(values, mask, strict=True) if keep))
    return best


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[EvictionItem], int]:
    n = draw(st.integers(min_value=1, max_value=9))
    items = [
        EvictionItem(
            id=i,
            size=draw(st.integers(min_value=0, max_value=60)),
            value=draw(st.floats(min_value=0.0, max_value=20.0, allow_nan=False)),
            updated_at=NOW - draw(st.floats(min_value=0.0, max_value=48.0)) * HOUR,
        )
        for i in range(n)
    ]
    return items, draw(st.integers(min_value=0, max_value=200))


@settings(max_examples=300, deadline=None)
@given(instances())
def test_matches_brute_force_on_small_instances(instance):
    items, budget = instance
    plan = plan_eviction(items, budget, NOW)
    kept = [i for i in items if i.id not in set(plan.evict)]
    assert sum(i.size for i in kept) <= budget
    assert plan.kept_size == sum(i.size for i in kept)
    kept_value = sum(decayed_value(i.value, i.updated_at, NOW) for i in kept)
    assert plan.kept_value == pytest.approx(kept_value)
    assert kept_value == pytest.approx(_brute_force_best(items, budget, NOW), rel=1e-9, abs=1e-9)
    assert plan.evict == sorted(plan.evict)


def test_decay_math():
    assert decayed_value(10.0, updated_at=0.0, now=HOUR) == pytest.approx(9.0)
    assert decayed_value(10.0, updated_at=0.0, now=2.5 * HOUR) == pytest.approx(10.0 * 0.9**2.5)
    assert decayed_value(10.0, updated_at=0.0, now=0.0) == 10.0
    assert decayed_value(10.0, updated_at=HOUR, now=0.0) == 10.0  # clock skew never inflates a value
    assert add_offloads(10.0, updated_at=0.0, now=HOUR) == pytest.approx(10.0)  # 9.0 + 1
    assert add_offloads(4.0, updated_at=0.0, now=2 * HOUR, count=3) == pytest.approx(4.0 * 0.81 + 3)


def test_decay_changes_which_entry_survives():
    stale = EvictionItem(1, size=10, value=10.0, updated_at=NOW - 24 * HOUR)  # 10 * 0.9**24 ~ 0.8
    fresh = EvictionItem(2, size=10, value=2.0, updated_at=NOW)
    assert plan_eviction([stale, fresh], budget=10, now=NOW).evict == [1]
    assert plan_eviction([stale, fresh], budget=10, now=NOW - 24 * HOUR).evict == [2]


def test_nothing_to_evict_when_everything_fits():
    items = [EvictionItem(i, 100, 1.0, NOW) for i in range(5)]
    plan = plan_eviction(items, budget=500, now=NOW)
    assert plan.evict == [] and plan.method == "none" and plan.kept_size == 500


def test_worthless_entries_go_first():
    items = [EvictionItem(1, 10, 0.0, NOW), EvictionItem(2, 10, 1.0, NOW)]
    assert plan_eviction(items, budget=15, now=NOW).evict == [1]
    assert plan_eviction(items, budget=0, now=NOW).evict == [1, 2]


def test_large_byte_sizes_are_exact_when_a_common_divisor_exists():
    page = 4096
    items = [
        EvictionItem(1, 3 * page, 5.0, NOW),
        EvictionItem(2, 2 * page, 3.0, NOW),
        EvictionItem(3, 2 * page, 3.0, NOW),
    ]
    plan = plan_eviction(items, budget=4 * page, now=NOW, max_cells=10)
    assert plan.method == "dp" and plan.evict == [1] and plan.kept_value == pytest.approx(6.0)


def test_grid_rounding_keeps_the_budget_and_stays_near_optimal():
    sizes = [1_000_003, 2_500_017, 1_999_999, 3_333_331, 777_777, 1_234_567, 2_222_223, 999_999]
    values = [3.0, 7.0, 4.0, 9.0, 2.0, 3.5, 5.0, 2.5]
    items = [EvictionItem(i, s, v, NOW) for i, (s, v) in enumerate(zip(sizes, values, strict=True))]
    budget = 7_000_000
    plan = plan_eviction(items, budget, NOW, max_cells=1000)  # unit = 7000 bytes
    assert plan.method == "dp" and plan.kept_size <= budget
    # each kept item's weight is over-estimated by < 1 unit, so the loss is bounded; here it is small
    assert plan.kept_value >= 0.95 * _brute_force_best(items, budget, NOW)


def test_greedy_by_density_for_large_instances():
    items = [EvictionItem(i, size=10 + i, value=float(i % 7), updated_at=NOW) for i in range(200)]
    budget = 1000
    plan = plan_eviction(items, budget, NOW, max_table=1000)
    assert plan.method == "greedy" and plan.kept_size <= budget
    evicted = [i for i in items if i.id in set(plan.evict)]
    room = budget - plan.kept_size
    assert all(e.value == 0 or e.size > room for e in evicted)  # nothing valuable that still fits is dropped
    densest = max((i for i in items if i.value > 0), key=lambda i: i.value / i.size)
    assert densest.id not in plan.evict
    exact = plan_eviction(items, budget, NOW)
    assert exact.method == "dp" and exact.kept_value >= plan.kept_value >= 0.9 * exact.kept_value


def test_knapsack_keep_known_answer():
    # classic instance: capacity 50, best = items 1 and 2 (value 220)
    assert knapsack_keep([10, 20, 30], [60.0, 100.0, 120.0], 50) == {1, 2}
    assert knapsack_keep([5], [1.0], 4) == set()
    with pytest.raises(ValueError):
        plan_eviction([], budget=-1, now=NOW)
