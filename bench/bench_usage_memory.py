"""The example-stats store alone: record and settle usages as the example-stats stage does, with batch
sizes varying like stage batches (1-32), on SQLite; prints RSS every 300 batches. Used to tell whether
that worker's memory trend under load (docs/benchmarks.md, "Sustained load") comes from its SQL.

    python bench/bench_usage_memory.py
"""
import asyncio, random, sys, tempfile, gc
from datetime import timedelta
sys.path.insert(0, ".")
import numpy as np
from echolm.history.migrate import upgrade
from echolm.history.store import SqlHistoryStore
from echolm.history.example_stats_store import SqlExampleStatsStore, ExampleUsage, FeedbackQualityLookup
from echolm.protocols import ExampleCandidate
from echolm.replay import usage_policy_from_settings
from echolm.settings import Settings

def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024

async def main():
    d = tempfile.mkdtemp()
    url = f"sqlite+aiosqlite:///{d}/h.db"
    await upgrade(url)
    history = SqlHistoryStore(url); await history.start()
    rng = np.random.default_rng(0)
    ids = await history.admit_examples([ExampleCandidate(tenant="t", source_request_id=f"s{i}", prompt=f"p{i}", response="r",
                                        model="m", tier="large", embedding=rng.standard_normal(384).astype(np.float32))
                                        for i in range(1300)])
    stats = SqlExampleStatsStore(history); quality = FeedbackQualityLookup(history)
    policy = usage_policy_from_settings(Settings(kafka_bootstrap="x:1"))
    r = random.Random(0); n = 0
    for step in range(1, 3001):
        batch = [ExampleUsage(f"r{n + i}", "t", "small", (r.choice(ids),), True) for i in range(r.randint(1, 32))]
        n += len(batch)
        await stats.record_usages(batch)
        if step % 5 == 0:
            await stats.settle_usages(policy, quality, settle_after=timedelta(0))
        if step % 300 == 0:
            gc.collect(); print(f"{n:6d} usages  rss {rss():7.1f} MiB", flush=True)
    await history.aclose()
asyncio.run(main())
