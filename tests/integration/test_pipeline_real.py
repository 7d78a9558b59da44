"""User-facing paths on the real thing: real LLMs through the pipeline, PostgreSQL as the history,
`echolm import-history`, and the CLI commands exactly as a user types them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from echolm.history.migrate import upgrade
from echolm.settings import TierSettings
from streams.broker import EmbeddedBroker
from streams.kafka_io import ResponseCollector, create_topics
from streams.local import run_local_batch
from streams.worker import WorkerProcess, settings_env
from tests.integration.test_pipeline import (
    ECHO_TIERS,
    batch_line,
    history_rows,
    make_settings,
    read_output,
    write_lines,
)

pytestmark = pytest.mark.integration

SMOLLM = "smollm2-135m-instruct"
REAL_TIERS = [
    TierSettings(name="small", model=SMOLLM, relative_cost=1.0, n_ctx=2048, max_tokens=24, use_examples=True),
    TierSettings(name="large", model=SMOLLM, relative_cost=3.0, n_ctx=2048, max_tokens=24, use_examples=False),
]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.mark.slow
def test_real_llm_answers_and_offloads_with_examples(tmp_path, broker):
    """SmolLM2 serves both tiers (the real 0.5B/1.5B pair is exercised by `echolm demo`)."""
    settings = make_settings(tmp_path, broker.bootstrap, tiers=REAL_TIERS)
    warm = write_lines(tmp_path / "warm.jsonl", [batch_line("w", "What is the capital of France?")])
    run_local_batch(settings.model_copy(update={"router_policy": "always-large"}), warm,
                    tmp_path / "warm.out.jsonl", workers=1, progress=False, stall_timeout_s=300)
    ask = write_lines(tmp_path / "ask.jsonl", [batch_line("a", "What's the capital city of France?")])
    out = tmp_path / "ask.out.jsonl"
    summary = run_local_batch(settings, ask, out, workers=1, progress=False, stall_timeout_s=300)
    assert summary.answered == 1 and summary.errors == 0
    body = read_output(out)[0]["response"]["body"]
    assert body["model"] == SMOLLM
    assert body["choices"][0]["message"]["content"].strip()
    assert body["echolm"]["tier"] == "small" and body["echolm"]["examples"]
    assert 0 < body["usage"]["completion_tokens"] <= 24
    # The examples were really prepended: the small tier's prompt is longer than the question alone.
    assert body["usage"]["prompt_tokens"] > 60


def test_batch_with_postgresql_history(tmp_path, broker, clean_postgres_url):
    settings = make_settings(tmp_path, broker.bootstrap, database_url=clean_postgres_url)
    lines = [batch_line(f"pg{i}", f"Postgres question {i}: name a prime above {i * 10}.") for i in range(5)]
    out = tmp_path / "out.jsonl"
    summary = run_local_batch(settings.model_copy(update={"router_policy": "always-large"}),
                              write_lines(tmp_path / "in.jsonl", lines), out, workers=1, progress=False,
                              stall_timeout_s=120)
    assert summary.answered == 5 and summary.logged == 5
    ids = [r["response"]["request_id"] for r in read_output(out)]
    rows, examples = asyncio.run(history_rows(settings, ids))
    assert sorted(r.request_id for r in rows) == sorted(ids)
    assert all(r.tier == "large" and r.response for r in rows)
    assert examples == 5


def _cli(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "echolm.cli", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def test_import_history_then_batch_uses_the_imported_examples(tmp_path, broker):
    settings = make_settings(tmp_path, broker.bootstrap)
    env = settings_env(settings)
    logs = tmp_path / "logs.jsonl"
    logs.write_text("\n".join([
        json.dumps({"prompt": "How do I reverse a list in Python?", "response": "Use reversed(xs) or xs[::-1].",
                    "model": "big-model"}),
        json.dumps({"custom_id": "old-1", "body": {"messages": [{"role": "user", "content": "What is 12 * 12?"}]},
                    "response": {"status_code": 200, "body": {"choices": [{"message": {"content": "144"}}]}}}),
        "not json at all",
        json.dumps({"prompt": "no answer here"}),
    ]) + "\n")
    result = _cli("import-history", str(logs), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"imported": 2, "admitted_examples": 2, "rejected": 2}
    assert "rejected line 3: not valid JSON" in result.stderr
    assert "rejected line 4: needs a non-empty 'response'" in result.stderr

    out = tmp_path / "out.jsonl"
    run_local_batch(settings, write_lines(tmp_path / "in.jsonl", [batch_line("q", "How can I reverse a Python list?")]),
                    out, workers=1, progress=False, stall_timeout_s=120)
    body = read_output(out)[0]["response"]["body"]
    assert body["echolm"]["tier"] == "small" and len(body["echolm"]["examples"]) == 1


def test_cli_produce_and_worker_as_a_user_runs_them(tmp_path, broker):
    settings = make_settings(tmp_path, broker.bootstrap, tiers=ECHO_TIERS)
    env = settings_env(settings)
    asyncio.run(upgrade(settings.resolved_database_url))
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log")  # runs `python -m echolm.cli worker`
    worker.start()
    lines = "\n".join([batch_line("c1", "First produced question?"), "{broken",
                       json.dumps({"request_id": "native-1", "messages": [{"role": "user", "content": "Native?"}]})])

    async def produce_and_collect() -> dict:
        async with ResponseCollector(settings) as collector:
            result = await asyncio.to_thread(_cli, "produce", "-", env=env, stdin=lines)
            assert result.returncode == 1  # one line was rejected
            assert "rejected line 2: not valid JSON" in result.stderr
            assert json.loads(result.stdout.strip().splitlines()[-1])["sent"] == 2
            seen = {}
            deadline = time.monotonic() + 120
            async for batch in collector.batches():
                seen.update({r.custom_id or r.request_id: r for r in batch})
                if len(seen) >= 2 or time.monotonic() > deadline:
                    return seen

    try:
        seen = asyncio.run(produce_and_collect())
    finally:
        worker.stop()
    assert set(seen) == {"c1", "native-1"}
    assert all(r.ok and r.text.startswith("echo: ") for r in seen.values())
    help_text = _cli("batch", "--help", env=env).stdout
    assert "--output" in help_text and "resume" in help_text.lower()
