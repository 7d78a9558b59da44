"""The stages that manage the example cache after requests are served (paper: "ManageExamples").

* ``example-stats``: reads the responses topic (its own agent, so its own consumer group when run
  as its own worker) and records one usage per response served with examples, idempotent per request
  id; a timer settles recorded usages into G(e), uses and decayed successful offloads once feedback
  had ``replay.settle_after_s`` to arrive.
* ``replay``: a leader-only timer that runs one replay round every ``replay.interval_s`` when the
  replay tier is idle (``echolm.replay``). Idle means every load estimate is under
  ``replay.idle_threshold``: the generate workers' load reports on the load topic (backlog on the
  tier's generate topic + in flight, per unit of concurrency; ``echolm.routing.load``), the tier's
  busy fraction over the last ``replay.load_window_s`` from the history, and this process's own
  in-flight requests on the tier. The replay generates on the same ``Generator`` as this worker's
  generate stage when it runs one, so a live request waits at most for one replay sample.
* ``evict``: a leader-only timer that enforces ``eviction.max_bytes`` / ``eviction.max_examples`` per
  tenant (``echolm.eviction_service``).

Leader-only: with several workers running these stages, one replays and evicts at a time; the
history store's supersede/status transactions keep a second one harmless anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter

from echolm.eviction_service import EvictionBudget, EvictionService
from echolm.history.example_stats_store import (
    ExampleUsage,
    FeedbackQualityLookup,
    QualityLookup,
    SqlExampleStatsStore,
    no_feedback,
)
from echolm.history.store import SqlHistoryStore
from echolm.history.tables import utc_now
from echolm.replay import ReplayService, replay_service_from_settings, usage_policy_from_settings
from echolm.routing.load import KafkaLoadSource, LoadBoard
from echolm.settings import Settings
from streams.app import _Wiring, register_stage
from streams.records import ResponseRecord
from streams.stages import Outgoing

log = logging.getLogger(__name__)
T = TypeVar("T")

SETTLE_INTERVAL_S = 5.0
USAGE_MARKER_TTL = timedelta(days=7)  # redelivery happens within minutes; a week is ample

REPLAYS = Counter("echolm_replays_total", "Replay outcomes of cache entries", ["status"])
EVICTED = Counter("echolm_evicted_examples_total", "Examples evicted under the cache budget", ["tenant"])


def usage_from_response(response: ResponseRecord, largest_tier: str) -> ExampleUsage | None:
    """The usage a final response records: only answered requests that were served with examples."""
    if not response.ok or not response.examples or not response.tier:
        return None
    return ExampleUsage(request_id=response.request_id, tenant=response.tenant, tier=response.tier,
                        example_ids=tuple(e.id for e in response.examples),
                        offloaded=response.tier != largest_tier)


class ExampleStatsStage:
    """Records usages; database writes are retried (the batch is not acknowledged before)."""

    name = "example-stats"

    def __init__(self, settings: Settings, stats: SqlExampleStatsStore, quality_of: QualityLookup | None = None,
                 max_backoff_s: float = 10.0) -> None:
        self._settings = settings
        self._stats = stats
        self._quality_of = quality_of or no_feedback
        self._largest = settings.largest_tier.name
        self._max_backoff_s = max_backoff_s

    async def process(self, responses: Sequence[ResponseRecord]) -> list[Outgoing]:
        usages = [u for u in (usage_from_response(r, self._largest) for r in responses) if u is not None]
        if usages:
            await _with_retry("record example usages", lambda: self._stats.record_usages(usages), self._max_backoff_s)
        return []

    async def settle(self) -> None:
        report = await self._stats.settle_usages(
            usage_policy_from_settings(self._settings), self._quality_of,
            settle_after=timedelta(seconds=self._settings.replay.settle_after_s))
        if report.usages:
            log.info("example stats: settled %d usages of %d examples (%d successful offloads)",
                     report.usages, report.examples, report.offloads)


async def _with_retry(what: str, call: Callable[[], Awaitable[T]], max_backoff_s: float) -> T:
    delay = 0.2
    while True:
        try:
            return await call()
        except Exception as exc:  # the database is down: stall this partition, lose nothing
            log.warning("history unavailable (%s: %s); retrying %s in %.1fs", type(exc).__name__, exc, what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff_s)


class _Lazy:
    """Builds a stage's objects once, inside the running loop."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def get(self, key: str, build: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            if key not in self._built:
                self._built[key] = await build()
            return self._built[key]  # type: ignore[no-any-return]


async def _sql_history(w: _Wiring) -> SqlHistoryStore:
    history = await w.services.history()
    if not isinstance(history, SqlHistoryStore):
        raise TypeError(f"the replay stages need the SQL history store, got {type(history).__name__}")
    return history


@register_stage("example-stats")
def wire_example_stats(w: _Wiring) -> None:
    lazy = _Lazy()

    async def stage() -> ExampleStatsStage:
        async def build() -> ExampleStatsStage:
            history = await _sql_history(w)
            return ExampleStatsStage(w.settings, SqlExampleStatsStore(history), FeedbackQualityLookup(history))

        return await lazy.get("stage", build)

    async def handle(records: list[ResponseRecord]) -> list[Outgoing]:
        return await (await stage()).process(records)

    def decode(key: str | None, raw: bytes) -> ResponseRecord | None:
        try:
            return ResponseRecord.model_validate_json(raw)
        except Exception as exc:  # the log stage reports corrupt records; here they are only skipped
            log.debug("example-stats: skipping an undecodable response key=%s: %s", key, exc)
            return None

    w.agent(w.settings.topics.responses, "example-stats", decode, handle)

    @w.timer(SETTLE_INTERVAL_S)
    async def settle_example_usages() -> None:
        try:
            await (await stage()).settle()
        except Exception:
            log.exception("settling example usages failed; will retry")

    @w.timer(3600.0, on_leader=True)
    async def prune_example_usage_markers() -> None:
        try:
            stats = (await stage())._stats  # noqa: SLF001
            await stats.prune_usages(utc_now() - USAGE_MARKER_TTL)
        except Exception:
            log.exception("pruning example usage markers failed; will retry")


def _reported_load(board: LoadBoard, tier: str) -> Callable[[], Awaitable[float]]:
    """The tier's load from the generate workers' reports (``echolm.routing.load``): its EMA, or the
    fresh sample if higher; 0 while no fresh report exists (no generate worker, or none publishing)."""
    async def probe() -> float:
        sample = board.sample(tier, time.time())
        return 0.0 if sample is None else max(sample, board.loads().get(tier, 0.0))

    return probe


def _in_flight_of(tier: str) -> Callable[[], float]:
    """Requests this process is generating on ``tier`` (the generate stage's gauge; 0 elsewhere)."""
    def read() -> float:
        return REGISTRY.get_sample_value("echolm_tier_in_flight", {"tier": tier}) or 0.0

    return read


@register_stage("replay")
def wire_replay(w: _Wiring) -> None:
    config = w.settings.replay
    if not config.enabled:
        log.info("replay stage: disabled (ECHOLM_REPLAY__ENABLED=false)")
        return
    tier = w.settings.tier(config.tier) if config.tier else w.settings.largest_tier
    lazy = _Lazy()

    async def service() -> ReplayService:
        async def build() -> ReplayService:
            judge = await w.services.generator(config.judge_tier) if config.judge_tier else None
            board = LoadBoard(config.load_half_life_s, w.settings.bandit.load_stale_after_s)
            source = KafkaLoadSource(w.settings.kafka_bootstrap or "", w.settings.topics.load, board,
                                     client_id=f"{w.settings.kafka_client_id}-replay-load")
            source.start()
            return replay_service_from_settings(w.settings, await _sql_history(w),
                                                await w.services.generator(tier.name), judge_generator=judge,
                                                in_flight=_in_flight_of,
                                                live_load=lambda name: _reported_load(board, name))

        return await lazy.get("service", build)

    @w.timer(config.interval_s, on_leader=True)
    async def replay_round() -> None:
        try:
            report = await (await service()).run_round()
        except Exception:
            log.exception("replay round failed; next round in %.0fs", config.interval_s)
            return
        for outcome in report.outcomes:
            REPLAYS.labels(outcome.status).inc()
        if report.outcomes:
            log.info("replay round at load %.2f: %s", report.load,
                     ", ".join(f"{o.example_id}:{o.status}" for o in report.outcomes))


@register_stage("evict")
def wire_evict(w: _Wiring) -> None:
    settings = w.settings.eviction
    budget = EvictionBudget(max_bytes=settings.max_bytes, max_examples=settings.max_examples,
                            decay_per_hour=settings.decay_per_hour, protect_new=timedelta(seconds=settings.protect_new_s))
    if not budget.limited:
        log.info("evict stage: no budget set (ECHOLM_EVICTION__MAX_BYTES / __MAX_EXAMPLES); nothing to do")
        return

    @w.timer(settings.interval_s, on_leader=True)
    async def evict_over_budget() -> None:
        try:
            history = await _sql_history(w)
            decisions = await EvictionService(history, SqlExampleStatsStore(history), budget).run()
        except Exception:
            log.exception("eviction pass failed; next pass in %.0fs", settings.interval_s)
            return
        for decision in decisions:
            if decision.evicted:
                EVICTED.labels(decision.tenant).inc(len(decision.evicted))
