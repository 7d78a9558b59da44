"""Per-tier load for the load-aware router: measured by the generate workers, smoothed by the router.

Each generate worker publishes a ``LoadReport`` per tier it serves every ``bandit.load_report_interval_s``
on the ``<prefix>.load`` topic: its backlog on the tier's generate topic (for each partition assigned
to it, the high watermark minus the group's committed position, less what it is generating now), the
requests it is generating now, and its capacity (the tier's concurrency).

Why a topic rather than a heartbeat table: load is only meaningful for seconds, so it needs no
durability, and a topic costs no database writes (the embedded SQLite database has one writer,
which the log stage needs); every route worker reads every partition without a consumer group, so
each sees every report with sub-second delay, however many route and generate workers run.

``LoadBoard`` (pure) keeps each worker's latest report, sums fresh ones per tier into one sample,
``(sum queue + sum in-flight) / sum capacity`` (``policy.load_bias.normalised_load``), and feeds it
to a ``LoadTracker`` EMA. A tier whose reports stop keeps its last load (no news is not idleness).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from echolm.policy.load_bias import LoadTracker, normalised_load

log = logging.getLogger(__name__)


class LoadReport(BaseModel):
    """One generate worker's load on one tier, as published on the load topic."""

    v: int = 1
    tier: str
    worker: str
    queue: float = Field(ge=0, description="requests waiting in this worker's partitions of the tier's topic")
    in_flight: float = Field(ge=0, description="requests this worker is generating now")
    capacity: float = Field(gt=0, description="requests this worker generates at once (the tier's concurrency)")
    at: float = Field(default_factory=time.time, description="wall-clock time of the measurement")


def partition_backlog(highwaters: Mapping[object, int | None], positions: Mapping[object, int | None],
                      in_flight: int) -> int:
    """Waiting requests: sum over partitions of (high watermark - committed position), minus those
    being generated (they are not committed yet, so the difference counts them too). Partitions with
    an unknown watermark or position count 0."""
    lag = 0
    for tp, highwater in highwaters.items():
        position = positions.get(tp)
        if highwater is not None and position is not None:
            lag += max(0, int(highwater) - int(position))
    return max(0, lag - max(0, in_flight))


@dataclass
class LoadBoard:
    """Latest report per (tier, worker) -> per-tier samples -> an EMA per tier."""

    half_life_s: float = 5.0
    stale_after_s: float = 5.0
    tracker: LoadTracker = field(init=False)
    _reports: dict[tuple[str, str], LoadReport] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tracker = LoadTracker(self.half_life_s)

    def observe(self, report: LoadReport, now: float | None = None) -> float:
        """Fold in one report (received at wall time ``now``); returns the tier's new EMA."""
        now = time.time() if now is None else now
        key = (report.tier, report.worker)
        previous = self._reports.get(key)
        if previous is None or report.at >= previous.at:
            self._reports[key] = report
        sample = self.sample(report.tier, now)
        if sample is None:
            return self.tracker.load(report.tier)
        return self.tracker.update(report.tier, sample, now)

    def sample(self, tier: str, now: float) -> float | None:
        """The tier's current load from its workers' fresh reports; None if none is fresh."""
        fresh = [r for (t, _), r in self._reports.items() if t == tier and now - r.at <= self.stale_after_s]
        if not fresh:
            return None
        return normalised_load(sum(r.queue for r in fresh), sum(r.in_flight for r in fresh),
                               sum(r.capacity for r in fresh))

    def loads(self) -> dict[str, float]:
        return self.tracker.snapshot()


class KafkaLoadSource:
    """Follows the load topic (every partition, no consumer group, from its end) into a ``LoadBoard``."""

    def __init__(self, bootstrap: str, topic: str, board: LoadBoard, *, client_id: str = "echolm-load") -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self.board = board
        self._client_id = client_id
        self._task: asyncio.Task[None] | None = None
        self.reports_seen = 0

    def loads(self) -> dict[str, float]:
        return self.board.loads()

    def start(self) -> None:
        """Start following in the running loop (idempotent; a failure is retried in the background)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow_forever(), name="echolm-load-source")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _follow_forever(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("load topic %s unavailable (%s: %s); retrying in %.0fs", self._topic,
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _follow(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, client_id=self._client_id, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="latest", fetch_max_wait_ms=200,
                                    request_timeout_ms=10_000)
        await asyncio.wait_for(consumer.start(), 15)
        try:
            partitions = None
            for _ in range(50):
                partitions = consumer.partitions_for_topic(self._topic)
                if partitions:
                    break
                await asyncio.sleep(0.2)
                await consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh in aiokafka
            if not partitions:
                raise RuntimeError(f"topic {self._topic} does not exist (run `echolm topics create`)")
            assigned = [TopicPartition(self._topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            await asyncio.wait_for(consumer.seek_to_end(*assigned), 15)
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=1000)
                for messages in batches.values():
                    for message in messages:
                        try:
                            report = LoadReport.model_validate_json(message.value)
                        except Exception:
                            log.warning("ignoring a malformed load report: %r", message.value[:200])
                            continue
                        self.board.observe(report)
                        self.reports_seen += 1
        finally:
            await consumer.stop()
