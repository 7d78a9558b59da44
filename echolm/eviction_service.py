"""Utility-aware eviction of cached examples, per tenant, under a byte and/or row budget.

For each tenant with active examples: the examples younger than ``protect_new_s`` are kept (they have
had no chance to enable an offload yet) and their bytes/rows are taken off the budget; the others go
into ``policy.eviction.plan_eviction``, a 0/1 knapsack that keeps the most value within the budget:

* weight = stored size: prompt + response + embedding bytes (``max_bytes``), or 1 per row
  (``max_examples``); with both budgets the row plan runs first and the byte plan on what it kept;
* value = successful offloads the example enabled, decayed x``decay_per_hour`` per hour.

Chosen examples are marked 'evicted' with ``set_example_status``: retrievers drop them through the
cache events, and the history keeps the rows (nothing is deleted).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from echolm.history.example_stats_store import EvictionCandidate, ExampleStatsStore
from echolm.history.tables import utc_now
from echolm.policy.eviction import DECAY_PER_HOUR, EvictionItem, plan_eviction

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


def plan_tenant(candidates: Sequence[EvictionCandidate], budget: EvictionBudget, now: datetime,
                tenant: str = "") -> TenantEviction:
    """Which of one tenant's active examples to evict (module docstring): pure."""
    total_bytes = sum(c.size_bytes for c in candidates)
    decision = TenantEviction(tenant=tenant, examples=len(candidates), bytes=total_bytes, protected=0)
    protected = [c for c in candidates if now - c.created_at < budget.protect_new]
    open_ = [c for c in candidates if now - c.created_at >= budget.protect_new]
    decision.protected = len(protected)
    epoch = now.timestamp()
    remaining = open_
    evict: set[int] = set()
    if budget.max_examples is not None:
        rows_left = max(0, budget.max_examples - len(protected))
        plan = plan_eviction([EvictionItem(c.example_id, 1, c.offload_value, c.value_at.timestamp()) for c in remaining],
                             rows_left, epoch, decay_per_hour=budget.decay_per_hour)
        evict.update(plan.evict)
        decision.methods.append(f"rows:{plan.method}")
        decision.kept_value = plan.kept_value
        remaining = [c for c in remaining if c.example_id not in evict]
    if budget.max_bytes is not None:
        bytes_left = max(0, budget.max_bytes - sum(c.size_bytes for c in protected))
        plan = plan_eviction([EvictionItem(c.example_id, c.size_bytes, c.offload_value, c.value_at.timestamp())
                              for c in remaining], bytes_left, epoch, decay_per_hour=budget.decay_per_hour)
        evict.update(plan.evict)
        decision.methods.append(f"bytes:{plan.method}")
        decision.kept_value = plan.kept_value
    decision.evict = sorted(evict)
    sizes = {c.example_id: c.size_bytes for c in candidates}
    decision.evicted_bytes = sum(sizes[i] for i in decision.evict)
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
