"""Pipeline capacity: end-to-end requests/s through every topic and stage, next to the embedder's floor.

The generator is the trivial echo backend, so what is measured is EchoLM's own overhead: Kafka hops,
JSON records, embedding, retrieval, routing, history writes. The embedder's batched throughput,
measured in the same run on the same texts, is the ceiling the pipeline cannot beat (every request
is embedded once). Target: pipeline >= 80% of that floor.

    python bench/bench_pipeline.py --requests 2000 --cached 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.datasets import load_gsm8k  # noqa: E402
from echolm.settings import Settings, TierSettings, TopicSettings  # noqa: E402
from streams.broker import EmbeddedBroker  # noqa: E402
from streams.kafka_io import RequestProducer, ResponseCollector, create_topics  # noqa: E402
from streams.records import Message, RequestRecord  # noqa: E402
from streams.worker import WorkerProcess  # noqa: E402

ECHO_TIERS = [
    TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0, use_examples=True),
    TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False),
]


def texts(n: int, cache_dir: Path) -> list[str]:
    questions = [item.prompt for item in load_gsm8k(cache_dir)]
    return [f"{questions[i % len(questions)]} (variant {i // len(questions)})" for i in range(n)]


def embedder_floor(settings: Settings, sample: list[str]) -> float:
    from echolm.retrieval.embedder import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(settings.embedder_model, batch_size=settings.embed_batch_size,
                                           num_threads=settings.embedder_threads, dtype=settings.embedder_dtype)
    embedder.embed(sample[:64])
    started = time.perf_counter()
    for i in range(0, len(sample), settings.stage_batch_size):
        embedder.embed(sample[i:i + settings.stage_batch_size])
    return len(sample) / (time.perf_counter() - started)


async def seed_cache(settings: Settings, prompts: list[str]) -> None:
    from echolm.history.migrate import upgrade
    from echolm.history_import import HistoricalRecord, import_records
    from echolm.domain import ChatMessage
    from echolm.history.store import SqlHistoryStore
    from echolm.retrieval.embedder import SentenceTransformerEmbedder

    await upgrade(settings.resolved_database_url)
    if not prompts:
        return
    store = SqlHistoryStore(settings.resolved_database_url)
    await store.start()
    embedder = SentenceTransformerEmbedder(settings.embedder_model)
    records = [HistoricalRecord(request_id=f"seed-{i}", tenant=settings.default_tenant, custom_id=None,
                                messages=[ChatMessage("user", p)], response=f"answer {i}", model="seed",
                                tier="large") for i, p in enumerate(prompts)]
    for i in range(0, len(records), 256):
        await import_records(records[i:i + 256], embedder, store, admit=True)
    await store.aclose()


async def drive(settings: Settings, prompts: list[str], warmup: int) -> tuple[float, list[float]]:
    await create_topics(settings)
    run = uuid.uuid4().hex[:6]

    def request(i: int, text: str) -> RequestRecord:
        return RequestRecord(request_id=f"{run}-{i}", messages=[Message(role="user", content=text)], max_tokens=8)

    async with ResponseCollector(settings) as collector:
        async with RequestProducer(settings) as producer:
            # Warm-up: the worker has joined its groups and loaded its models once these come back.
            await producer.send_all(request(-1 - i, f"warm-up {i}") for i in range(warmup))
            await _collect(collector, warmup, timeout_s=300)
            started = time.perf_counter()
            await producer.send_all(request(i, t) for i, t in enumerate(prompts))
            latencies = await _collect(collector, len(prompts), timeout_s=600)
            elapsed = time.perf_counter() - started
    return elapsed, latencies


async def _collect(collector: ResponseCollector, n: int, timeout_s: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + timeout_s
    async for batch in collector.batches(timeout_s=0.5):
        for response in batch:
            if not isinstance(response, bytes):
                latencies.append(response.finished_at - response.submitted_at)
        if len(latencies) >= n:
            return latencies
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(latencies)} of {n} responses in {timeout_s}s")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests to push through (default 2000)")
    parser.add_argument("--cached", type=int, default=1000, help="examples in the cache before the run")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        settings = Settings(data_dir=Path(tmp) / "state", kafka_bootstrap=broker.bootstrap,
                            topics=TopicSettings(prefix=prefix, partitions=args.partitions),
                            consumer_group=prefix, tiers=ECHO_TIERS, log_level="WARNING")
        corpus = texts(args.requests + args.cached, settings.model_cache_dir)
        prompts, cached = corpus[:args.requests], corpus[args.requests:]
        asyncio.run(seed_cache(settings, cached))
        floor = embedder_floor(settings, prompts)
        worker = WorkerProcess(settings, log_path=Path(tmp) / "worker.log")
        worker.start()
        try:
            elapsed, latencies = asyncio.run(drive(settings, prompts, warmup=8))
        finally:
            worker.stop()
    rate = len(prompts) / elapsed
    latencies.sort()
    figures = {
        "requests": len(prompts), "cached_examples": len(cached), "partitions": args.partitions,
        "pipeline_rps": round(rate, 1), "embedder_floor_rps": round(floor, 1),
        "pipeline_vs_floor": round(rate / floor, 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
    }
    print("\npipeline capacity (echo generator, 1 worker running all stages, embedded Tansu, SQLite)")
    for key, value in figures.items():
        print(f"  {key:<22} {value}")
    print(f"  target: pipeline_vs_floor >= 0.80 -> {'met' if figures['pipeline_vs_floor'] >= 0.8 else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
