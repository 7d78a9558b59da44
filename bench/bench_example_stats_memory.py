"""The example-stats worker alone, fed far more responses than a load run sends: does its memory level off?

Under ``bench/bench_load.py --topology per-stage-full`` (20 requests/s for 300 s) the example-stats
worker was the one process whose RSS still rose (about 1.4-2.4 KB per request). This benchmark runs
that worker as a real ``echolm worker --stage example-stats`` process on an embedded Tansu broker and
a real history database (SQLite by default, ``--database-url`` for PostgreSQL), puts synthetic final
responses on the responses topic in rounds (each served with 1-3 cached examples, sizes varied like
real records), waits after each round until the worker has consumed everything, and prints the
worker's RSS against the number of responses it has handled, so a growth that stops (a cache filling
up) is told apart from one that goes on (a leak).

    python bench/bench_example_stats_memory.py                       # 40,000 responses, SQLite
    python bench/bench_example_stats_memory.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/echolm_bench
    python bench/bench_example_stats_memory.py --responses 100000 --round 5000 \
        --json bench/results/stats_sqlite.json --plot docs/figures/example_stats_memory.png \
        --overlay bench/results/stats_postgresql.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402

from bench.bench_load import echo_tiers, rss_bytes, scrape_workers, slope  # noqa: E402
from echolm.settings import ReplaySettings, Settings, TopicSettings  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.kafka_io import create_topics  # noqa: E402
from streams.records import ExampleRef, Message, ResponseRecord  # noqa: E402
from streams.worker import WorkerProcess  # noqa: E402


async def seed_examples(settings: Settings, tenant: str, count: int) -> list[int]:
    """Cache entries for the responses to refer to (random embeddings: nothing is retrieved here)."""
    from echolm.history.migrate import upgrade
    from echolm.history.store import SqlHistoryStore
    from echolm.protocols import ExampleCandidate

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await upgrade(settings.resolved_database_url, directory=settings.migrations_dir)
    store = SqlHistoryStore(settings.resolved_database_url)
    await store.start()
    try:
        rng = np.random.default_rng(0)
        candidates = [ExampleCandidate(tenant=tenant, source_request_id=f"{tenant}-seed-{i}", prompt=f"question {i}",
                                       response=f"answer {i}", model="echo-large", tier="large",
                                       embedding=rng.standard_normal(384).astype(np.float32))
                      for i in range(count)]
        return list(await store.admit_examples(candidates))
    finally:
        await store.aclose()


def text(rng: random.Random, low: int, high: int) -> str:
    return "x" * rng.randint(low, high)


def response(rng: random.Random, request_id: str, tenant: str, example_ids: list[int]) -> ResponseRecord:
    examples = [ExampleRef(id=example_id, similarity=round(rng.uniform(0.7, 1.0), 4), prompt=text(rng, 150, 700),
                           response=text(rng, 200, 1200), model="echo-large")
                for example_id in rng.sample(example_ids, rng.randint(1, 3))]
    return ResponseRecord(request_id=request_id, tenant=tenant, custom_id=None,
                          messages=[Message(role="user", content=text(rng, 100, 600))], text=text(rng, 50, 900),
                          tier="small" if rng.random() < 0.9 else "large", model="echo", examples=examples,
                          embedding_b64=text(rng, 2048, 2048), submitted_at=time.time())


async def feed(settings: Settings, tenant: str, example_ids: list[int], args: argparse.Namespace, pid: int,
               port: int) -> list[dict[str, float]]:
    rng = random.Random(args.seed)
    rows: list[dict[str, float]] = []
    prefix = uuid.uuid4().hex[:6]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        sent = 0
        baseline = await consumed(port)
        started = time.monotonic()
        while sent < args.responses:
            for _ in range(min(args.round, args.responses - sent)):
                record = response(rng, f"{prefix}-{sent}", tenant, example_ids)
                await producer.send(settings.topics.responses, key=record.request_id.encode(),
                                    value=record.model_dump_json().encode())
                sent += 1
            await producer.flush()
            deadline = time.monotonic() + args.round_timeout
            while await consumed(port) - baseline < sent:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker did not consume {sent} responses in time")
                await asyncio.sleep(0.5)
            await asyncio.sleep(args.settle_wait)  # one settle pass over the round's usages
            rss, _ = rss_bytes(pid)
            rows.append({"responses": sent, "rss_mib": rss / 2**20, "elapsed_s": time.monotonic() - started})
            print(f"{sent:8d} responses  rss {rss / 2**20:7.1f} MiB  ({rows[-1]['elapsed_s']:.0f} s)", flush=True)
    finally:
        await producer.stop()
    return rows


async def consumed(port: int) -> float:
    scrape = await asyncio.to_thread(scrape_workers, {"example-stats": port}, None)
    return scrape.consumed.get("example-stats", 0.0)


def slope_bytes_per_response(rows: list[dict[str, float]]) -> float:
    return slope([(r["responses"], r["rss_mib"] * 2**20) for r in rows[len(rows) // 2:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=40_000, help="responses to feed in all (default 40,000)")
    parser.add_argument("--round", type=int, default=2_000, help="responses per round between RSS samples")
    parser.add_argument("--examples", type=int, default=1_300, help="cache entries the responses refer to")
    parser.add_argument("--database-url", help="history database (default: SQLite in a temporary directory)")
    parser.add_argument("--settle-wait", type=float, default=6.0,
                        help="seconds to wait after a round so the settle timer (every 5 s) has run")
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--flat-threshold", type=float, default=256.0, help="bytes per response called flat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the samples here")
    parser.add_argument("--plot", type=Path, help="write a PNG of RSS against responses handled here")
    parser.add_argument("--overlay", type=Path, action="append", default=[],
                        help="a --json file of an earlier run to draw in the same plot (repeatable)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:
        prefix = f"stats{uuid.uuid4().hex[:6]}"
        port = free_port()
        settings = Settings(data_dir=Path(tmp) / "state", kafka_bootstrap=broker.bootstrap,
                            database_url=args.database_url, topics=TopicSettings(prefix=prefix, partitions=4),
                            consumer_group=prefix, tiers=echo_tiers(0.0, 8), log_level="WARNING",
                            replay=ReplaySettings(settle_after_s=0.0), metrics_port=port)
        example_ids = asyncio.run(seed_examples(settings, prefix, args.examples))
        asyncio.run(create_topics(settings))
        worker = WorkerProcess(settings, stage="example-stats", log_path=Path(tmp) / "worker.log")
        worker.start()
        try:
            assert worker.process is not None
            deadline = time.monotonic() + 120
            while not asyncio.run(consumed_ready(port)):
                if time.monotonic() > deadline or not worker.alive:
                    raise SystemExit(f"the worker did not start:\n{worker.tail()}")
                time.sleep(1)
            print(f"example-stats worker up (pid {worker.process.pid}); feeding {args.responses} responses ...")
            rows = asyncio.run(feed(settings, prefix, example_ids, args, worker.process.pid, port))
        finally:
            worker.stop()
    slope = slope_bytes_per_response(rows)
    verdict = "flat" if abs(slope) < args.flat_threshold else "GROWING"
    print(f"\nRSS {rows[0]['rss_mib']:.1f} MiB after the first round, peak {max(r['rss_mib'] for r in rows):.1f} MiB, "
          f"last {rows[-1]['rss_mib']:.1f} MiB; slope over the second half {slope:.1f} bytes/response: {verdict}")
    result = {"rows": rows, "slope_bytes_per_response": slope,
              "database": "postgresql" if args.database_url and args.database_url.startswith("postgres") else "sqlite"}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot([result, *(json.loads(path.read_text()) for path in args.overlay)], args.plot)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for result in results:
        rows = result["rows"]
        ax.plot([r["responses"] for r in rows], [r["rss_mib"] for r in rows], marker=".",
                label=f"{result['database']} ({result['slope_bytes_per_response']:.0f} B/response over the 2nd half)")
    ax.set_xlabel("responses handled by the example-stats worker")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("example-stats worker memory: bounded caches fill, then level off")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot: {path}")


async def consumed_ready(port: int) -> bool:
    """True once the worker serves its metrics (its agent may not have consumed anything yet)."""
    import httpx

    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=2)).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
