"""Sustained load: a steady request rate through the whole pipeline for minutes, with memory watched.

Starts an embedded Tansu broker and the pipeline's workers (``--topology per-stage``: one process
per request-path stage, the production shape; ``all``: one process running every stage, the
learning stages included; ``per-stage-full``: per-stage plus one process per learning stage),
seeds the example cache with GSM8K questions answered "by the large tier", then sends requests at
a fixed rate for ``--duration`` seconds:

* most requests are variants of cached questions ("... (ticket 123)"): retrieval finds the example,
  the router offloads them to the small tier with the example prepended;
* ``--fresh-share`` of them are GSM8K questions not in the cache, served in order: the large tier
  answers them and the log stage admits the answers, so the cache grows until every question has
  been seen once (about ``uncached / (rate * fresh_share)`` seconds), then stays flat.

Generation is the echo backend (``--latency`` simulates a model's time per request), so what is
measured is EchoLM itself. Reported: achieved rate, end-to-end latency p50/p99 as the client sees
it (send to response), lag over time (sent minus answered, and per stage the events waiting in
front of it, from the workers' ``echolm_stage_events_total``), the bytes the topics hold at the
end, and per process the peak RSS and the RSS slope over the second half of the run in bytes per
request: "flat" means the slope is under ``--flat-threshold`` bytes per request.

    python bench/bench_load.py --topology per-stage --rate 20 --duration 300 \
        --json bench/results/load_per_stage.json --plot docs/figures/load_per_stage.png
    python bench/bench_load.py --topology all --rate 20 --duration 300 \
        --json bench/results/load_all.json --plot docs/figures/load_all.png
    python bench/bench_load.py --topology per-stage-full --rate 20 --duration 300 \
        --json bench/results/load_per_stage_full.json --plot docs/figures/load_per_stage_full.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from echolm.settings import Settings, TierSettings, TopicSettings  # noqa: E402
from streams.app import STAGES, available_stages  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.kafka_io import RequestProducer, ResponseCollector, create_topics, pipeline_topics  # noqa: E402
from streams.records import Message, RequestRecord, ResponseRecord  # noqa: E402
from streams.worker import WorkerProcess  # noqa: E402

# name -> (stage, tiers): the per-stage topology; "all" runs every stage in one process.
PER_STAGE = {
    "embed": ("embed", ()), "retrieve": ("retrieve", ()), "route": ("route", ()),
    "generate-small": ("generate", ("small",)), "generate-large": ("generate", ("large",)), "log": ("log", ()),
}
ALL_IN_ONE = {"all": ("all", ())}
# The request path per stage plus every learning stage in its own process: what "all" runs, split up,
# so a memory trend of the all-in-one worker can be traced to one stage.
LEARNING_STAGES = tuple(stage for stage in available_stages() if stage not in STAGES)
PER_STAGE_FULL = {**PER_STAGE, **{name: (name, ()) for name in LEARNING_STAGES}}
TOPOLOGIES = {"per-stage": PER_STAGE, "all": ALL_IN_ONE, "per-stage-full": PER_STAGE_FULL}


def echo_tiers(latency_s: float, concurrency: int) -> list[TierSettings]:
    return [
        TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0, use_examples=True,
                     simulated_latency_s=latency_s, concurrency=concurrency),
        TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False,
                     simulated_latency_s=latency_s, concurrency=concurrency),
    ]


# ----------------------------------------------------------------------------- measurements


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from /proc; (0, 0) once it is gone."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat (0 once it is gone)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass
class Scrape:
    """What the sampler reads from the workers' Prometheus endpoints."""

    cache_size: float | None = None
    consumed: dict[str, float] = field(default_factory=dict)  # stage -> events consumed, all workers
    # worker -> cumulative seconds: "loop lag" (summed lateness of the loop-lag probe), "loop probes"
    # (how many probes), and one entry per timer (time spent in its runs)
    loop: dict[str, dict[str, float]] = field(default_factory=dict)
    # stage -> cumulative sums over all workers: "wait" / "waited" (seconds events spent between being
    # produced and taken by the stage / how many), "batch" / "batches" (seconds in the stage's batches)
    hops: dict[str, dict[str, float]] = field(default_factory=dict)


HOP_SERIES = {"echolm_stage_wait_seconds_sum": "wait", "echolm_stage_wait_seconds_count": "waited",
              "echolm_stage_batch_seconds_sum": "batch", "echolm_stage_batch_seconds_count": "batches"}


def scrape_workers(ports: dict[str, int], cache_port: int | None) -> Scrape:
    scrape = Scrape()
    for name, port in ports.items():
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "echolm_stage_events_total":
                    stage = sample.labels["stage"]
                    scrape.consumed[stage] = scrape.consumed.get(stage, 0.0) + sample.value
                elif sample.name == "echolm_example_cache_size" and port == cache_port:
                    scrape.cache_size = sample.value
                elif sample.name == "echolm_event_loop_lag_seconds_sum":
                    scrape.loop.setdefault(name, {})["loop lag"] = sample.value
                elif sample.name == "echolm_event_loop_lag_seconds_count":
                    scrape.loop.setdefault(name, {})["loop probes"] = sample.value
                elif sample.name == "echolm_timer_seconds_sum":
                    scrape.loop.setdefault(name, {})[sample.labels["timer"]] = sample.value
                elif sample.name in HOP_SERIES:
                    sums = scrape.hops.setdefault(sample.labels["stage"], {})
                    key = HOP_SERIES[sample.name]
                    sums[key] = sums.get(key, 0.0) + sample.value
    return scrape


# Each stage's input: the stage whose output topic it reads ("sent": the requests the client
# produced, "answered": the responses it has seen). Stages not listed are not on the request path.
UPSTREAM = {"embed": "sent", "retrieve": "embed", "route": "retrieve", "generate": "route",
            "log": "answered", "example-stats": "answered"}


def stage_backlog(consumed: dict[str, float], sent: int, answered: int) -> dict[str, int]:
    """Events waiting in front of each stage: its input's count minus what it consumed.

    ``consumed`` counts events since the first request (the generate tiers summed as "generate").
    A comparison twin or an error answered early makes this approximate by a few events.
    """
    counts = {"sent": float(sent), "answered": float(answered)}
    for stage, value in consumed.items():
        key = "generate" if stage.startswith("generate.") else stage
        counts[key] = counts.get(key, 0.0) + value
    return {stage: max(0, round(counts[source] - counts[stage]))
            for stage, source in UPSTREAM.items() if stage in counts and source in counts}


async def topic_bytes(settings: Settings) -> tuple[int, int]:
    """(records, key + value bytes) held in the pipeline's topics: what an in-memory broker must keep."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for topic in pipeline_topics(settings)
                      for p in range(settings.topics.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records = size = 0
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            for messages in (await consumer.getmany(timeout_ms=500, max_records=2000)).values():
                records += len(messages)
                size += sum(len(m.key or b"") + len(m.value or b"") for m in messages)
        return records, size
    finally:
        await consumer.stop()


@dataclass
class Sample:
    t: float  # seconds since the first request
    sent: int
    answered: int
    rss: dict[str, int]
    cache_size: float | None
    backlog: dict[str, int]
    window_latencies: list[float] = field(default_factory=list, repr=False)
    # the same requests' time up to the generate stage's answer (wall clocks of one machine), the rest
    # being the responses topic hop and this client
    window_to_answer: list[float] = field(default_factory=list, repr=False)
    loop: dict[str, dict[str, float]] = field(default_factory=dict)  # Scrape.loop at this sample
    hops: dict[str, dict[str, float]] = field(default_factory=dict)  # Scrape.hops at this sample

    @property
    def lag(self) -> int:
        return self.sent - self.answered


@dataclass
class Run:
    sent_at: dict[str, float] = field(default_factory=dict)
    latencies: dict[str, float] = field(default_factory=dict)
    answered_at: list[float] = field(default_factory=list)
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    tiers: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    duplicates: int = 0
    started: float = 0.0
    sending_done: float = 0.0
    cpu_start: dict[str, float] = field(default_factory=dict)
    restarted_at: float | None = None  # --restart-at: when the workers were restarted
    restarted: dict[str, int] = field(default_factory=dict)  # their new pids
    cpu_end: dict[str, float] = field(default_factory=dict)
    topic_records: int = 0
    topic_bytes: int = 0


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than 3 points)."""
    if len(points) < 3:
        return 0.0
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] if ordered else float("nan")


# ----------------------------------------------------------------------------- workload


def workload(cache_dir: Path, cached: int) -> tuple[list[str], list[str]]:
    from echolm.datasets import load_gsm8k

    questions = [item.prompt for item in load_gsm8k(cache_dir)]
    if cached >= len(questions):
        raise SystemExit(f"--cached must be below {len(questions)} (GSM8K has {len(questions)} questions)")
    return questions[:cached], questions[cached:]


async def seed_cache(settings: Settings, tenant: str, prompts: list[str]) -> None:
    """The cache before the run: the questions with an answer attributed to the large tier."""
    from echolm.domain import ChatMessage
    from echolm.history.migrate import upgrade
    from echolm.history.store import SqlHistoryStore
    from echolm.history_import import HistoricalRecord, import_records
    from echolm.retrieval.embedder import SentenceTransformerEmbedder

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await upgrade(settings.resolved_database_url, directory=settings.migrations_dir)
    store = SqlHistoryStore(settings.resolved_database_url)
    await store.start()
    try:
        embedder = SentenceTransformerEmbedder(settings.embedder_model, batch_size=settings.embed_batch_size,
                                               dtype=settings.embedder_dtype)
        records = [HistoricalRecord(request_id=f"{tenant}-seed-{i}", tenant=tenant, custom_id=None,
                                    messages=[ChatMessage("user", p)], response=f"cached answer {i}",
                                    model="echo-large", tier="large") for i, p in enumerate(prompts)]
        for i in range(0, len(records), 256):
            await import_records(records[i:i + 256], embedder, store, admit=True)
    finally:
        await store.aclose()


def next_prompt(i: int, cached: list[str], uncached: list[str], fresh_share: float, rng: random.Random,
                fresh_cursor: list[int]) -> str:
    if uncached and rng.random() < fresh_share:
        prompt = uncached[fresh_cursor[0] % len(uncached)]
        fresh_cursor[0] += 1
    else:
        prompt = rng.choice(cached)
    return f"{prompt} (ticket {i})"


async def drive(settings: Settings, tenant: str, args: argparse.Namespace, cached: list[str], uncached: list[str],
                processes: dict[str, int], ports: dict[str, int], cache_port: int | None,
                restart: Callable[[], dict[str, int]] | None = None) -> Run:
    run = Run()
    rng = random.Random(args.seed)
    fresh_cursor = [0]
    prefix = uuid.uuid4().hex[:6]
    total = int(args.rate * args.duration)
    answered_window: list[float] = []
    to_answer_window: list[float] = []
    await create_topics(settings)
    async with ResponseCollector(settings) as collector, RequestProducer(settings) as producer:

        async def warm_up() -> None:
            ids = {f"{prefix}-warm-{i}" for i in range(4)}
            for request_id in ids:
                await producer.send(RequestRecord(request_id=request_id, tenant=tenant, max_tokens=16,
                                                  messages=[Message(role="user", content=f"warm up {request_id}")]))
            deadline = time.monotonic() + args.ready_timeout
            async for batch in collector.batches(timeout_s=0.5):
                ids -= {r.request_id for r in batch if isinstance(r, ResponseRecord)}
                if not ids:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the pipeline did not answer warm-up requests in {args.ready_timeout:.0f}s")

        await warm_up()
        consumed_before = (await asyncio.to_thread(scrape_workers, ports, cache_port)).consumed
        run.cpu_start = {name: cpu_seconds(pid) for name, pid in processes.items()}
        print(f"pipeline ready; sending {args.rate:g} requests/s for {args.duration:g}s ...", flush=True)
        run.started = time.monotonic()

        async def produce() -> None:
            pending = []
            for i in range(total):
                await asyncio.sleep(max(0.0, run.started + i / args.rate - time.monotonic()))
                request_id = f"{prefix}-{i}"
                record = RequestRecord(request_id=request_id, tenant=tenant, max_tokens=32, messages=[
                    Message(role="user", content=next_prompt(i, cached, uncached, args.fresh_share, rng, fresh_cursor))])
                run.sent_at[request_id] = time.monotonic()
                pending.append(await producer.send(record))
                if len(pending) >= 64:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
            run.sending_done = time.monotonic()
            run.cpu_end = {name: cpu_seconds(pid) for name, pid in processes.items()}

        async def sample() -> None:
            while True:
                await asyncio.sleep(args.sample_every)
                if restart is not None and run.restarted_at is None and time.monotonic() - run.started >= args.restart_at:
                    run.restarted_at = time.monotonic() - run.started
                    print(f"  restarting the workers at t={run.restarted_at:.1f}s (the broker and history stay)", flush=True)
                    restarted = await asyncio.to_thread(restart)
                    processes.update(restarted)
                    run.restarted.update(restarted)
                rss = {name: rss_bytes(pid)[0] for name, pid in processes.items()}
                sent, answered = len(run.sent_at), len(run.latencies) + len(run.errors)
                scrape = await asyncio.to_thread(scrape_workers, ports, cache_port)
                consumed = {stage: value - consumed_before.get(stage, 0.0) for stage, value in scrape.consumed.items()}
                run.samples.append(Sample(time.monotonic() - run.started, sent, answered, rss, scrape.cache_size,
                                          stage_backlog(consumed, sent, answered), list(answered_window),
                                          list(to_answer_window), scrape.loop, scrape.hops))
                answered_window.clear()
                to_answer_window.clear()
                last = run.samples[-1]
                waiting = " ".join(f"{stage}={n}" for stage, n in last.backlog.items())
                print(f"  t={last.t:6.1f}s sent={last.sent:6d} answered={last.answered:6d} lag={last.lag:5d} "
                      f"cache={last.cache_size} backlog: {waiting}", flush=True)

        sender = asyncio.create_task(produce())
        sampler = asyncio.create_task(sample())
        drain_deadline: float | None = None
        try:
            async for batch in collector.batches(timeout_s=0.25):
                now = time.monotonic()
                for response in batch:
                    if not isinstance(response, ResponseRecord) or response.request_id not in run.sent_at:
                        continue
                    if response.request_id in run.latencies or response.request_id in run.errors:
                        run.duplicates += 1
                        continue
                    if response.error is not None:
                        run.errors[response.request_id] = response.error.code.value
                    else:
                        latency = now - run.sent_at[response.request_id]
                        run.latencies[response.request_id] = latency
                        run.answered_at.append(now)
                        for stage, seconds in response.timings.items():
                            run.stage_seconds.setdefault(stage, []).append(seconds)
                        answered_window.append(latency)
                        to_answer_window.append(response.finished_at - response.submitted_at)
                        run.tiers[response.tier or "?"] = run.tiers.get(response.tier or "?", 0) + 1
                if sender.done():
                    sender.result()  # a failed producer ends the run with its error
                    drain_deadline = drain_deadline or now + args.drain_timeout
                    if len(run.latencies) + len(run.errors) >= total or now > drain_deadline:
                        break
        finally:
            sender.cancel()
            sampler.cancel()
    try:
        run.topic_records, run.topic_bytes = await asyncio.wait_for(topic_bytes(settings), 120)
    except Exception as exc:  # a side measurement: the run's figures still count
        print(f"WARNING: could not read the topics' size ({type(exc).__name__}: {exc})")
    return run


# ----------------------------------------------------------------------------- report


def report(run: Run, args: argparse.Namespace, peaks: dict[str, int]) -> dict:
    total = len(run.sent_at)
    send_s = run.sending_done - run.started
    answered = len(run.latencies)
    in_run = [s for s in run.samples if s.t <= send_s + 1e-6]
    second_half = [s for s in in_run if s.t >= send_s / 2]
    latencies = list(run.latencies.values())
    workers = {}
    for name in peaks:
        points = [(s.t, float(s.rss[name])) for s in second_half if s.rss.get(name)]
        per_second = slope(points)
        per_request = per_second / args.rate
        # a restarted worker's CPU clock started again: no share for it
        cpu = None if name in run.restarted else run.cpu_end.get(name, 0.0) - run.cpu_start.get(name, 0.0)
        workers[name] = {
            "cpu_share_of_one_core": round(cpu / send_s, 3) if send_s and cpu is not None else None,
            "peak_rss_mib": round(peaks[name] / 2**20, 1),
            "rss_first_mib": round(in_run[0].rss.get(name, 0) / 2**20, 1) if in_run else None,
            "rss_start_of_second_half_mib": round(points[0][1] / 2**20, 1) if points else None,
            "rss_end_mib": round(points[-1][1] / 2**20, 1) if points else None,
            "slope_bytes_per_s": round(per_second, 1),
            "bytes_per_request": round(per_request, 1),
            # Tansu keeps every topic in memory: its growth is the data, not a leak.
            "flat": None if name.startswith("broker") else abs(per_request) < args.flat_threshold,
        }
    cache = [s.cache_size for s in run.samples if s.cache_size is not None]
    quarters = [[s for s in in_run if q * send_s / 4 <= s.t < (q + 1) * send_s / 4] for q in range(4)]
    return {
        "rate_target": args.rate, "duration_s": args.duration, "topology": args.topology,
        "batch_window_s": args.batch_window, "embedder_dtype": args.embedder_dtype,
        "latency_setting_s": args.latency, "fresh_share": args.fresh_share, "cached_at_start": args.cached,
        "sent": total, "answered": answered, "errors": len(run.errors), "duplicates_seen": run.duplicates,
        "unanswered": total - answered - len(run.errors),
        "achieved_send_rate": round(total / send_s, 2) if send_s else None,
        "achieved_answer_rate": round(sum(1 for t in run.answered_at if t <= run.sending_done) / send_s, 2)
        if send_s else None,
        "latency_p50_s": round(percentile(latencies, 0.50), 4), "latency_p99_s": round(percentile(latencies, 0.99), 4),
        "latency_max_s": round(max(latencies), 4) if latencies else None,
        # Time inside each stage per request; the rest of the latency is Kafka hops and batching.
        "stage_mean_ms": {k: round(1000 * statistics.fmean(v), 1) for k, v in run.stage_seconds.items()},
        # Per quarter of the run: does latency drift, and does the workers' event loop (or one of their
        # periodic tasks) take more of the time as the history grows?
        "latency_p50_by_quarter_s": quarter_medians(quarters, lambda s: s.window_latencies),
        "restarted_at_s": round(run.restarted_at, 1) if run.restarted_at is not None else None,
        "to_answer_p50_by_quarter_s": quarter_medians(quarters, lambda s: s.window_to_answer),
        "loop_by_quarter": loop_by_quarter(quarters),
        "hops_by_quarter": hops_by_quarter(quarters),
        "lag_max": max((s.lag for s in in_run), default=0),
        "lag_mean": round(statistics.fmean(s.lag for s in in_run), 1) if in_run else None,
        # Per stage: events waiting in front of it, at most and when sending ended.
        "stage_backlog_max": {stage: max(s.backlog.get(stage, 0) for s in in_run) for stage in
                              (in_run[-1].backlog if in_run else {})},
        "stage_backlog_end": in_run[-1].backlog if in_run else {},
        "by_tier": run.tiers,
        "example_cache_first_last": [cache[0], cache[-1]] if cache else None,
        # Tansu keeps topics in memory with no retention: compare with the broker's RSS growth.
        "topic_records": run.topic_records, "topic_mib": round(run.topic_bytes / 2**20, 1),
        "topic_bytes_per_request": round(run.topic_bytes / total) if total else None,
        "flat_threshold_bytes_per_request": args.flat_threshold,
        "workers": workers,
        "timeline": [{"t": round(s.t, 1), "sent": s.sent, "answered": s.answered, "lag": s.lag,
                      "cache_size": s.cache_size, "rss": s.rss, "backlog": s.backlog,
                      "p50_s": round(percentile(s.window_latencies, 0.5), 4) if s.window_latencies else None,
                      "p99_s": round(percentile(s.window_latencies, 0.99), 4) if s.window_latencies else None,
                      "loop_lag_ms": {name: round(lag, 3) for name, lag in window_loop_lag_ms(a, s).items()}}
                     for a, s in zip([None, *run.samples], run.samples)],
    }


def quarter_medians(quarters: list[list[Sample]], values: Callable[[Sample], list[float]]) -> list[float | None]:
    """The median of ``values`` over each quarter's samples (None for a quarter without any)."""
    pooled = [[v for s in quarter for v in values(s)] for quarter in quarters]
    return [round(statistics.median(x), 4) if x else None for x in pooled]


def window_loop_lag_ms(before: Sample | None, after: Sample) -> dict[str, float]:
    """Mean lateness of each worker's event loop between two samples, in ms."""
    out = {}
    for name, now in after.loop.items():
        then = before.loop.get(name, {}) if before else {}
        probes = now.get("loop probes", 0.0) - then.get("loop probes", 0.0)
        if probes > 0 and now.get("loop lag", 0.0) >= then.get("loop lag", 0.0):  # not across a restart
            out[name] = 1000 * (now.get("loop lag", 0.0) - then.get("loop lag", 0.0)) / probes
    return out


def loop_by_quarter(quarters: list[list[Sample]]) -> dict[str, dict[str, list[float | None]]]:
    """worker -> {"loop lag ms": per quarter, <timer> "ms/s": per quarter (its runs' share of the time)}."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for index, quarter in enumerate(quarters):
        if len(quarter) < 2:
            continue
        first, last = quarter[0], quarter[-1]
        seconds = last.t - first.t
        for name, lag_ms in window_loop_lag_ms(first, last).items():
            out.setdefault(name, {}).setdefault("loop lag ms", [None] * 4)[index] = round(lag_ms, 3)
        for name, now in last.loop.items():
            then = first.loop.get(name, {})
            for key, value in now.items():
                if key in ("loop lag", "loop probes"):
                    continue
                if value < then.get(key, 0.0):
                    continue  # the worker restarted in this quarter: its counters started again
                share = 1000 * (value - then.get(key, 0.0)) / seconds
                out.setdefault(name, {}).setdefault(f"{key} ms/s", [None] * 4)[index] = round(share, 2)
    return out


def hops_by_quarter(quarters: list[list[Sample]]) -> dict[str, dict[str, list[float | None]]]:
    """stage -> {"wait ms": mean time its events waited after being produced, "batch ms": mean time of
    one of its batches}, per quarter: which hop (or stage) a latency drift is in."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for index, quarter in enumerate(quarters):
        if len(quarter) < 2:
            continue
        first, last = quarter[0], quarter[-1]
        for stage, now in last.hops.items():
            then = first.hops.get(stage, {})
            for label, total, count in (("wait ms", "wait", "waited"), ("batch ms", "batch", "batches")):
                n = now.get(count, 0.0) - then.get(count, 0.0)
                if n > 0 and now.get(total, 0.0) >= then.get(total, 0.0):  # not across a restart
                    mean = 1000 * (now.get(total, 0.0) - then.get(total, 0.0)) / n
                    out.setdefault(stage, {}).setdefault(label, [None] * 4)[index] = round(mean, 2)
    return out


def print_report(result: dict) -> None:
    print(f"\nsustained load ({result['topology']} topology, echo generator, latency {result['latency_setting_s']}s)")
    for key in ("rate_target", "duration_s", "batch_window_s", "embedder_dtype", "sent", "answered", "errors", "unanswered", "duplicates_seen",
                "achieved_send_rate", "achieved_answer_rate", "latency_p50_s", "latency_p99_s", "latency_max_s",
                "latency_p50_by_quarter_s", "to_answer_p50_by_quarter_s", "restarted_at_s", "stage_mean_ms",
                "lag_max", "lag_mean", "stage_backlog_max", "stage_backlog_end", "by_tier", "example_cache_first_last", "topic_records", "topic_mib",
                "topic_bytes_per_request"):
        print(f"  {key:<26} {result[key]}")
    print(f"\n  {'process':<16} {'CPU cores':>9} {'peak RSS MiB':>12} {'RSS 2nd half MiB':>18} {'bytes/s':>10} {'bytes/request':>14}  flat")
    for name, w in result["workers"].items():
        half = f"{w['rss_start_of_second_half_mib']} -> {w['rss_end_mib']}"
        print(f"  {name:<16} {str(w['cpu_share_of_one_core']):>9} {w['peak_rss_mib']:>12} {half:>18} {w['slope_bytes_per_s']:>10} "
              f"{w['bytes_per_request']:>14}  {FLAT_WORDS[w['flat']]}")
    print(f"  (flat: |RSS slope over the second half| < {result['flat_threshold_bytes_per_request']} bytes per request)")
    print("\n  event loop per quarter of the run (lateness of a 0.25 s sleep; ms per second spent in each timer)")
    for name, rows in result["loop_by_quarter"].items():
        for key, values in sorted(rows.items()):
            print(f"  {name:<16} {key:<40} " + " ".join(f"{str(v):>8}" for v in values))
    print("\n  per stage and quarter: mean wait of an event from its production to the stage taking it, mean batch time")
    for stage, rows in sorted(result["hops_by_quarter"].items()):
        for key, values in sorted(rows.items()):
            print(f"  {stage:<16} {key:<40} " + " ".join(f"{str(v):>8}" for v in values))


FLAT_WORDS = {True: "yes", False: "NO", None: "n/a (in-memory topics)"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    t = [p["t"] for p in timeline]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    answered_rate = [(b["answered"] - a["answered"]) / (b["t"] - a["t"]) for a, b in zip(timeline, timeline[1:])]
    sent_rate = [(b["sent"] - a["sent"]) / (b["t"] - a["t"]) for a, b in zip(timeline, timeline[1:])]
    axes[0].plot(t[1:], sent_rate, label="sent/s")
    axes[0].plot(t[1:], answered_rate, label="answered/s")
    axes[0].axhline(result["rate_target"], color="grey", linestyle=":", label="target")
    axes[0].set_ylabel("requests/s")
    axes[0].legend(loc="lower right")
    axes[1].plot(t, [p["p50_s"] for p in timeline], label="p50")
    axes[1].plot(t, [p["p99_s"] for p in timeline], label="p99")
    axes[1].set_ylabel("latency (s), per window")
    axes[1].legend(loc="upper left")
    lag_axis = axes[1].twinx()  # a loop kept busy shows here before it shows in the latency
    for name in {n for p in timeline for n in p.get("loop_lag_ms", {})}:
        lag_axis.plot(t, [p.get("loop_lag_ms", {}).get(name) for p in timeline], linestyle="--", alpha=0.6,
                      label=f"{name}: event loop lateness")
    lag_axis.set_ylabel("event loop lateness (ms)")
    lag_axis.legend(loc="upper right", fontsize=7)
    axes[2].plot(t, [p["lag"] for p in timeline], color="black", label="client: sent - answered")
    for stage in timeline[-1]["backlog"] if timeline else {}:
        axes[2].plot(t, [p["backlog"].get(stage, 0) for p in timeline], label=f"waiting for {stage}", alpha=0.8)
    axes[2].set_ylabel("lag (events)")
    axes[2].legend(loc="upper left", fontsize=8, ncol=2)
    # Growth since the first sample: a creep of a few MiB would vanish on an absolute scale.
    for name, worker in result["workers"].items():
        first = timeline[0]["rss"].get(name, 0) if timeline else 0
        axes[3].plot(t, [(p["rss"].get(name, 0) - first) / 2**20 for p in timeline],
                     label=f"{name} (from {first / 2**20:.0f}, peak {worker['peak_rss_mib']:.0f} MiB)")
    axes[3].set_ylabel("RSS growth (MiB)")
    axes[3].set_xlabel("seconds since the first request")
    axes[3].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"EchoLM sustained load: {result['rate_target']:g} req/s for {result['duration_s']:g}s "
                 f"({result['topology']} topology, echo latency {result['latency_setting_s']}s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second to send (default 20)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of sending (default 180)")
    parser.add_argument("--latency", type=float, default=0.0, help="simulated generation seconds per request")
    parser.add_argument("--concurrency", type=int, default=8, help="generations at once per tier worker")
    parser.add_argument("--topology", choices=sorted(TOPOLOGIES), default="per-stage",
                        help="per-stage: one worker process per request-path stage (default); all: one process "
                             "running every stage; per-stage-full: per-stage plus one process per learning stage")
    parser.add_argument("--cached", type=int, default=1200, help="GSM8K questions in the cache before the run")
    parser.add_argument("--fresh-share", type=float, default=0.1,
                        help="share of requests that are questions not cached yet (answered large, then admitted)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--embedder-dtype", choices=["auto", "float32", "bfloat16"],
                        help="ECHOLM_EMBEDDER_DTYPE for the workers (default: the setting's)")
    parser.add_argument("--batch-window", type=float,
                        help="seconds a stage waits to fill a batch (ECHOLM_STAGE_BATCH_WINDOW_S; default: the setting's)")
    parser.add_argument("--database-url", help="history database (default: SQLite in a temporary directory)")
    parser.add_argument("--restart-at", type=float,
                        help="restart every worker this many seconds into the run (SIGTERM, then a new process; the "
                             "broker and the history stay): tells state kept in a worker from state in the broker")
    parser.add_argument("--sample-every", type=float, default=3.0, help="seconds between lag/RSS samples")
    parser.add_argument("--flat-threshold", type=float, default=256.0,
                        help="'memory flat' if the RSS slope of the second half is below this many bytes/request")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the last answers")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures (and the timeline) here")
    parser.add_argument("--plot", type=Path, help="write a PNG of rate, latency, lag and RSS over time here")
    args = parser.parse_args()
    # `timeout` and schedulers stop with SIGTERM: unwind through the `finally`s, so the worker
    # processes and the broker are stopped rather than left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    topology = TOPOLOGIES[args.topology]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:
        prefix = f"load{uuid.uuid4().hex[:6]}"
        tenant = prefix
        settings = Settings(data_dir=Path(tmp) / "state", kafka_bootstrap=broker.bootstrap,
                            database_url=args.database_url,
                            topics=TopicSettings(prefix=prefix, partitions=args.partitions), consumer_group=prefix,
                            tiers=echo_tiers(args.latency, args.concurrency), log_level="WARNING",
                            **({"stage_batch_window_s": args.batch_window} if args.batch_window else {}),
                            **({"embedder_dtype": args.embedder_dtype} if args.embedder_dtype else {}))
        args.batch_window = settings.stage_batch_window_s
        from echolm.retrieval.embedder import resolve_dtype

        args.embedder_dtype = f"{settings.embedder_dtype} ({resolve_dtype(settings.embedder_dtype)})"
        cached, uncached = workload(settings.model_cache_dir, args.cached)
        print(f"seeding the cache with {len(cached)} examples ...", flush=True)
        asyncio.run(seed_cache(settings, tenant, cached))
        ports = {name: free_port() for name in topology}
        workers = {name: WorkerProcess(settings.model_copy(update={"metrics_port": ports[name]}), stage=stage,
                                       tiers=tiers, log_path=Path(tmp) / f"worker-{name}.log")
                   for name, (stage, tiers) in topology.items()}
        for worker in workers.values():
            worker.start()
        processes = {name: w.process.pid for name, w in workers.items() if w.process}
        processes["broker (tansu)"] = broker.pid or 0
        cache_port = ports.get("retrieve", ports.get("all"))
        try:
            def restart() -> dict[str, int]:
                for worker in workers.values():
                    worker.stop()
                for worker in workers.values():
                    worker.start()
                return {name: w.process.pid for name, w in workers.items() if w.process}

            run = asyncio.run(drive(settings, tenant, args, cached, uncached, processes, ports, cache_port,
                                    restart if args.restart_at is not None else None))
            peaks = {name: rss_bytes(pid)[1] for name, pid in processes.items()}
            dead = [name for name, w in workers.items() if not w.alive]
        finally:
            for worker in workers.values():
                worker.stop()
        if dead:
            print(f"WARNING: worker(s) died during the run: {dead}")
    result = report(run, args, peaks)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"json: {args.json}")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
