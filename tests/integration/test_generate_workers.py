"""Generate workers of one consumer group beside one worker for every other stage: the layout
``echolm eval --generate-workers N`` serves with (one process per core on a small machine). The tiers'
partitions are split between the generate workers, each generates a share, and every request is
answered once. Generation is the echo backend; the broker and the database are real."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from echolm.evaluation.validation import generate_worker_settings, wait_until_generating
from echolm.settings import Settings, TierSettings, TopicSettings
from streams.app import available_stages
from streams.batch import run_batch
from streams.broker import EmbeddedBroker, free_port
from streams.worker import WorkerProcess

pytestmark = pytest.mark.integration

TIERS = [
    TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0),
    TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False,
                 simulated_latency_s=0.05),
]
REQUESTS = 24


def generated(port: int) -> float:
    """Events this worker's generate stages consumed (its metrics)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "echolm_stage_events_total" and sample.labels.get("stage", "").startswith("generate"))


def serve(tmp_path: Path, postgres_url: str, examples: list[tuple[str, str]] | None = None,
          **update: object) -> tuple[list[dict], list[float]]:
    """REQUESTS batch requests through one front worker and two generate workers; returns the batch's
    output lines and how many generate events each generate worker consumed."""
    prefix = f"g{uuid.uuid4().hex[:8]}"
    with EmbeddedBroker(tmp_path / "broker") as broker:
        settings = Settings(data_dir=tmp_path / "state", kafka_bootstrap=broker.bootstrap, database_url=postgres_url,
                            topics=TopicSettings(prefix=prefix, partitions=4), consumer_group=prefix, tiers=TIERS,
                            router_policy="always-large", embedder_threads=1, log_level="WARNING").model_copy(
                                update=update)
        if examples:
            asyncio.run(seed_examples(settings, examples))
        front = WorkerProcess(settings, stage=",".join(s for s in available_stages() if s != "generate"),
                              log_path=tmp_path / "worker-front.log")
        ports = [free_port(), free_port()]
        per_worker = generate_worker_settings(settings, workers=2)
        generating = [WorkerProcess(per_worker.model_copy(update={"metrics_port": port}), stage="generate",
                                    log_path=tmp_path / f"worker-generate-{i}.log") for i, port in enumerate(ports)]
        workers = [front, *generating]
        try:
            for worker in workers:
                worker.start()
            wait_until_generating(generating, timeout_s=240)
            batch_in, batch_out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
            batch_in.write_text("".join(json.dumps({
                "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"Task {i}: add {i} and {2 * i}."}]}}) + "\n"
                for i in range(REQUESTS)))
            asyncio.run(asyncio.wait_for(run_batch(settings, batch_in, batch_out, progress=False), 240))
            shares = [generated(port) for port in ports]
            dead = [w.tail(30) for w in workers if not w.alive]
        finally:
            for worker in workers:
                worker.stop()
    assert not dead, dead
    lines = [json.loads(line) for line in batch_out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(REQUESTS))
    assert all(line["response"]["body"]["choices"] for line in lines), lines
    return lines, shares


async def seed_examples(settings: Settings, examples: list[tuple[str, str]]) -> None:
    """(prompt, answer) pairs admitted as the large tier's examples, embedded as the pipeline embeds."""
    from echolm.domain import ChatMessage
    from echolm.history.migrate import upgrade
    from echolm.history.store import SqlHistoryStore
    from echolm.history_import import HistoricalRecord, import_records
    from echolm.retrieval.embedder import SentenceTransformerEmbedder

    await upgrade(settings.resolved_database_url)
    store = SqlHistoryStore(settings.resolved_database_url)
    await store.start()
    try:
        records = [HistoricalRecord(request_id=f"seed-{i}", tenant="default", custom_id=None,
                                    messages=[ChatMessage("user", prompt)], response=answer, model="echo-large",
                                    tier="large") for i, (prompt, answer) in enumerate(examples)]
        await import_records(records, SentenceTransformerEmbedder(settings.embedder_model, num_threads=1), store,
                             admit=True)
    finally:
        await store.aclose()


def test_two_generate_workers_split_the_traffic_and_answer_each_request_once(tmp_path: Path,
                                                                             postgres_url: str) -> None:
    lines, shares = serve(tmp_path, postgres_url)
    assert {line["response"]["body"]["echolm"]["tier"] for line in lines} == {"large"}
    # Each worker holds two of the large topic's four partitions, and 24 distinct keys reach both.
    assert sum(shares) == REQUESTS, shares
    assert all(share > 0 for share in shares), shares


def test_first_example_affinity_keeps_requests_with_the_same_example_on_one_generate_worker(
        tmp_path: Path, empty_postgres_url: str) -> None:
    """Offloaded requests whose prompts start with the same example all reach the worker whose prefix
    cache holds it (echolm.affinity), where keyed by request id they would reach both."""
    lines, shares = serve(tmp_path, empty_postgres_url, examples=[("Task: add 3 and 4.", "7"),
                                                            ("Name the capital of France.", "Paris")],
                          router_policy="always-small", generate_affinity="first-example")
    echolm = [line["response"]["body"]["echolm"] for line in lines]
    assert {e["tier"] for e in echolm} == {"small"}
    first_examples = {e["examples"][0]["id"] for e in echolm}
    assert len(first_examples) == 1, echolm[:2]  # every request's nearest example is the "add" task
    assert sorted(shares) == [0, REQUESTS], shares
