"""Does the embedded broker slow down as it fills? A chain of 5 hops through Tansu, no EchoLM.

Why: in a 600 s all-in-one load run (``bench/bench_load.py --topology all``) the p50 latency creeps
from ~0.28 s to ~0.33 s, and restarting the worker mid-run (``--restart-at``) does not bring it back:
whatever grows outlives the worker. Tansu keeps every topic in memory with no retention. Here one
consumer reads the topics t0..t4 (as the all-in-one worker reads every stage's topic) and forwards each
record to the next topic; a client sends 20 records/s (3.6 KB, like a pipeline record) into t0 and
times their arrival on t5. Measured three times: with empty topics, after filling each topic with
12,000 records (what the 600 s load run leaves: ~61,000 records in all), and after 36,000 more.

    python bench/probe_broker_growth.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from streams.broker import EmbeddedBroker  # noqa: E402

HOPS = 5
TOPICS = [f"t{i}" for i in range(HOPS + 1)]
PAYLOAD = os.urandom(1800).hex()  # ~3.6 KB per record, as the pipeline's


async def forward(bootstrap: str, group: str, stop: asyncio.Event) -> None:
    """The chain: one consumer of t0..t4 sends each record on to the next topic (acks=all, as faust)."""
    consumer = AIOKafkaConsumer(*TOPICS[:-1], bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="latest", fetch_max_wait_ms=50, auto_commit_interval_ms=1000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            sends = []
            for tp, records in (await consumer.getmany(timeout_ms=100, max_records=100)).items():
                following = TOPICS[TOPICS.index(tp.topic) + 1]
                sends += [await producer.send(following, r.value, key=r.key) for r in records]
            if sends:
                await asyncio.gather(*sends)
    finally:
        await consumer.stop()
        await producer.stop()


async def measure(bootstrap: str, tag: str, seconds: float = 60.0, rate: float = 20.0) -> None:
    stop = asyncio.Event()
    chain = asyncio.create_task(forward(bootstrap, f"chain-{tag}", stop))
    arrivals = AIOKafkaConsumer(TOPICS[-1], bootstrap_servers=bootstrap, group_id=f"client-{tag}",
                                auto_offset_reset="latest", fetch_max_wait_ms=50)
    await arrivals.start()
    await asyncio.sleep(8)  # both groups joined
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()

    async def send() -> None:
        started = time.monotonic()
        for i in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            await producer.send(TOPICS[0], json.dumps({"t": time.time(), "p": PAYLOAD}).encode(), key=str(i).encode())

    sender = asyncio.create_task(send())
    latencies = []
    end = time.monotonic() + seconds + 5
    while time.monotonic() < end:
        batch = await arrivals.getmany(timeout_ms=200)
        now = time.time()
        for records in batch.values():
            for record in records:
                sent = json.loads(record.value)["t"]
                if sent:  # filler records (t = 0) are not timed
                    latencies.append(now - sent)
    await sender
    stop.set()
    await chain
    await arrivals.stop()
    await producer.stop()
    latencies.sort()
    print(f"{tag}: {len(latencies)} records timed, p50 {1000 * latencies[len(latencies) // 2]:.1f} ms, "
          f"p90 {1000 * latencies[int(len(latencies) * 0.9)]:.1f} ms", flush=True)


async def fill(bootstrap: str, per_topic: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    value = json.dumps({"t": 0, "p": PAYLOAD}).encode()
    for topic in TOPICS:
        await asyncio.gather(*[await producer.send(topic, value, key=str(i).encode()) for i in range(per_topic)])
    await producer.stop()


async def main(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(t, 4, 1) for t in TOPICS])
    await admin.close()
    await measure(bootstrap, "empty topics")
    await fill(bootstrap, 12_000)
    await measure(bootstrap, "12,000 records per topic")
    await fill(bootstrap, 24_000)
    await measure(bootstrap, "36,000 records per topic")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:
        asyncio.run(main(broker.bootstrap))
