"""Example usage statistics: what the replay agent and eviction decide on (tables of migration 0003).

Flow: a stage records one ``ExampleUsage`` per logged response that was served with cached examples
(``record_usages``, idempotent per request id: the row is the processed marker, so redelivery does
not double count). Later, ``settle_usages`` folds each recorded usage into the per-example statistics
exactly once, in one transaction that claims the usage rows:

* ``G(e)``, the potential gain: ``policy.replay.GainTracker`` semantics, one sample per use of
  ``(1 - quality) x normalised cost of the tier that served``;
* uses (since the last replay) and ``examples.uses`` (lifetime uses of that version);
* successful offloads, decayed x0.9 per hour (``policy.eviction.add_offloads``): a use counts as one
  when the response was offloaded (served by a cheaper tier than the costliest) and its quality is
  not below ``bad_quality_below``.

Quality comes from a ``QualityLookup`` (feedback or judge verdicts by request id); a request with
none gets ``default_quality`` (neutral, 0.5). Settling waits ``settle_after`` so that feedback for a
request has time to arrive before its use counts.

The pure part (``fold_usages``) is shared with the in-memory double in ``echolm.testing``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from echolm.history.store import SqlHistoryStore
from echolm.history.tables import ExampleRow, ExampleStatsRow, ExampleUsageRow, utc_now
from echolm.policy.eviction import DECAY_PER_HOUR, add_offloads, decayed_value
from echolm.policy.replay import ExampleGain, GainTracker

# Usages folded per transaction: bounds how long the SQLite write lock is held.
SETTLE_BATCH = 500
_IN_CHUNK = 500

QualityLookup = Callable[[Sequence["ExampleUsage"]], Awaitable[Mapping[str, float]]]
"""usages -> {request id: normalised quality in [0, 1]} for those with feedback or a judge verdict."""


async def no_feedback(usages: Sequence[ExampleUsage]) -> Mapping[str, float]:
    """The quality lookup without a feedback source: every use gets the default quality."""
    return {}


@dataclass(frozen=True, slots=True)
class ExampleUsage:
    """One response served with cached examples (only successful responses are recorded)."""

    request_id: str
    tenant: str
    tier: str
    example_ids: tuple[int, ...]
    offloaded: bool


@dataclass(frozen=True, slots=True)
class ExampleStats:
    """The statistics of one example version; ``offload_value`` is as of ``offload_updated_at``."""

    example_id: int
    tenant: str
    uses: int = 0
    gain: float = 0.0
    offload_value: float = 0.0
    offload_updated_at: datetime | None = None
    replay_rounds: int = 0
    last_replayed_at: datetime | None = None
    last_replay_score: float | None = None

    def as_gain(self) -> ExampleGain:
        return ExampleGain(self.example_id, self.gain, float(self.uses), self.replay_rounds)


@dataclass(frozen=True, slots=True)
class UsagePolicy:
    """How uses turn into statistics. ``tier_costs``: each tier's cost normalised to (0, 1] (the
    costliest tier is 1); an unknown tier counts as 1."""

    tier_costs: Mapping[str, float]
    smoothing: float = 0.2
    default_quality: float = 0.5
    bad_quality_below: float = 0.45
    decay_per_hour: float = DECAY_PER_HOUR

    def cost(self, tier: str) -> float:
        return float(self.tier_costs.get(tier, 1.0))


@dataclass(frozen=True, slots=True)
class SettleReport:
    usages: int = 0
    examples: int = 0
    offloads: int = 0

    def __add__(self, other: SettleReport) -> SettleReport:
        return SettleReport(self.usages + other.usages, self.examples + other.examples,
                            self.offloads + other.offloads)


@dataclass(frozen=True, slots=True)
class EvictionCandidate:
    """An active example as eviction sees it: stored bytes and its offload value as of ``value_at``."""

    example_id: int
    size_bytes: int
    offload_value: float
    value_at: datetime
    created_at: datetime


class ExampleStatsStore(Protocol):
    """What the replay and eviction services need from the statistics (SQL or in memory)."""

    async def record_usages(self, usages: Sequence[ExampleUsage]) -> int: ...

    async def settle_usages(self, policy: UsagePolicy, quality_of: QualityLookup, *,
                            settle_after: timedelta, now: datetime | None = None) -> SettleReport: ...

    async def gain_candidates(self, limit: int = 1000) -> list[ExampleStats]: ...

    async def stats_for(self, example_ids: Sequence[int]) -> dict[int, ExampleStats]: ...

    async def mark_replayed(self, example_id: int, new_example_id: int | None, *, score: float | None,
                            decay_per_hour: float = DECAY_PER_HOUR, now: datetime | None = None) -> None: ...

    async def eviction_candidates(self, tenant: str) -> list[EvictionCandidate]: ...

    async def tenants(self) -> list[str]: ...


def fold_usages(usages: Sequence[tuple[ExampleUsage, float | None]], current: Mapping[int, ExampleStats],
                tenants: Mapping[int, str], policy: UsagePolicy, now: datetime) -> dict[int, ExampleStats]:
    """The statistics after ``usages`` (each with its quality, None = no feedback): pure.

    ``current`` holds the existing statistics of the examples involved, ``tenants`` the tenant of
    every example that exists (uses of unknown examples are ignored). Returns the changed rows.
    """
    tracker = GainTracker(smoothing=policy.smoothing,
                          gains={i: s.as_gain() for i, s in current.items()})
    changed: dict[int, ExampleStats] = {}
    epoch_now = now.timestamp()
    for usage, quality in usages:
        q = policy.default_quality if quality is None else quality
        success = usage.offloaded and q >= policy.bad_quality_below
        for example_id in dict.fromkeys(usage.example_ids):  # one use per request, however often listed
            if example_id not in tenants:
                continue
            stats = changed.get(example_id) or current.get(example_id) or ExampleStats(example_id, tenants[example_id])
            gain = tracker.observe_use(example_id, q, policy.cost(usage.tier))
            value, value_at = stats.offload_value, stats.offload_updated_at
            if success:
                since = value_at.timestamp() if value_at else epoch_now
                value, value_at = add_offloads(value, since, epoch_now, 1.0, policy.decay_per_hour), now
            changed[example_id] = replace(stats, uses=int(gain.uses), gain=gain.gain, offload_value=value,
                                          offload_updated_at=value_at)
    return changed


def replayed_stats(old: ExampleStats, new_example_id: int | None, *, score: float | None,
                   decay_per_hour: float, now: datetime) -> ExampleStats:
    """The statistics after a replay round of ``old``: pure.

    The gain must be learned anew (``GainTracker.on_replayed``). A new version (``new_example_id``)
    inherits the entry's offload value, decayed to now, since the value belongs to the cache entry;
    without one (the replay kept the current answer) the same row counts the round.
    """
    tracker = GainTracker(gains={old.example_id: old.as_gain()})
    after = tracker.on_replayed(old.example_id)
    value, value_at = old.offload_value, old.offload_updated_at
    if new_example_id is not None and value_at is not None:
        value, value_at = decayed_value(value, value_at.timestamp(), now.timestamp(), decay_per_hour), now
    return replace(old, example_id=new_example_id if new_example_id is not None else old.example_id,
                   uses=int(after.uses), gain=after.gain, replay_rounds=after.replay_rounds,
                   offload_value=value, offload_updated_at=value_at, last_replayed_at=now,
                   last_replay_score=score)


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _usage_from_row(row: Any) -> ExampleUsage:
    return ExampleUsage(row.request_id, row.tenant, row.tier, tuple(int(i) for i in row.example_ids),
                        bool(row.offloaded))


def _stats_from_row(row: Any) -> ExampleStats:
    return ExampleStats(example_id=int(row.example_id), tenant=row.tenant, uses=int(row.uses), gain=float(row.gain),
                        offload_value=float(row.offload_value), offload_updated_at=row.offload_updated_at,
                        replay_rounds=int(row.replay_rounds), last_replayed_at=row.last_replayed_at,
                        last_replay_score=row.last_replay_score)


def _stats_values(stats: ExampleStats, now: datetime) -> dict[str, Any]:
    return {"example_id": stats.example_id, "tenant": stats.tenant, "uses": stats.uses, "gain": stats.gain,
            "offload_value": stats.offload_value, "offload_updated_at": stats.offload_updated_at,
            "replay_rounds": stats.replay_rounds, "last_replayed_at": stats.last_replayed_at,
            "last_replay_score": stats.last_replay_score, "updated_at": now}


class SqlExampleStatsStore:
    """``ExampleStatsStore`` on the history database (PostgreSQL or SQLite), sharing the
    ``SqlHistoryStore``'s engine, so it obeys the same write-lock discipline and event loop."""

    def __init__(self, history: SqlHistoryStore) -> None:
        self._history = history

    # ---------------------------------------------------------------- usages

    async def record_usages(self, usages: Sequence[ExampleUsage]) -> int:
        """Insert usages not yet recorded (by request id); returns how many were new."""
        latest = {u.request_id: u for u in usages if u.example_ids}
        if not latest:
            return 0
        now = utc_now()
        values = [{"request_id": u.request_id, "tenant": u.tenant, "tier": u.tier,
                   "example_ids": [int(i) for i in u.example_ids], "offloaded": bool(u.offloaded),
                   "quality": None, "recorded_at": now, "settled_at": None}
                  for _, u in sorted(latest.items())]
        inserted = 0
        async with self._history._write() as connection:  # noqa: SLF001 - same package, shared engine
            for chunk in _chunks(values):
                statement = (self._history._insert(ExampleUsageRow).values(list(chunk))  # noqa: SLF001
                             .on_conflict_do_nothing(index_elements=["request_id"])
                             .returning(ExampleUsageRow.request_id))
                inserted += len((await connection.execute(statement)).all())
        return inserted

    async def settle_usages(self, policy: UsagePolicy, quality_of: QualityLookup, *,
                            settle_after: timedelta, now: datetime | None = None,
                            max_batches: int = 100) -> SettleReport:
        """Fold recorded usages older than ``settle_after`` into the statistics, each exactly once."""
        report = SettleReport()
        for _ in range(max_batches):
            batch = await self._settle_batch(policy, quality_of, settle_after, now or utc_now())
            report += batch
            if batch.usages < SETTLE_BATCH:
                break
        return report

    async def _settle_batch(self, policy: UsagePolicy, quality_of: QualityLookup, settle_after: timedelta,
                            now: datetime) -> SettleReport:
        cutoff = now - settle_after
        async with self._history._read() as connection:  # noqa: SLF001
            rows = (await connection.execute(
                select(ExampleUsageRow.request_id, ExampleUsageRow.tenant, ExampleUsageRow.tier,
                       ExampleUsageRow.example_ids, ExampleUsageRow.offloaded)
                .where(ExampleUsageRow.settled_at.is_(None), ExampleUsageRow.recorded_at <= cutoff)
                .order_by(ExampleUsageRow.recorded_at, ExampleUsageRow.request_id).limit(SETTLE_BATCH))).all()
        if not rows:
            return SettleReport()
        request_ids = [r.request_id for r in rows]
        # Read outside the write transaction: the SQLite write lock is held only for the folding.
        qualities = dict(await quality_of([_usage_from_row(r) for r in rows]))
        async with self._history._write() as connection:  # noqa: SLF001
            # Claiming the rows (settled_at IS NULL -> now) in the folding transaction makes each usage
            # count once, even with several settlers running.
            claimed = (await connection.execute(
                update(ExampleUsageRow)
                .where(ExampleUsageRow.request_id.in_(request_ids), ExampleUsageRow.settled_at.is_(None))
                .values(settled_at=now)
                .returning(ExampleUsageRow.request_id, ExampleUsageRow.tenant, ExampleUsageRow.tier,
                           ExampleUsageRow.example_ids, ExampleUsageRow.offloaded))).all()
            usages = sorted((_usage_from_row(r) for r in claimed), key=lambda u: u.request_id)
            for usage in usages:
                if usage.request_id in qualities:
                    await connection.execute(update(ExampleUsageRow)
                                             .where(ExampleUsageRow.request_id == usage.request_id)
                                             .values(quality=float(qualities[usage.request_id])))
            example_ids = sorted({i for u in usages for i in u.example_ids})
            tenants = await self._tenants_of(connection, example_ids, lock=True)
            current = await self._stats(connection, list(tenants))
            changed = fold_usages([(u, qualities.get(u.request_id)) for u in usages], current, tenants,
                                  policy, now)
            await self._upsert(connection, list(changed.values()), now)
            uses: dict[int, int] = {}
            for usage in usages:
                for example_id in set(usage.example_ids) & tenants.keys():
                    uses[example_id] = uses.get(example_id, 0) + 1
            for example_id, count in sorted(uses.items()):
                await connection.execute(update(ExampleRow).where(ExampleRow.id == example_id)
                                         .values(uses=ExampleRow.uses + count))
        offloads = sum(1 for u in usages if u.offloaded
                       and qualities.get(u.request_id, policy.default_quality) >= policy.bad_quality_below)
        return SettleReport(len(usages), len(changed), offloads)

    async def pending_usages(self) -> int:
        """Recorded usages not settled yet."""
        async with self._history._read() as connection:  # noqa: SLF001
            return int((await connection.execute(select(func.count()).select_from(ExampleUsageRow)
                                                 .where(ExampleUsageRow.settled_at.is_(None)))).scalar_one())

    async def prune_usages(self, settled_before: datetime) -> int:
        """Delete settled usage markers older than ``settled_before`` (redelivery is long over by then)."""
        async with self._history._write() as connection:  # noqa: SLF001
            result = await connection.execute(delete(ExampleUsageRow).where(
                ExampleUsageRow.settled_at.is_not(None), ExampleUsageRow.settled_at < settled_before))
            return int(result.rowcount or 0)

    # ---------------------------------------------------------------- statistics

    async def _tenants_of(self, connection: AsyncConnection, example_ids: Sequence[int], *,
                          lock: bool = False) -> dict[int, str]:
        """Tenant of each existing example. ``lock``: row-lock the examples (in id order, so concurrent
        writers cannot deadlock) to serialise read-modify-write of their statistics on PostgreSQL,
        where a stats row that does not exist yet cannot be locked itself."""
        found: dict[int, str] = {}
        for chunk in _chunks(sorted(example_ids)):
            query = select(ExampleRow.id, ExampleRow.tenant).where(ExampleRow.id.in_(chunk))
            if lock:
                query = query.order_by(ExampleRow.id).with_for_update()
            found.update({int(r.id): r.tenant for r in await connection.execute(query)})
        return found

    async def _stats(self, connection: AsyncConnection, example_ids: Sequence[int]) -> dict[int, ExampleStats]:
        found: dict[int, ExampleStats] = {}
        for chunk in _chunks(sorted(example_ids)):
            result = await connection.execute(
                select(ExampleStatsRow.__table__).where(ExampleStatsRow.example_id.in_(chunk)))
            found.update({int(row.example_id): _stats_from_row(row) for row in result})
        return found

    async def _upsert(self, connection: AsyncConnection, rows: Sequence[ExampleStats], now: datetime) -> None:
        if not rows:
            return
        values = [_stats_values(s, now) for s in sorted(rows, key=lambda s: s.example_id)]
        statement = self._history._insert(ExampleStatsRow)  # noqa: SLF001
        statement = statement.on_conflict_do_update(
            index_elements=[ExampleStatsRow.example_id],
            set_={key: statement.excluded[key] for key in values[0] if key != "example_id"})
        await connection.execute(statement, values)

    async def stats_for(self, example_ids: Sequence[int]) -> dict[int, ExampleStats]:
        """Statistics of these examples; examples never used are left out."""
        async with self._history._read() as connection:  # noqa: SLF001
            return await self._stats(connection, list(example_ids))

    async def gain_candidates(self, limit: int = 1000) -> list[ExampleStats]:
        """Active examples used since their last replay, highest G first (the replay planner's input)."""
        query = (select(ExampleStatsRow.__table__)
                 .join(ExampleRow, ExampleRow.id == ExampleStatsRow.example_id)
                 .where(ExampleRow.status == "active", ExampleStatsRow.uses > 0)
                 .order_by(ExampleStatsRow.gain.desc(), ExampleStatsRow.uses.desc(), ExampleStatsRow.example_id)
                 .limit(limit))
        async with self._history._read() as connection:  # noqa: SLF001
            return [_stats_from_row(row) for row in await connection.execute(query)]

    async def mark_replayed(self, example_id: int, new_example_id: int | None, *, score: float | None,
                            decay_per_hour: float = DECAY_PER_HOUR, now: datetime | None = None) -> None:
        """Count a replay round of ``example_id`` (see ``replayed_stats``); ``new_example_id`` is the
        version the replay wrote, None if it kept the current answer."""
        now = now or utc_now()
        async with self._history._write() as connection:  # noqa: SLF001
            tenants = await self._tenants_of(connection, [example_id], lock=True)
            if example_id not in tenants:
                raise KeyError(f"no example with id {example_id}")
            current = await self._stats(connection, [example_id])
            old = current.get(example_id, ExampleStats(example_id, tenants[example_id]))
            await self._upsert(connection, [replayed_stats(old, new_example_id, score=score,
                                                           decay_per_hour=decay_per_hour, now=now)], now)

    # ---------------------------------------------------------------- eviction

    def _byte_length(self, column: Any) -> ColumnElement[Any]:
        # Stored size in bytes: PostgreSQL's octet_length; SQLite's length() counts characters of
        # text, so the text is cast to a blob first.
        if self._history._dialect == "postgresql":  # noqa: SLF001
            return func.octet_length(column)
        from sqlalchemy import LargeBinary, cast

        return func.length(cast(column, LargeBinary))

    async def eviction_candidates(self, tenant: str) -> list[EvictionCandidate]:
        """Every active example of ``tenant`` with its stored size and offload value."""
        size = (self._byte_length(ExampleRow.prompt) + self._byte_length(ExampleRow.response)
                + self._byte_length(ExampleRow.embedding))
        query = (select(ExampleRow.id, ExampleRow.created_at, size.label("size"), ExampleStatsRow.offload_value,
                        ExampleStatsRow.offload_updated_at)
                 .outerjoin(ExampleStatsRow, ExampleStatsRow.example_id == ExampleRow.id)
                 .where(and_(ExampleRow.tenant == tenant, ExampleRow.status == "active"))
                 .order_by(ExampleRow.id))
        async with self._history._read() as connection:  # noqa: SLF001
            rows = (await connection.execute(query)).all()
        return [EvictionCandidate(example_id=int(r.id), size_bytes=int(r.size or 0),
                                  offload_value=float(r.offload_value or 0.0),
                                  value_at=r.offload_updated_at or r.created_at, created_at=r.created_at)
                for r in rows]

    async def tenants(self) -> list[str]:
        """Tenants that have active examples."""
        async with self._history._read() as connection:  # noqa: SLF001
            result = await connection.execute(select(ExampleRow.tenant).where(ExampleRow.status == "active")
                                              .distinct().order_by(ExampleRow.tenant))
            return list(result.scalars())


async def usages_from_history(history: SqlHistoryStore, largest_tier: str, *, after: str = "",
                              page: int = 1000) -> tuple[list[ExampleUsage], str]:
    """One page of usages reconstructed from logged responses (``replay --from-history``), by request id
    order after ``after``; returns the usages and the cursor for the next page ("" when done)."""
    from echolm.history.tables import ResponseRow

    query = (select(ResponseRow.request_id, ResponseRow.tenant, ResponseRow.tier, ResponseRow.example_ids,
                    ResponseRow.error_code, ResponseRow.response)
             .where(ResponseRow.request_id > after).order_by(ResponseRow.request_id).limit(page))
    async with history._read() as connection:  # noqa: SLF001
        rows = (await connection.execute(query)).all()
    usages = [ExampleUsage(r.request_id, r.tenant, r.tier, tuple(int(i) for i in r.example_ids),
                           offloaded=r.tier != largest_tier)
              for r in rows if r.example_ids and r.error_code is None and r.response is not None and r.tier]
    return usages, (rows[-1].request_id if len(rows) == page else "")


async def tier_busy_seconds(history: SqlHistoryStore, tier: str, since: datetime) -> float:
    """Seconds ``tier`` spent generating after ``since``, from the responses logged since then: each
    answered or failed request's ``generate`` timing, clipped to the part inside the window."""
    from echolm.history.tables import ResponseRow

    query = select(ResponseRow.timings, ResponseRow.finished_at).where(
        ResponseRow.tier == tier, ResponseRow.finished_at >= since)
    async with history._read() as connection:  # noqa: SLF001
        rows = (await connection.execute(query)).all()
    return float(sum(min(float((row.timings or {}).get("generate", 0.0)),
                         (row.finished_at - since).total_seconds()) for row in rows))


class FeedbackQualityLookup:
    """The quality of served responses from the ``feedback`` table (migration 0002): the mean of the
    normalised qualities of the feedback rows about the response (``request_id`` on the tier that served
    it, or no tier given), counting the other side of a pairwise row as ``1 - quality``."""

    def __init__(self, history: SqlHistoryStore) -> None:
        self._history = history

    async def __call__(self, usages: Sequence[ExampleUsage]) -> Mapping[str, float]:
        from sqlalchemy import or_

        from echolm.history.tables import FeedbackRow

        tiers = {u.request_id: u.tier for u in usages}
        found: dict[str, list[float]] = {}
        async with self._history._read() as connection:  # noqa: SLF001
            for chunk in _chunks(sorted(tiers)):
                result = await connection.execute(
                    select(FeedbackRow.request_id, FeedbackRow.tier, FeedbackRow.other_request_id,
                           FeedbackRow.other_tier, FeedbackRow.quality)
                    .where(or_(FeedbackRow.request_id.in_(chunk), FeedbackRow.other_request_id.in_(chunk))))
                for row in result:
                    if row.request_id in tiers and row.tier in (None, tiers[row.request_id]):
                        found.setdefault(row.request_id, []).append(float(row.quality))
                    if row.other_request_id in tiers and row.other_tier in (None, tiers[row.other_request_id]):
                        found.setdefault(row.other_request_id, []).append(1.0 - float(row.quality))
        return {request_id: sum(values) / len(values) for request_id, values in found.items()}
