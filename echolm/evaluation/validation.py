"""Checking the cost model against the real pipeline at saturation.

For a few traffic requests, the real pipeline (embedded Tansu broker, one ``echolm worker --stage all``
process, SQLite history seeded with the cache part's large-model answers) serves them all at once, as
``echolm batch`` would. The routing is set up to make the same decisions as the simulated system
(``always-large``, or the similarity router at the chosen threshold with the same ``k``), the cache is
frozen (no admissions and no replay during the run), the judge stage samples no live answer (background work
the model does not predict), and a warm-up batch first loads both models. The batch's wall time
is then compared with the cost model's prediction for the same requests and arms, and the pipeline's
answers with the cached generations (same prompts, temperature 0).

``measure_latency`` serves the same requests the same way as a Poisson stream at a fixed rate (the
issue's "p50/p99 latency at fixed loads, measured through the real pipeline") and reports the latency
each request saw from its send to its answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from echolm.datasets import TaskItem
from echolm.domain import DECODE_TIMING, PREFILL_TIMING, ChatMessage, Example
from echolm.evaluation.efficiency import (
    CostModel,
    LatencyPoint,
    ValidationPoint,
    queue_latencies,
    tier_makespan,
    work_by_tier,
)
from echolm.evaluation.generation_cache import WARMUP_PROMPT
from echolm.evaluation.harness import WorkloadRun
from echolm.evaluation.report import WorkloadScorer
from echolm.evaluation.systems import EVAL_TENANT, Choice
from echolm.evaluation.workload import poisson_arrivals
from echolm.settings import Settings

if TYPE_CHECKING:
    # streams is imported only when a run starts
    from streams.records import RequestRecord, ResponseRecord
    from streams.worker import WorkerProcess

log = logging.getLogger(__name__)


def _batch_line(custom_id: str, prompt: str, max_tokens: int) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "tenant": EVAL_TENANT,
                       "body": {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                                "temperature": 0.0}})


def _custom_id(position: int, item: TaskItem) -> str:
    return f"{position:04d}:{item.id}"


async def _seed_history(settings: Settings, run: WorkloadRun, examples: Sequence[Example]) -> None:
    from echolm.history.migrate import upgrade
    from echolm.history.store import SqlHistoryStore
    from echolm.history_import import HistoricalRecord, import_records
    from echolm.retrieval.embedder import SentenceTransformerEmbedder

    await upgrade(settings.resolved_database_url)
    store = SqlHistoryStore(settings.resolved_database_url)
    await store.start()
    try:
        embedder = SentenceTransformerEmbedder(settings.embedder_model, num_threads=1)
        records = [HistoricalRecord(request_id=f"cache-{i}", tenant=EVAL_TENANT, custom_id=None,
                                    messages=[ChatMessage("user", example.prompt)], response=example.response,
                                    model=example.model, tier="large")
                   for i, example in enumerate(examples)]
        await import_records(records, embedder, store, admit=True)
    finally:
        await store.aclose()


def pipeline_settings(base: Settings, run: WorkloadRun, data_dir: Path, *, policy: str,
                      threshold: float | None, reuse_min_similarity: float | None = None) -> Settings:
    """Settings that make the pipeline route like the simulated system (see the module docstring); with
    ``reuse_min_similarity`` the route stage answers repeats verbatim from the cache, as the simulated
    reuse does (which ignores quality scores)."""
    update: dict[str, object] = {
        "data_dir": data_dir, "database_url": None, "kafka_bootstrap": None, "admit_from_tiers": [],
        "retrieve_top_k": run.k, "min_similarity": -1.0, "default_tenant": EVAL_TENANT, "log_level": "WARNING",
        # Stage 2 keeps every stage 1 candidate: the arm validated is "small + nearest examples". The judge
        # stage judges no live answer: its reference answer and two judge calls per sampled answer (5% by
        # default) run on the large tier, work the cost model does not predict (session 14: one judged
        # answer, ~30 s of the large model, in a 40-request run).
        "learning": base.learning.model_copy(update={"selection_threshold": -1.0, "max_examples": run.k,
                                                     "judge_sample_rate": 0.0}),
        # Frozen cache: no replay either (it would also share the CPU with the traffic being timed).
        "replay": base.replay.model_copy(update={"enabled": False}),
    }
    if reuse_min_similarity is not None:
        update.update({"reuse_min_similarity": reuse_min_similarity, "reuse_min_quality": 0.0})
    if policy == "always-large":
        update["router_policy"] = "always-large"
    else:
        update.update({"router_policy": "similarity", "offload_min_examples": 1,
                       "offload_min_similarity": float(threshold if threshold is not None else 0.0)})
    return base.model_copy(update=update)


@dataclass(frozen=True)
class PipelineRun:
    """How one validation run sets up the pipeline: routing like ``system``, on the cache as seeded."""

    system: str
    policy: str
    threshold: float | None
    replayed_cache: bool = False
    reuse_min_similarity: float | None = None


def generate_worker_settings(live: Settings, workers: int, cores: int | None = None) -> Settings:
    """The settings of one of ``workers`` generate processes sharing the machine's cores: every llama.cpp
    tier on ``cores // workers`` threads (at least one) and a process's tiers on one shared thread, so each
    process generates one request at a time on its share of the cores; INFO logs, which say when the
    worker is ready and holds partitions."""
    threads = max(1, (cores or os.cpu_count() or 1) // workers)
    tiers = [t.model_copy(update={"n_threads": threads}) if t.backend == "llamacpp" else t for t in live.tiers]
    return live.model_copy(update={"tiers": tiers, "llamacpp_shared_thread": True, "log_level": "INFO"})


def wait_until_generating(workers: Sequence[WorkerProcess], timeout_s: float) -> None:
    """Until every generate worker has loaded its models and holds partitions after the group's last
    rebalance (each logs both), so no rebalance or model load falls into the timed run."""
    deadline = time.monotonic() + timeout_s
    pending = list(workers)
    while pending:
        for worker in list(pending):
            if not worker.alive:
                raise RuntimeError(f"a generate worker exited before it was ready:\n{worker.tail()}")
            text = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
            if " ready: stages " in text and "partitions assigned" in text:
                pending.remove(worker)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} generate worker(s) not ready after {timeout_s:.0f} s")
        time.sleep(0.5)


@contextmanager
def serving_pipeline(base: Settings, run: WorkloadRun, spec: PipelineRun, data_dir: Path,
                     timeout_s: float, generate_workers: int = 1) -> Iterator[Settings]:
    """An embedded broker and one worker process routing as ``spec`` says, on a fresh history seeded with
    the cache part (as the replay phase left it, with ``spec.replayed_cache``), both models loaded by a
    warm-up request each; yields the live settings.

    With ``generate_workers`` above 1 the generate stage runs instead in that many processes of one
    consumer group, each holding both tiers on its share of the cores (``generate_worker_settings``:
    with 2 on 2 cores, one llama.cpp thread each), beside one process for every other stage, its
    embedder on one thread as in the single worker."""
    from streams.app import available_stages
    from streams.batch import run_batch
    from streams.broker import EmbeddedBroker
    from streams.worker import WorkerProcess

    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    settings = pipeline_settings(base, run, data_dir.resolve(), policy=spec.policy, threshold=spec.threshold,
                                 reuse_min_similarity=spec.reuse_min_similarity)
    asyncio.run(_seed_history(settings, run, run.replayed_examples() if spec.replayed_cache else run.examples()))
    warm_in = data_dir / "warmup.jsonl"
    # One request routed to each tier, so both models are loaded before the clock starts.
    warm_in.write_text(_batch_line("warm-small", run.examples()[0].prompt, 8) + "\n"
                       + _batch_line("warm-large", WARMUP_PROMPT, 8) + "\n")
    with EmbeddedBroker(data_dir) as broker:
        live = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
        if generate_workers <= 1:
            workers = [WorkerProcess(live, log_path=data_dir / "worker.log")]
            generating = []
        else:
            front = ",".join(stage for stage in available_stages() if stage != "generate")
            workers = [WorkerProcess(live.model_copy(update={"embedder_threads": 1}), stage=front,
                                     log_path=data_dir / "worker.log")]
            per_worker = generate_worker_settings(live, generate_workers)
            generating = [WorkerProcess(per_worker, stage="generate", log_path=data_dir / f"worker-generate-{i}.log")
                          for i in range(generate_workers)]
            workers += generating
        try:
            for worker in workers:
                worker.start()
            wait_until_generating(generating, timeout_s)
            asyncio.run(asyncio.wait_for(run_batch(live, warm_in, data_dir / "warmup.out.jsonl", progress=False),
                                         timeout_s))
            yield live
        finally:
            for worker in workers:
                worker.stop()


def _data_dir(work_dir: Path, system: str, suffix: str = "") -> Path:
    return work_dir / (system.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "") + suffix)


@dataclass(frozen=True)
class ServedAnswer:
    """One line of a batch output as the validation reads it: the answer, where and how it was made."""

    text: str  # '' for an error
    tier: str
    timings: dict[str, float]
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, from the tier's prefix cache
    completion_tokens: int = 0

    @property
    def split(self) -> tuple[float, float] | None:
        """The backend's (prefill, decode) seconds for this answer; None where it gives no split."""
        prefill_s, decode_s = self.timings.get(PREFILL_TIMING), self.timings.get(DECODE_TIMING)
        return None if prefill_s is None or decode_s is None else (float(prefill_s), float(decode_s))

    @property
    def generate_s(self) -> float:
        """The model's own seconds: llama.cpp's prefill + decode where the backend splits them, else the
        generate stage's timing, which also holds any wait for a compute thread that tiers share (0 for
        an answer without one)."""
        split = self.split
        return sum(split) if split is not None else float(self.timings.get("generate", 0.0))


def read_answers(batch_output: Path) -> dict[str, ServedAnswer]:
    """custom_id -> the served answer, from a batch output file."""
    out = {}
    for line in batch_output.read_text().splitlines():
        record = json.loads(line)
        body = (record.get("response") or {}).get("body") or {}
        provenance = body.get("echolm") or {}
        usage = body.get("usage") or {}
        out[record["custom_id"]] = ServedAnswer(
            text=body["choices"][0]["message"]["content"] if body.get("choices") else "",
            tier=provenance.get("tier") or "", timings=provenance.get("timings") or {},
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0))
    return out


@dataclass
class TierWork:
    """One tier's generated answers in a validation run, the pipeline's next to the cost model's.

    Three sums of model seconds split the model's error in two: ``predicted_s`` (the cost model on the
    tokens it expected: the evaluation's answers, its prefix-cache replay) vs ``modelled_s`` (the cost
    model on the tokens the pipeline actually prefilled and decoded) is a difference in the *work*;
    ``modelled_s`` vs ``generate_s`` (the pipeline's measured model time) is the *engine* running
    slower or faster in the worker than in calibration. The prefill/decode split gives the worker's
    own token rates.
    """

    requests: int = 0
    prefilled: int = 0  # prompt tokens the pipeline evaluated (not taken from its prefix cache)
    decoded: int = 0
    predicted_prefilled: int = 0
    predicted_decoded: int = 0
    predicted_s: float = 0.0
    modelled_s: float = 0.0
    generate_s: float = 0.0
    split_requests: int = 0  # answers with the backend's prefill/decode split
    split_prefilled: int = 0
    split_decoded: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def add(self, answer: ServedAnswer, costs: CostModel, predicted: tuple[int, int, float]) -> None:
        prefilled = max(1, answer.prompt_tokens - answer.cached_tokens)
        self.requests += 1
        self.prefilled += prefilled
        self.decoded += answer.completion_tokens
        self.predicted_prefilled += predicted[0]
        self.predicted_decoded += predicted[1]
        self.predicted_s += predicted[2]
        if answer.tier in costs.tiers:
            self.modelled_s += costs.seconds(answer.tier, prefilled, answer.completion_tokens)
        self.generate_s += answer.generate_s
        split = answer.split
        if split is not None:
            self.split_requests += 1
            self.split_prefilled += prefilled
            self.split_decoded += answer.completion_tokens
            self.prefill_s += split[0]
            self.decode_s += split[1]


@dataclass
class CalibratedPairs:
    """Sums over the served requests that phase calibrate also timed (``ValidationPoint.calibrated_*``)."""

    requests: int = 0
    pipeline_s: float = 0.0
    fastest_s: float = 0.0
    mean_s: float = 0.0

    def add(self, pipeline_s: float, calibration_runs: Sequence[float]) -> None:
        if not calibration_runs or pipeline_s <= 0:
            return
        self.requests += 1
        self.pipeline_s += pipeline_s
        self.fastest_s += min(calibration_runs)
        self.mean_s += sum(calibration_runs) / len(calibration_runs)


def validate_system(base: Settings, scorer: WorkloadScorer, spec: PipelineRun, choices: dict[str, Choice],
                    items: Sequence[TaskItem], work_dir: Path, *, timeout_s: float = 1800.0,
                    generate_workers: int = 1) -> ValidationPoint:
    """Serve ``items`` through the real pipeline set up as ``spec``, in order, and compare with the cost
    model's prediction for ``choices`` (module docstring); the prediction credits the tiers' prefix
    caches as the scorer does."""
    from streams.batch import run_batch

    run = scorer.run
    data_dir = _data_dir(work_dir, spec.system)
    with serving_pipeline(base, run, spec, data_dir, timeout_s, generate_workers) as live:
        main_in = data_dir / "requests.jsonl"
        # Custom ids carry the position: a repeated request is served (and counted) again.
        main_in.write_text("".join(_batch_line(_custom_id(n, item), item.prompt, run.workload.max_tokens) + "\n"
                                   for n, item in enumerate(items)))
        summary = asyncio.run(asyncio.wait_for(
            run_batch(live, main_in, data_dir / "requests.out.jsonl", progress=True), timeout_s))
    served = read_answers(data_dir / "requests.out.jsonl")
    generate_s = sum(answer.generate_s for answer in served.values())
    same = 0
    predicted_generate = 0.0
    calibrated = CalibratedPairs()
    work: dict[str, TierWork] = {}
    modelled = scorer.served(choices, items)
    for n, (item, result, cost, reused) in enumerate(modelled):
        choice = choices[item.id]
        answer = served.get(_custom_id(n, item), ServedAnswer("", "", {}))
        if choice.cached_index is not None:
            entries = run.replayed_examples() if choice.replayed_cache else run.examples()
            same += answer.text.strip() == entries[choice.cached_index].response.strip()
            continue
        predicted_generate += cost
        if answer.text:
            work.setdefault(answer.tier, TierWork()).add(
                answer, scorer.costs, (max(1, result.prompt_tokens - reused), result.completion_tokens, cost))
        generation = run.generation(item, run.arm_for(item, result.arm))
        if answer.text.strip() == generation.text.strip():  # the same work as the timed runs
            same += 1
            calibrated.add(answer.generate_s, run.cache.timing_seconds(generation.key))
    by_tier: dict[str, int] = {}
    for answer in served.values():
        by_tier[answer.tier] = by_tier.get(answer.tier, 0) + 1
    n = len(items)
    predicted = tier_makespan(work_by_tier(scorer.service(modelled)), scorer.costs.shared_cpu_slowdown)
    return ValidationPoint(system=spec.system, requests=n, measured_s=summary.wall_s, predicted_s=predicted,
                           measured_rps=n / summary.wall_s, predicted_rps=n / predicted, same_answers=same,
                           by_tier=by_tier, generate_s=generate_s, predicted_generate_s=predicted_generate,
                           calibrated_requests=calibrated.requests, calibrated_pipeline_s=calibrated.pipeline_s,
                           calibrated_fastest_s=calibrated.fastest_s, calibrated_mean_s=calibrated.mean_s,
                           workload=run.workload.name, work={tier: asdict(w) for tier, w in sorted(work.items())})


async def _serve_paced(settings: Settings, requests: Sequence[RequestRecord], offsets: Sequence[float],
                       stall_timeout_s: float) -> dict[str, ResponseRecord]:
    """Send each request at its offset (stamped ``submitted_at`` then) and collect every response."""
    from streams.kafka_io import RequestProducer, ResponseCollector, create_topics
    from streams.records import ResponseRecord

    await create_topics(settings)
    wanted = {r.request_id for r in requests}
    responses: dict[str, ResponseRecord] = {}
    async with ResponseCollector(settings) as collector, RequestProducer(settings) as producer:
        async def send_on_schedule() -> None:
            started = time.monotonic()
            deliveries = []
            for request, offset in zip(requests, offsets, strict=True):
                await asyncio.sleep(max(0.0, started + offset - time.monotonic()))
                deliveries.append(await producer.send(request.model_copy(update={"submitted_at": time.time()})))
            await asyncio.gather(*deliveries)

        sender = asyncio.create_task(send_on_schedule())
        last_progress = time.monotonic()
        try:
            async for batch in collector.batches():
                for item in batch:
                    if isinstance(item, ResponseRecord) and item.request_id in wanted:
                        responses.setdefault(item.request_id, item)
                        last_progress = time.monotonic()
                if len(responses) == len(wanted):
                    break
                if sender.done() and time.monotonic() - last_progress > stall_timeout_s:
                    raise RuntimeError(f"no response for {stall_timeout_s:.0f}s; "
                                       f"{len(wanted) - len(responses)} request(s) unanswered")
            await sender
        finally:
            sender.cancel()
    return responses


def measure_latency(base: Settings, scorer: WorkloadScorer, items: Sequence[TaskItem], work_dir: Path, *,
                    spec: PipelineRun, choices: dict[str, Choice], rate_rps: float, load: float, seed: int = 0,
                    timeout_s: float = 1800.0, generate_workers: int = 1) -> LatencyPoint:
    """Serve ``items`` through the real pipeline as a Poisson stream at ``rate_rps`` (``load`` times
    always-large's measured capacity) and report the latency each request saw, submission to answer,
    next to the cost model's queues fed the same stream with ``choices`` (the pipeline's decisions)."""
    from streams.records import RequestRecord

    run = scorer.run
    data_dir = _data_dir(work_dir, spec.system, f"@{load:g}")
    requests = [RequestRecord.model_validate({
        "request_id": f"paced-{n:04d}-{item.id}", "tenant": EVAL_TENANT, "custom_id": _custom_id(n, item),
        "messages": [{"role": "user", "content": item.prompt}], "max_tokens": run.workload.max_tokens,
        "temperature": 0.0}) for n, item in enumerate(items)]
    arrivals = poisson_arrivals(len(requests), rate_rps, seed)
    offsets = (arrivals - arrivals[0]).tolist()  # the first request is sent at once
    with serving_pipeline(base, run, spec, data_dir, timeout_s, generate_workers) as live:
        log.info("%s: %d requests at %.3f req/s (%.2fx always-large's capacity)", spec.system, len(requests),
                 rate_rps, load)
        responses = asyncio.run(asyncio.wait_for(_serve_paced(live, requests, offsets, 600.0), timeout_s))
    answered = [r for r in responses.values() if r.ok]
    modelled = queue_latencies(offsets, scorer.service(scorer.served(choices, items)),
                               slowdown=scorer.costs.shared_cpu_slowdown)
    latencies = sorted(r.finished_at - r.submitted_at for r in answered)
    by_tier: dict[str, int] = {}
    for r in answered:
        by_tier[r.tier or "?"] = by_tier.get(r.tier or "?", 0) + 1
    return LatencyPoint(system=spec.system, load=load, rate_rps=rate_rps, requests=len(requests),
                        errors=len(requests) - len(answered),
                        p50_s=float(np.percentile(latencies, 50)) if latencies else float("nan"),
                        p99_s=float(np.percentile(latencies, 99)) if latencies else float("nan"),
                        mean_s=float(np.mean(latencies)) if latencies else float("nan"), by_tier=by_tier,
                        predicted_p50_s=float(np.percentile(modelled, 50)),
                        predicted_p99_s=float(np.percentile(modelled, 99)), predicted_mean_s=float(np.mean(modelled)),
                        workload=scorer.run.workload.name)
