"""Utility-aware eviction of cached examples, per tenant, under a byte and/or row budget.

For each tenant with active examples: the examples younger than ``protect_new_s`` are kept (they have
had no chance to enable an offload yet) and their bytes/rows are taken off the budget; the others go
into ``policy.eviction.plan_eviction``, a 0/1 knapsack that keeps the most value within the budget:

* weight = stored size: prompt + response + embedding bytes (``max_bytes``), or 1 per row
  (``max_examples``); with both budgets the row plan runs first and the byte plan on what it kept;
* value = successful offloads the example enabled, decayed x``decay_per_hour`` per hour, plus a
  tiny tie-break that prefers newer examples among equals (``TIE_BREAK``), so that a cache with no
  recorded offloads loses only what the budget requires, oldest first.

Chosen examples are marked 'evicted' with ``set_example_status``: retrievers drop them through the
cache events, and the history keeps the rows (nothing is deleted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from echolm.history.example_stats_store import EvictionCandidate, ExampleStatsStore
from echolm.history.tables import utc_now
from echolm.policy.eviction import DECAY_PER_HOUR, EvictionItem, decayed_value, plan_eviction

log = logging.getLogger(__name__)


class StatusStore(Protocol):
    async def set_example_status(self, example_ids: Sequence[int], status: str) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class EvictionBudget:
    """Per-tenant limits; None means unlimited."""

    max_bytes: int | None = None
    max_examples: int | None = None
    decay_per_hour: float = DECAY_PER_HOUR
    protect_new: timedelta = timedelta(hours=1)

    @property
    def limited(self) -> bool:
        return self.max_bytes is not None or self.max_examples is not None


@dataclass
class TenantEviction:
    """One tenant's eviction decision (and, unless a dry run, what was marked)."""

    tenant: str
    examples: int
    bytes: int
    protected: int
    evict: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)
    evicted_bytes: int = 0
    kept_value: float = 0.0
    methods: list[str] = field(default_factory=list)

    @property
    def bytes_after(self) -> int:
        return self.bytes - self.evicted_bytes


# Tie-break added to every example's value: the knapsack never keeps a zero-value item, so without it
# a cache that has no offloads recorded yet (fresh, or imported history) would be emptied entirely by
# the first byte over budget. Far below one offload decayed over a few days (0.9 ** 100 h ~ 3e-5).
TIE_BREAK = 1e-6


def _items(candidates: Sequence[EvictionCandidate], size_of: Callable[[EvictionCandidate], int],
           values: dict[int, float], order: dict[int, float], epoch: float) -> list[EvictionItem]:
    # Values are decayed here, as of ``epoch``, so the tie-break itself does not decay.
    return [EvictionItem(c.example_id, size_of(c), values[c.example_id] + TIE_BREAK * order[c.example_id], epoch)
            for c in candidates]


def plan_tenant(candidates: Sequence[EvictionCandidate], budget: EvictionBudget, now: datetime,
                tenant: str = "") -> TenantEviction:
    """Which of one tenant's active examples to evict (module docstring): pure.

    Among examples of equal value the newer ones are kept (``TIE_BREAK``), and nothing is evicted
    while the budget holds.
    """
    decision = TenantEviction(tenant=tenant, examples=len(candidates), bytes=sum(c.size_bytes for c in candidates),
                              protected=0)
    protected = [c for c in candidates if now - c.created_at < budget.protect_new]
    remaining = [c for c in candidates if now - c.created_at >= budget.protect_new]
    decision.protected = len(protected)
    epoch = now.timestamp()
    values = {c.example_id: decayed_value(c.offload_value, c.value_at.timestamp(), epoch, budget.decay_per_hour)
              for c in candidates}
    by_age = sorted(candidates, key=lambda c: (c.created_at, c.example_id))
    order = {c.example_id: (rank + 1) / len(by_age) for rank, c in enumerate(by_age)}
    evict: set[int] = set()
    if budget.max_examples is not None:
        rows_left = max(0, budget.max_examples - len(protected))
        plan = plan_eviction(_items(remaining, lambda c: 1, values, order, epoch), rows_left, epoch,
                             decay_per_hour=budget.decay_per_hour)
        evict.update(plan.evict)
        decision.methods.append(f"rows:{plan.method}")
        remaining = [c for c in remaining if c.example_id not in evict]
    if budget.max_bytes is not None:
        bytes_left = max(0, budget.max_bytes - sum(c.size_bytes for c in protected))
        plan = plan_eviction(_items(remaining, lambda c: c.size_bytes, values, order, epoch), bytes_left, epoch,
                             decay_per_hour=budget.decay_per_hour)
        evict.update(plan.evict)
        decision.methods.append(f"bytes:{plan.method}")
    decision.evict = sorted(evict)
    decision.evicted_bytes = sum(c.size_bytes for c in candidates if c.example_id in evict)
    decision.kept_value = sum(v for i, v in values.items() if i not in evict)
    return decision


class EvictionService:
    """Runs ``plan_tenant`` for every tenant and marks the chosen examples evicted."""

    def __init__(self, history: StatusStore, stats: ExampleStatsStore, budget: EvictionBudget) -> None:
        self._history = history
        self._stats = stats
        self.budget = budget

    async def run(self, *, dry_run: bool = False, now: datetime | None = None) -> list[TenantEviction]:
        """One pass over all tenants; with ``dry_run`` nothing is marked."""
        if not self.budget.limited:
            return []
        now = now or utc_now()
        decisions = []
        for tenant in await self._stats.tenants():
            decision = plan_tenant(await self._stats.eviction_candidates(tenant), self.budget, now, tenant)
            if decision.evict and not dry_run:
                decision.evicted = await self._history.set_example_status(decision.evict, "evicted")
                log.info("tenant %s: evicted %d of %d examples (%d bytes); kept value %.3g", tenant,
                         len(decision.evicted), decision.examples, decision.evicted_bytes, decision.kept_value)
            decisions.append(decision)
        return decisions
