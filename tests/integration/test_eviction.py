"""Eviction on the real history store (SQLite and PostgreSQL) and the example cache it feeds, and
``echolm evict``: over budget, the knapsack's choice is marked 'evicted', retrievers stop returning
those examples, and the history keeps the rows."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from echolm.eviction_service import EvictionBudget, EvictionService
from echolm.history.example_stats_store import ExampleUsage, SqlExampleStatsStore, UsagePolicy, no_feedback
from echolm.history.migrate import upgrade
from echolm.history.store import SqlHistoryStore
from echolm.history.tables import ExampleRow
from echolm.protocols import ExampleCandidate
from echolm.retrieval.example_cache import ExampleCache

pytestmark = pytest.mark.integration

POLICY = UsagePolicy(tier_costs={"small": 1 / 3, "large": 1.0})
DIMENSION = 8


def unit_vector(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIMENSION).astype(np.float32)
    return vector / np.linalg.norm(vector)


def candidate(index: int, response: str, tenant: str = "acme") -> ExampleCandidate:
    return ExampleCandidate(tenant=tenant, source_request_id=f"src-{index}", prompt=f"prompt ünïcode {index}",
                            response=response, model="m", tier="large", embedding=unit_vector(index))


async def offloads(stats: SqlExampleStatsStore, example_id: int, count: int, run: str) -> None:
    await stats.record_usages([ExampleUsage(f"{run}-{example_id}-{n}", "acme", "small", (example_id,), True)
                               for n in range(count)])
    await stats.settle_usages(POLICY, no_feedback, settle_after=timedelta(0))


async def test_over_budget_the_least_useful_examples_leave_the_index_but_stay_in_history(
        history: SqlHistoryStore) -> None:
    run = uuid.uuid4().hex[:8]
    responses = ["é" * 50, "b" * 400, "c" * 100, "d" * 300, "e" * 50]
    ids = await history.admit_examples([candidate(i, r) for i, r in enumerate(responses)]
                                       + [candidate(9, "other tenant", tenant="globex")])
    stats = SqlExampleStatsStore(history)
    for example_id, count in zip(ids[:5], [4, 1, 3, 0, 2], strict=True):
        if count:
            await offloads(stats, example_id, count, run)

    # Stored size = prompt + response bytes (UTF-8) + the float32 embedding, computed by the database.
    found = {c.example_id: c for c in await stats.eviction_candidates("acme")}
    expected = {example_id: len(f"prompt ünïcode {i}".encode()) + len(responses[i].encode()) + 4 * DIMENSION
                for i, example_id in enumerate(ids[:5])}
    assert {i: c.size_bytes for i, c in found.items()} == expected
    assert await stats.tenants() == ["acme", "globex"]

    cache = ExampleCache(DIMENSION)
    await cache.sync_from(history)
    assert cache.size("acme") == 5

    total = sum(expected.values())
    budget = EvictionBudget(max_bytes=total - 400, max_examples=4, protect_new=timedelta(0))
    service = EvictionService(history, stats, budget)
    planned = await service.run(dry_run=True)
    assert await history.count_examples("acme") == 5  # a dry run marks nothing

    decisions = {d.tenant: d for d in await service.run()}
    acme = decisions["acme"]
    # Row budget first: the example with no offloads goes (ids[3], 350 bytes); the rest is still 50 bytes
    # over the byte budget, met best by dropping the 1-offload, 450-byte one (ids[1]): the smallest
    # example (ids[4], 2 offloads) would do too, but keeps less value.
    assert acme.evict == acme.evicted == sorted([ids[3], ids[1]]) == planned[0].evict
    assert acme.bytes_after <= budget.max_bytes
    assert decisions["globex"].evicted == []
    assert await history.count_examples("acme") == 3

    events = await history.cache_events_since(cache.last_seq)
    assert sorted((e.op, e.example.id) for e in events) == sorted([("remove", ids[1]), ("remove", ids[3])])
    await cache.sync_from(history)
    assert cache.size("acme") == 3
    for evicted in (ids[1], ids[3]):
        hits = cache.search("acme", unit_vector(ids.index(evicted))[None, :], 5)[0]
        assert evicted not in [h.example.id for h in hits]

    async with history._read() as connection:  # noqa: SLF001
        statuses = dict((await connection.execute(
            select(ExampleRow.status, func.count()).where(ExampleRow.tenant == "acme").group_by(ExampleRow.status))).all())
    assert statuses == {"active": 3, "evicted": 2}  # marked, not deleted

    assert [d.evict for d in await service.run()] == [[], []]  # within budget now: nothing more to do


def test_cli_evict_dry_run_then_for_real(tmp_path: Path) -> None:
    from echolm.cli import app

    url = f"sqlite+aiosqlite:///{tmp_path / 'echolm.db'}"

    async def seed() -> list[int]:
        await upgrade(url)
        history = SqlHistoryStore(url)
        try:
            return await history.admit_examples([candidate(i, "x" * 100) for i in range(4)])
        finally:
            await history.aclose()

    ids = asyncio.run(seed())
    env = {"ECHOLM_DATABASE_URL": url, "ECHOLM_DATA_DIR": str(tmp_path), "ECHOLM_LOG_LEVEL": "WARNING"}
    runner = CliRunner()

    refused = runner.invoke(app, ["evict"], env=env)
    assert refused.exit_code != 0 and "no budget" in refused.output

    dry = runner.invoke(app, ["evict", "--dry-run", "--max-examples", "3", "--protect-new-s", "0"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "tenant acme: 4 examples" in dry.output and "would evict 1" in dry.output

    # Young examples are protected by default (1 hour): nothing goes.
    protected = runner.invoke(app, ["evict", "--max-examples", "3"], env=env)
    assert protected.exit_code == 0 and "4 protected; evicted 0" in protected.output

    real = runner.invoke(app, ["evict", "--max-examples", "3", "--protect-new-s", "0"], env=env)
    assert real.exit_code == 0 and "evicted 1" in real.output

    async def active() -> list[int]:
        history = SqlHistoryStore(url)
        try:
            async with history._read() as connection:  # noqa: SLF001
                rows = await connection.execute(select(ExampleRow.id).where(ExampleRow.status == "active")
                                                .order_by(ExampleRow.id))
                return [int(r.id) for r in rows]
        finally:
            await history.aclose()

    assert asyncio.run(active()) == ids[1:]  # all equally (un)used: the oldest went
