"""The whole pipeline on the real thing: Tansu broker, faust workers in child processes, SQLite or
PostgreSQL, the real MiniLM embedder; generation by the trivial echo backend (wiring and fault tests)
or a real small LLM (the end-to-end test)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from echolm.history.store import SqlHistoryStore
from echolm.settings import Settings, TierSettings, TopicSettings
from streams.batch import run_batch
from streams.broker import EmbeddedBroker
from streams.kafka_io import RequestProducer, ResponseCollector, create_topics
from streams.local import run_local_batch
from streams.records import DeadLetterRecord
from streams.worker import WorkerProcess

pytestmark = pytest.mark.integration

ECHO_TIERS = [
    TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0, use_examples=True),
    TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False),
]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


def make_settings(tmp_path: Path, bootstrap: str | None, tiers=ECHO_TIERS, **overrides) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    values = dict(
        data_dir=tmp_path / "state", kafka_bootstrap=bootstrap,
        topics=TopicSettings(prefix=prefix, partitions=2), consumer_group=prefix, tiers=tiers,
        admit_from_tiers=["large"], offload_min_similarity=0.8, log_level="WARNING",
    )
    values.update(overrides)
    return Settings(**values)


def batch_line(custom_id: str, prompt: str, tenant: str | None = None, max_tokens: int = 24) -> str:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}}
    if tenant:
        line["tenant"] = tenant
    return json.dumps(line)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def history_rows(settings: Settings, request_ids: list[str]):
    store = SqlHistoryStore(settings.resolved_database_url)
    await store.start()
    try:
        return await store.responses_for(request_ids), await store.count_examples()
    finally:
        await store.aclose()


QUESTIONS = [
    "Write a python function to reverse the words in a sentence.",
    "Write a python function to count the vowels in a string.",
    "Write a python function to check whether a number is prime.",
]
PARAPHRASES = [
    "Write a python function that reverses the words of a sentence.",
    "Write a python function that counts vowels in a given string.",
    "Write a python function to test whether a number is a prime number.",
]


def test_batch_answers_every_line_logs_history_and_admits_examples(tmp_path, broker):
    settings = make_settings(tmp_path, broker.bootstrap)
    warm = write_lines(tmp_path / "warm.jsonl", [batch_line(f"w{i}", q) for i, q in enumerate(QUESTIONS)])
    summary = run_local_batch(settings.model_copy(update={"router_policy": "always-large"}), warm,
                              tmp_path / "warm.out.jsonl", workers=1, progress=False, stall_timeout_s=120)
    assert summary.answered == 3 and summary.errors == 0 and summary.by_tier == {"large": 3}
    assert summary.logged == 3

    lines = [batch_line(f"p{i}", q) for i, q in enumerate(PARAPHRASES)]
    lines += [batch_line("unrelated", "Explain the causes of the French revolution in two sentences.")]
    lines += ["{this is not json", json.dumps({"custom_id": "nomsg", "body": {"messages": []}})]
    served = write_lines(tmp_path / "serve.jsonl", lines)
    out = tmp_path / "serve.out.jsonl"
    summary = run_local_batch(settings, served, out, workers=1, progress=False, stall_timeout_s=120)

    records = read_output(out)
    assert len(records) == len(lines)  # exactly one output line per input line
    by_custom = {r["custom_id"]: r for r in records if r["custom_id"]}
    for i in range(3):
        body = by_custom[f"p{i}"]["response"]["body"]
        assert body["echolm"]["tier"] == "small", body["echolm"]
        assert body["echolm"]["examples"], "a close cached example must have been prepended"
        assert body["echolm"]["examples"][0]["similarity"] >= 0.8
    assert by_custom["unrelated"]["response"]["body"]["echolm"]["tier"] == "large"
    errors = [r for r in records if r["error"]]
    assert len(errors) == 2 and all(r["error"]["code"] == "invalid_request" for r in errors)
    assert any("not valid JSON" in r["error"]["message"] for r in errors)
    assert summary.offloaded_with_examples == 3

    request_ids = [r["response"]["request_id"] for r in records if r["response"]]
    rows, examples = asyncio.run(history_rows(settings, request_ids))
    assert len(rows) == 4
    offloaded = [row for row in rows if row.tier == "small"]
    assert len(offloaded) == 3 and all(row.example_ids and row.example_similarities for row in offloaded)
    assert all(row.route_reason for row in rows)
    assert examples == 4  # 3 warm-up answers + the unrelated request answered by the large tier


def test_with_reuse_on_an_exact_repeat_is_answered_verbatim_and_a_near_duplicate_is_generated(tmp_path, broker):
    settings = make_settings(tmp_path, broker.bootstrap, reuse_min_similarity=0.995)
    warm = write_lines(tmp_path / "warm.jsonl", [batch_line(f"w{i}", q) for i, q in enumerate(QUESTIONS)])
    first = tmp_path / "warm.out.jsonl"
    run_local_batch(settings.model_copy(update={"router_policy": "always-large"}), warm, first, workers=1,
                    progress=False, stall_timeout_s=120)
    cached = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in read_output(first)}
    # Vowels -> consonants: close (MiniLM cosine 0.85) but another task; it needs a new answer.
    ask = write_lines(tmp_path / "ask.jsonl", [batch_line("repeat", QUESTIONS[0]),
                                               batch_line("near", "Write a python function to count the consonants in a string.")])
    out = tmp_path / "ask.out.jsonl"
    summary = run_local_batch(settings, ask, out, workers=1, progress=False, stall_timeout_s=120)
    assert summary.answered == 2 and summary.errors == 0 and summary.by_tier == {"cache": 1, "small": 1}
    by_custom = {r["custom_id"]: r["response"] for r in read_output(out)}
    repeat = by_custom["repeat"]["body"]
    assert repeat["choices"][0]["message"]["content"] == cached["w0"]  # the large tier's answer, verbatim
    assert repeat["echolm"]["tier"] == "cache" and repeat["echolm"]["examples"][0]["similarity"] >= 0.995
    assert by_custom["near"]["body"]["echolm"]["tier"] == "small"
    rows, examples = asyncio.run(history_rows(settings, [by_custom["repeat"]["request_id"]]))
    assert [row.tier for row in rows] == ["cache"] and rows[0].route_reason.startswith("verbatim reuse")
    assert examples == 3  # the reused answer was not admitted a second time


def test_rerun_resumes_without_duplicates(tmp_path, broker):
    settings = make_settings(tmp_path, broker.bootstrap)
    lines = [batch_line(f"r{i}", f"Question number {i}: what is {i} squared?") for i in range(6)]
    source = write_lines(tmp_path / "in.jsonl", lines[:3])
    out = tmp_path / "out.jsonl"
    run_local_batch(settings, source, out, workers=1, progress=False, stall_timeout_s=120)
    with out.open("a") as handle:
        handle.write('{"id": "torn-by-a-crash"')  # a write cut off mid-line
    write_lines(source, lines)
    summary = run_local_batch(settings, source, out, workers=1, progress=False, stall_timeout_s=120)
    assert summary.skipped_done == 3 and summary.answered == 3
    ids = Counter(r["custom_id"] for r in read_output(out))
    assert ids == Counter({f"r{i}": 1 for i in range(6)})


def test_tenants_never_see_each_others_examples(tmp_path, broker):
    settings = make_settings(tmp_path, broker.bootstrap)
    prompt = "Write a python function to merge two sorted lists."
    warm = write_lines(tmp_path / "warm.jsonl", [batch_line("a-warm", prompt, tenant="acme")])
    run_local_batch(settings.model_copy(update={"router_policy": "always-large"}), warm,
                    tmp_path / "warm.out.jsonl", workers=1, progress=False, stall_timeout_s=120)
    ask = write_lines(tmp_path / "ask.jsonl", [batch_line("a-ask", prompt + " ", tenant="acme"),
                                               batch_line("b-ask", prompt + " ", tenant="globex")])
    out = tmp_path / "ask.out.jsonl"
    run_local_batch(settings, ask, out, workers=1, progress=False, stall_timeout_s=120)
    by_custom = {r["custom_id"]: r["response"]["body"] for r in read_output(out)}
    assert by_custom["a-ask"]["echolm"]["examples"], "same tenant: the cached example is used"
    assert by_custom["b-ask"]["echolm"]["examples"] == []
    assert by_custom["b-ask"]["echolm"]["tier"] == "large"
    assert "merge two sorted lists" not in json.dumps(by_custom["b-ask"]["echolm"])


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(tmp_path, broker):
    slow = [t.model_copy(update={"simulated_latency_s": 0.05}) for t in ECHO_TIERS]
    settings = make_settings(tmp_path, broker.bootstrap, tiers=slow, router_policy="always-large",
                             stage_batch_size=4)
    n = 60
    source = write_lines(tmp_path / "in.jsonl", [batch_line(f"k{i}", f"Task {i}: add {i} and {i}.") for i in range(n)])
    out = tmp_path / "out.jsonl"
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log")
    worker.start()
    killed = threading.Event()

    def kill_when_half_done() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.exists() and len(out.read_text().splitlines()) >= n // 3:
                os.kill(worker.process.pid, signal.SIGKILL)
                killed.set()
                worker.process.wait()
                worker.start()  # a fresh worker takes over the partitions; redelivery does the rest
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_half_done)
    killer.start()
    try:
        summary = asyncio.run(run_batch(settings, source, out, stall_timeout_s=120, progress=False))
    finally:
        killer.join()
        worker.stop()
    assert killed.is_set()
    records = read_output(out)
    assert Counter(r["custom_id"] for r in records) == Counter({f"k{i}": 1 for i in range(n)})
    assert all(r["error"] is None for r in records)
    assert summary.logged == n
    rows, _ = asyncio.run(history_rows(settings, [r["response"]["request_id"] for r in records]))
    assert len(rows) == n and len({row.request_id for row in rows}) == n


def test_garbage_on_the_requests_topic_gets_explicit_errors(tmp_path, broker):
    settings = make_settings(tmp_path, broker.bootstrap)

    async def scenario():
        await create_topics(settings)
        async with ResponseCollector(settings) as collector, \
                ResponseCollector(settings, settings.topics.dead_letter) as dead_letters:
            async with RequestProducer(settings) as producer:
                futures = [
                    await producer.send_raw(b"bad-json", b"{oops"),
                    await producer.send_raw(b"bad-utf8", b"\xff\xfe\x00"),
                    await producer.send_raw(b"bad-shape", json.dumps({"request_id": "x", "messages": "hi"}).encode()),
                    await producer.send_raw(b"too-long", json.dumps({
                        "request_id": "too-long", "messages": [{"role": "user", "content": "x" * 50_000}]}).encode()),
                ]
                await asyncio.gather(*futures)
            seen = {}
            deadline = time.monotonic() + 90
            async for batch in collector.batches():
                for response in batch:
                    seen[response.request_id] = response
                if len(seen) >= 4 or time.monotonic() > deadline:
                    break
            letters = {}
            async for batch in dead_letters.batches():
                for raw in batch:
                    letter = DeadLetterRecord.model_validate_json(raw)
                    letters[letter.request_id] = letter
                if len(letters) >= 4 or time.monotonic() > deadline:
                    return seen, letters

    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log")
    worker.start()
    try:
        seen, letters = asyncio.run(scenario())
    finally:
        worker.stop()
    assert set(seen) == {"bad-json", "bad-utf8", "bad-shape", "too-long"}
    # Operators get a dead-letter record for each, with the undecodable bytes kept.
    assert set(letters) == set(seen)
    assert base64.b64decode(letters["bad-utf8"].raw_b64) == b"\xff\xfe\x00"
    assert letters["too-long"].code.value == "prompt_too_long" and letters["too-long"].stage == "embed"
    assert {seen[k].error.code.value for k in ("bad-json", "bad-utf8", "bad-shape")} == {"invalid_request"}
    assert seen["too-long"].error.code.value == "prompt_too_long"
    assert "50000 characters" in seen["too-long"].error.message


def test_a_hanging_model_ends_in_a_timeout_error_and_the_pipeline_keeps_moving(tmp_path, broker):
    hanging = [
        TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0),
        TierSettings(name="large", backend="echo", model="echo-hangs", relative_cost=3.0, use_examples=False,
                     timeout_s=0.5, simulated_latency_s=30.0),
    ]
    settings = make_settings(tmp_path, broker.bootstrap, tiers=hanging)
    lines = [batch_line(f"h{i}", f"A question nobody asked before, number {i}.") for i in range(3)]
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    summary = run_local_batch(settings, write_lines(tmp_path / "in.jsonl", lines), out, workers=1, progress=False,
                              stall_timeout_s=120)
    assert summary.errors == 3 and summary.logged == 3
    records = read_output(out)
    assert {r["error"]["code"] for r in records} == {"generation_timeout"}
    assert all(r["error"]["stage"] == "generate.large" for r in records)
    assert time.monotonic() - started < 90  # three 0.5 s timeouts, not three 30 s hangs
    # The small tier, on the same worker, still answers.
    small = run_local_batch(settings.model_copy(update={"router_policy": "always-small"}),
                            write_lines(tmp_path / "in2.jsonl", [batch_line("s", "Still there?")]),
                            tmp_path / "out2.jsonl", workers=1, progress=False, stall_timeout_s=120)
    assert small.answered == 1
