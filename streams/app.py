"""The faust app: one agent per stage, each reading its topic in batches and calling ``streams.stages``.

At-least-once by design (Tansu has no transactions): an event is acknowledged only after its
outputs are acknowledged by the broker, so a crash means redelivery, never loss. Redelivered work
is harmless: the history upserts by request id and clients de-duplicate by request id.

Agents run with ``concurrency=1`` and ``take_events``: faust agents with higher concurrency may
commit past an unfinished event (faust issue #606). Parallelism comes from batching instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust

from echolm.domain import REUSE_TIER, EchoLMError, ErrorCode
from echolm.settings import Settings
from streams import metrics
from streams.records import InFlightRequest, RequestRecord, ResponseRecord
from streams.services import Services
from streams.stages import (
    Decoder,
    EmbedStage,
    GenerateStage,
    LogStage,
    Outgoing,
    RetrieveStage,
    RouteStage,
    error_response,
    failure_outputs,
)

log = logging.getLogger(__name__)

STAGES = ("embed", "retrieve", "route", "generate", "log")

# Stages beyond the request path (feedback, judging, replay, eviction) live in their own modules
# and register here: name -> function that adds its agents/timers to a worker's app.
EXTRA_STAGES: dict[str, Callable[[_Wiring], None]] = {}


def register_stage(name: str) -> Callable[[Callable[[_Wiring], None]], Callable[[_Wiring], None]]:
    def register(wire: Callable[[_Wiring], None]) -> Callable[[_Wiring], None]:
        EXTRA_STAGES[name] = wire
        return wire

    return register


def available_stages() -> tuple[str, ...]:
    import streams.extra_stages  # noqa: F401  (registers the optional stages)

    return STAGES + tuple(EXTRA_STAGES)


@dataclass(frozen=True)
class WorkerPlan:
    """Which stages (and which generate tiers) one worker process runs."""

    stages: tuple[str, ...] = STAGES
    tiers: tuple[str, ...] = ()
    name: str = "all"

    @classmethod
    def for_stage(cls, stage: str, settings: Settings, tiers: Sequence[str] = ()) -> WorkerPlan:
        all_tiers = tuple(t.name for t in settings.tiers)
        chosen = tuple(tiers) or all_tiers
        unknown = set(chosen) - set(all_tiers)
        if unknown:
            raise ValueError(f"unknown tier(s) {sorted(unknown)}; configured: {list(all_tiers)}")
        stages = available_stages()
        if stage == "all":
            return cls(stages, chosen, "all")
        # A comma list runs several stages in one process (e.g. all but generate, beside generate workers).
        wanted = tuple(dict.fromkeys(s.strip() for s in stage.split(",") if s.strip()))
        unknown_stages = [s for s in wanted if s not in stages]
        if unknown_stages or not wanted:
            raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(('all',) + stages)}, "
                             "or a comma list of stages")
        generates = "generate" in wanted
        # The name is the consumer group's suffix: workers with the same plan share partitions.
        name = "-".join(f"generate-{'-'.join(chosen)}" if s == "generate" else s for s in wanted)
        return cls(wanted, chosen if generates else (), name)


def faust_broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def set_consumer_fetch_wait(fetch_max_wait_ms: int) -> None:
    """Makes faust's consumers wait at most ``fetch_max_wait_ms`` for data per fetch.

    faust creates its aiokafka consumer with ``fetch_max_wait_ms=1500``, fixed. Apache Kafka answers
    a waiting fetch as soon as data arrives, but Tansu answers a fetch over several topics only when
    the wait expires, so every hop between stages cost up to 1.5 s (measured: ~750 ms per hop, 3 s
    end to end for an echo generator; 50 ms per hop with 100 ms). aiokafka reads the attribute when
    the consumer starts, which is after faust has created it.
    """
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    original = getattr(thread._create_worker_consumer, "__wrapped__", thread._create_worker_consumer)

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        if hasattr(consumer, "_fetch_max_wait_ms"):
            consumer._fetch_max_wait_ms = fetch_max_wait_ms
        else:  # another aiokafka: keep its default rather than guess
            log.warning("cannot set the consumer fetch wait on this aiokafka version; hops may wait 1.5 s")
        return consumer

    create_worker_consumer.__wrapped__ = original  # type: ignore[attr-defined]
    thread._create_worker_consumer = create_worker_consumer


def one_torch_thread_beside_llamacpp(settings: Settings, plan: WorkerPlan) -> Settings:
    """``settings`` with the embedder on one torch thread where this worker also generates on llama.cpp
    and ``embedder_threads`` is unset. torch's OpenMP runtime is the one llama.cpp loads too (one
    ``libgomp.so.1`` per process), and a torch team of several threads beside llama.cpp's makes libgomp
    stop spin-waiting: the 1.5B model then decodes 86 instead of 68 ms per token on 2 cores, while a
    one-thread embedding costs a few milliseconds per request (docs/design.md)."""
    if settings.embedder_threads is not None or "generate" not in plan.stages:
        return settings
    if not any(t.backend == "llamacpp" and t.name in plan.tiers for t in settings.tiers):
        return settings
    return settings.model_copy(update={"embedder_threads": 1})


def create_app(settings: Settings, plan: WorkerPlan, services: Services | None = None) -> faust.App:
    if not settings.kafka_bootstrap:
        raise ValueError("a worker needs ECHOLM_KAFKA_BOOTSTRAP (the embedded broker is started by `echolm batch`)")
    set_consumer_fetch_wait(settings.fetch_max_wait_ms)
    services = services or Services(one_torch_thread_beside_llamacpp(settings, plan))
    longest_call = max(t.timeout_s for t in settings.tiers)
    app = faust.App(
        f"{settings.consumer_group}-{plan.name}",
        broker=faust_broker_urls(settings.kafka_bootstrap),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication_factor,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        # A batch of LLM calls must finish inside the poll interval or the member leaves the group.
        broker_max_poll_interval=max(300.0, longest_call * settings.stage_batch_size),
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=False,
    )
    wiring = _Wiring(app, settings, services)
    for stage in plan.stages:
        if stage == "generate":
            for tier in plan.tiers:
                wiring.generate(tier)
        elif stage in EXTRA_STAGES:
            EXTRA_STAGES[stage](wiring)
        else:
            getattr(wiring, stage)()
    if "generate" in plan.stages:  # the load-aware router reads generate workers' backlog reports
        from streams.load_stage import wire_load_reports

        wire_load_reports(wiring)

    @app.task
    async def watch_event_loop_lag() -> None:
        # Not app.task(event_loop_lag_monitor): faust passes the app to a task that takes an argument.
        await event_loop_lag_monitor()

    @app.task
    async def warm_up() -> None:
        # Load models before traffic arrives, so the first batch does not time out the group.
        await wiring.warm_up(plan)

    @app.on_rebalance_complete.connect
    async def rebalanced(sender: Any, **kwargs: Any) -> None:
        log.info("worker %s: partitions assigned", plan.name)

    return app


TimerBody = Callable[[], Awaitable[None]]
LOOP_LAG_PROBE_S = 0.25


def timed(body: TimerBody) -> TimerBody:
    """``body`` with each run's duration observed in ``echolm_timer_seconds{timer=<its name>}``."""
    @functools.wraps(body)
    async def run() -> None:
        started = time.perf_counter()
        try:
            await body()
        finally:
            metrics.TIMER_SECONDS.labels(body.__name__).observe(time.perf_counter() - started)

    return run


def observe_waits(stage_name: str, events: Sequence[Any], taken_at: float) -> None:
    """Each event's time from its production (the record's create time, seconds) to ``taken_at``, into
    ``echolm_stage_wait_seconds{stage}``; events without a timestamp are left out."""
    histogram = metrics.STAGE_WAIT.labels(stage_name)
    for event in events:
        produced_at = event.message.timestamp
        if produced_at:
            histogram.observe(max(0.0, taken_at - produced_at))


async def event_loop_lag_monitor(interval_s: float = LOOP_LAG_PROBE_S) -> None:
    """Records, forever, how much later than asked the loop wakes a sleep (``echolm_event_loop_lag_seconds``)."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(interval_s)
        metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - asked - interval_s))


@dataclass
class _Wiring:
    app: faust.App
    settings: Settings
    services: Services
    decoder: Decoder = field(init=False)
    stages: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.decoder = Decoder(self.settings)

    async def warm_up(self, plan: WorkerPlan) -> None:
        for stage in plan.stages:
            if stage == "embed":
                await self.services.embedder()
            elif stage == "retrieve":
                await self.services.example_cache()
            elif stage == "route":
                await self.services.router()
            elif stage == "log":
                await self.services.history()
            elif stage == "generate":
                for tier in plan.tiers:
                    await self.services.generator(tier)
        log.info("worker %s ready: stages %s", plan.name, ", ".join(plan.stages))

    def timer(self, interval_s: float, *, on_leader: bool = False) -> Callable[[TimerBody], TimerBody]:
        """``app.timer`` that times every run into ``echolm_timer_seconds{timer=<function name>}`` (waits
        included): beside ``echolm_event_loop_lag_seconds`` it tells a periodic task that holds up the
        loop the request path shares from one that only waits on its database or broker."""
        def register(body: TimerBody) -> TimerBody:
            return self.app.timer(interval_s, on_leader=on_leader)(timed(body))  # type: ignore[no-any-return]

        return register

    def agent(self, topic_name: str, stage_name: str,
              decode: Callable[[str | None, bytes], Any],
              handle: Callable[[list[Any]], Awaitable[list[Outgoing]]], batch_size: int | None = None) -> None:
        """Adds a batched, at-least-once agent: decode each event, handle the batch, send the outputs.

        ``decode(key, raw)`` returns a record, a list of failure outputs for an undecodable event
        (``streams.stages.failure_outputs``), or None to skip the event.
        """
        self._agent(topic_name, stage_name, decode, handle, batch_size)

    def _agent(self, topic_name: str, stage_name: str,
               decode: Callable[[str | None, bytes], Any],
               handle: Callable[[list[Any]], Awaitable[list[Outgoing]]], batch_size: int | None = None) -> None:
        topic = self.app.topic(topic_name, key_type=bytes, value_type=bytes)
        settings = self.settings
        take = batch_size or settings.stage_batch_size

        async def agent(stream: faust.StreamT) -> None:
            async for events in stream.take_events(take, within=settings.stage_batch_window_s):
                # faust acks a taken batch in a `finally`, so a batch interrupted by SIGTERM (the agent
                # is cancelled mid-generation) or by a failed send would be committed unprocessed: lost.
                # An extra reference per event, released only once the outputs are acknowledged,
                # leaves such a batch uncommitted, to be redelivered after the restart.
                observe_waits(stage_name, events, time.time())
                for event in events:
                    event.message.incref()
                outgoing: list[Outgoing] = []
                records: list[Any] = []
                for event in events:
                    key = event.key.decode("utf-8", "replace") if event.key else None
                    decoded = decode(key, event.value)
                    if decoded is None:
                        continue
                    if isinstance(decoded, list):  # failure outputs for an undecodable event
                        outgoing.extend(decoded)
                        metrics.STAGE_ERRORS.labels(stage_name, "undecodable").inc()
                    else:
                        records.append(decoded)
                with metrics.STAGE_LATENCY.labels(stage_name).time():
                    if records:
                        outgoing.extend(await self._guarded(stage_name, handle, records))
                metrics.STAGE_EVENTS.labels(stage_name).inc(len(events))
                await self._send_all(outgoing)
                for event in events:
                    event.message.decref()

        agent.__name__ = f"{stage_name.replace('.', '_')}_agent"
        self.app.agent(topic, name=f"echolm.{stage_name}", concurrency=1)(agent)

    async def _guarded(self, stage_name: str, handle: Callable[[list[Any]], Awaitable[list[Outgoing]]],
                       records: list[Any]) -> list[Outgoing]:
        """A stage bug must not drop the batch: each request then ends with an explicit error."""
        try:
            return await handle(records)
        except Exception as exc:
            ids = [getattr(r, "request_id", None) or getattr(getattr(r, "request", None), "request_id", None)
                   for r in records]
            log.exception("stage %s failed on a batch of %d", stage_name, len(records),
                          extra={"stage": stage_name, "request_ids": ids})
            metrics.STAGE_ERRORS.labels(stage_name, "stage_failed").inc(len(records))
            error = EchoLMError(ErrorCode.STAGE_FAILED, f"{stage_name} failed: {type(exc).__name__}: {exc}"[:500])
            out = []
            for record in records:
                request = record if isinstance(record, RequestRecord) else getattr(record, "request", None)
                if request is None:  # a ResponseRecord at the log stage: retrying is the log stage's job
                    raise
                out.extend(failure_outputs(self.settings, error_response(request, stage_name, error)))
            return out

    async def _send_all(self, outgoing: list[Outgoing]) -> None:
        if not outgoing:
            return
        pending = [await self.app.send(o.topic, key=o.key.encode(), value=o.value, partition=o.partition)
                   for o in outgoing]
        # Wait for the broker's acknowledgement before the batch is acked (at-least-once).
        await asyncio.gather(*pending)

    async def _stage(self, name: str, build: Callable[[], Awaitable[Any]]) -> Any:
        if name not in self.stages:
            self.stages[name] = await build()
        return self.stages[name]

    async def _build(self, stage_class: Any, service: Awaitable[Any]) -> Any:
        return stage_class(self.settings, await service)

    def embed(self) -> None:
        async def handle(records: list[RequestRecord]) -> list[Outgoing]:
            stage = await self._stage("embed", lambda: self._build(EmbedStage, self.services.embedder()))
            return await stage.process(records)

        self._agent(self.settings.topics.requests, "embed",
                    lambda key, raw: self.decoder.request(key, raw, "embed"), handle)

    def retrieve(self) -> None:
        async def handle(records: list[InFlightRequest]) -> list[Outgoing]:
            async def build() -> RetrieveStage:
                from echolm.selection import StageTwo  # stage 2, hot-reloading the trained proxy

                return RetrieveStage(self.settings, await self.services.example_cache(),
                                     StageTwo(self.settings, await self.services.history()))

            stage = await self._stage("retrieve", build)
            return await stage.process(records)

        self._agent(self.settings.topics.embedded, "retrieve",
                    lambda key, raw: self.decoder.in_flight(key, raw, "retrieve"), handle)

        @self.timer(self.settings.cache_sync_interval_s)
        async def sync_example_cache() -> None:
            cache = await self.services.example_cache()
            try:
                await cache.sync_from(await self.services.history())
            except Exception as exc:
                # An exception in a faust timer crashes the worker: a database outage would take every
                # retriever down. Serve from the cache as it is; the next tick catches up.
                log.warning("example cache sync failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc,
                            self.settings.cache_sync_interval_s, extra={"stage": "retrieve"})
                metrics.STAGE_ERRORS.labels("retrieve", "cache_sync").inc()
            metrics.CACHE_SIZE.set(len(cache))

    def route(self) -> None:
        async def handle(records: list[InFlightRequest]) -> list[Outgoing]:
            stage = await self._stage("route", lambda: self._build(RouteStage, self.services.router()))
            outgoing = await stage.process(records)
            for o in outgoing:  # a response straight from the route stage is a verbatim reuse
                tier = REUSE_TIER if o.topic == self.settings.topics.responses else o.topic.rsplit(".", 1)[-1]
                metrics.ROUTED.labels(tier).inc()
            for record in records:
                metrics.EXAMPLES_PER_REQUEST.observe(len(record.examples or []))
            return outgoing

        self._agent(self.settings.topics.retrieved, "route",
                    lambda key, raw: self.decoder.in_flight(key, raw, "route"), handle)

    def generate(self, tier_name: str) -> None:
        tier = self.settings.tier(tier_name)

        async def handle(records: list[InFlightRequest]) -> list[Outgoing]:
            async def build() -> GenerateStage:
                return GenerateStage(self.settings, tier, await self.services.generator(tier_name))

            stage = await self._stage(f"generate.{tier_name}", build)
            in_flight = metrics.TIER_IN_FLIGHT.labels(tier_name)
            in_flight.inc(len(records))
            try:
                return await stage.process(records)
            finally:
                in_flight.dec(len(records))

        # A batch is as large as the tier's concurrency: answers go out as each group finishes, not
        # after a whole stage batch of slow generations.
        self._agent(self.settings.topics.generate(tier_name), f"generate.{tier_name}",
                    lambda key, raw: self.decoder.in_flight(key, raw, f"generate.{tier_name}"), handle,
                    batch_size=tier.concurrency)

    def log(self) -> None:
        async def handle(records: list[ResponseRecord]) -> list[Outgoing]:
            async def build() -> LogStage:
                return LogStage(self.settings, await self.services.history(), self.services.admission_hook())

            stage = await self._stage("log", build)
            return await stage.process(records)

        def decode(key: str | None, raw: bytes) -> ResponseRecord | None:
            try:
                return ResponseRecord.model_validate_json(raw)
            except Exception as exc:
                # Nothing to answer to: a corrupt final record is logged and skipped.
                log.error("corrupt response record key=%s skipped: %s", key, exc,
                          extra={"request_id": key, "stage": "log"})
                metrics.STAGE_ERRORS.labels("log", "undecodable").inc()
                return None

        self._agent(self.settings.topics.responses, "log", decode, handle)
