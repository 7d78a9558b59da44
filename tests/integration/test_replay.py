"""The replay agent on real things: the SQL statistics (SQLite and PostgreSQL), SmolLM2 as the large
tier, the example cache fed by cache events, the CLI, and the streaming stages in a worker on Tansu."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from echolm.domain import ChatMessage
from echolm.history.example_stats_store import (
    ExampleUsage,
    SqlExampleStatsStore,
    UsagePolicy,
    no_feedback,
    tier_busy_seconds,
)
from echolm.history.migrate import upgrade
from echolm.history.store import SqlHistoryStore
from echolm.history.tables import ExampleRow
from echolm.protocols import ExampleCandidate, ResponseLog
from echolm.replay import HistoryLoadProbe, replay_service_from_settings
from echolm.retrieval.example_cache import ExampleCache
from echolm.settings import ReplaySettings, Settings, TierSettings, TopicSettings
from streams.records import ExampleRef, Message, ResponseRecord
from streams.replay_stage import ExampleStatsStage

pytestmark = pytest.mark.integration

POLICY = UsagePolicy(tier_costs={"small": 1 / 3, "large": 1.0})
WEAK_PROMPT = "What is 2 + 2? Answer with just the number."
SMOLLM = "smollm2-135m-instruct"


def unit_vector(seed: int, dimension: int = 8) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    return vector / np.linalg.norm(vector)


def candidate(source: str, prompt: str, response: str, seed: int, tenant: str = "acme",
              dimension: int = 8) -> ExampleCandidate:
    return ExampleCandidate(tenant=tenant, source_request_id=source, prompt=prompt, response=response,
                            model="old-model", tier="large", embedding=unit_vector(seed, dimension))


def response_log(request_id: str, tier: str, example_ids: list[int], *, generate_s: float = 0.5,
                 finished_at: datetime | None = None, error: bool = False) -> ResponseLog:
    finished = finished_at or datetime.now(UTC)
    return ResponseLog(
        request_id=request_id, tenant="acme", custom_id=None, messages=[ChatMessage("user", "q")], prompt_text="q",
        response=None if error else "an answer", tier=tier, model="m", example_ids=example_ids,
        example_similarities=[0.9] * len(example_ids), route_reason="test", route_score=1.0,
        timings={"generate": generate_s}, prompt_tokens=1, completion_tokens=1,
        error_code="generation_failed" if error else None, error_message=None,
        submitted_at=finished - timedelta(seconds=generate_s), finished_at=finished)


# ------------------------------------------------------------------ statistics on SQL


async def test_usages_settle_once_into_gain_uses_and_decayed_offloads(history: SqlHistoryStore) -> None:
    run = uuid.uuid4().hex[:8]  # usage markers outlive the PostgreSQL fixture's truncation
    ids = await history.admit_examples([candidate(f"s{i}", f"prompt {i}", "answer", seed=i) for i in range(3)])
    stats = SqlExampleStatsStore(history)
    usages = [ExampleUsage(f"{run}-a", "acme", "small", (ids[0], ids[1]), True),
              ExampleUsage(f"{run}-b", "acme", "small", (ids[0],), True),
              ExampleUsage(f"{run}-c", "acme", "large", (ids[2],), False)]
    assert await stats.record_usages(usages) == 3
    assert await stats.record_usages(usages[:2]) == 0  # redelivery: already recorded

    async def quality_of(recorded):
        return {f"{run}-b": 0.1} if any(u.request_id == f"{run}-b" for u in recorded) else {}  # a judged loss: a use, but not a successful offload

    # Two settlers at once (two workers): every usage is folded exactly once.
    other = SqlHistoryStore(history.database_url)
    try:
        reports = await asyncio.wait_for(asyncio.gather(
            stats.settle_usages(POLICY, quality_of, settle_after=timedelta(0)),
            SqlExampleStatsStore(other).settle_usages(POLICY, quality_of, settle_after=timedelta(0))), 60)
    finally:
        await other.aclose()
    assert sum(r.usages for r in reports) == 3

    found = await stats.stats_for(ids)
    assert found[ids[0]].uses == 2 and found[ids[1]].uses == 1 and found[ids[2]].uses == 1
    assert found[ids[0]].gain == pytest.approx(0.5 / 3 + 0.2 * (0.9 / 3 - 0.5 / 3))
    assert found[ids[0]].offload_value == pytest.approx(1.0)
    assert found[ids[2]].offload_value == 0.0 and found[ids[2]].gain == pytest.approx(0.5)
    assert [s.example_id for s in await stats.gain_candidates()] == [ids[2], ids[0], ids[1]]
    uses = await _lifetime_uses(history, ids)
    assert uses == {ids[0]: 2, ids[1]: 1, ids[2]: 1}

    # A replay that writes a new version: it inherits the offload value and counts a round.
    new_id = await history.supersede_example(ids[0], response="better", model="m", tier="large", quality=0.9)
    await stats.mark_replayed(ids[0], new_id, score=0.9)
    after = (await stats.stats_for([new_id]))[new_id]
    assert (after.replay_rounds, after.uses, after.gain) == (1, 0, 0.0)
    assert after.offload_value == pytest.approx(1.0, rel=1e-3) and after.last_replay_score == 0.9
    assert ids[0] not in [s.example_id for s in await stats.gain_candidates()]  # superseded: not a candidate


async def _lifetime_uses(history: SqlHistoryStore, ids: list[int]) -> dict[int, int]:
    async with history._read() as connection:  # noqa: SLF001
        rows = await connection.execute(select(ExampleRow.id, ExampleRow.uses).where(ExampleRow.id.in_(ids)))
        return {int(r.id): int(r.uses) for r in rows}


async def test_load_probe_reads_the_tier_busy_fraction_from_the_history(history: SqlHistoryStore) -> None:
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:8]
    await history.record_responses([
        response_log(f"{run}-1", "large", [], generate_s=6.0, finished_at=now - timedelta(seconds=2)),
        response_log(f"{run}-2", "large", [], generate_s=3.0, finished_at=now - timedelta(seconds=1), error=True),
        response_log(f"{run}-3", "small", [], generate_s=9.0, finished_at=now - timedelta(seconds=1)),
        response_log(f"{run}-4", "large", [], generate_s=5.0, finished_at=now - timedelta(seconds=300)),
        # started before the window: only the part inside it counts
        response_log(f"{run}-5", "large", [], generate_s=50.0, finished_at=now - timedelta(seconds=25)),
    ])
    busy = await tier_busy_seconds(history, "large", now - timedelta(seconds=30))
    assert busy == pytest.approx(6.0 + 3.0 + 5.0, abs=0.05)

    async def busy_seconds(since: datetime) -> float:
        return await tier_busy_seconds(history, "large", since)

    probe = HistoryLoadProbe(busy_seconds, tier="large", window_s=30.0, concurrency=2, clock=now.timestamp)
    assert await probe() == pytest.approx(14.0 / 60.0, abs=0.01)
    idle = HistoryLoadProbe(busy_seconds, tier="large", window_s=30.0,
                            clock=lambda: (now + timedelta(hours=1)).timestamp())
    assert await idle() == 0.0


# ------------------------------------------------------------------ a replay round with a real LLM


def smollm_settings(tmp_path: Path, database_url: str, **replay: object) -> Settings:
    tiers = [TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0),
             TierSettings(name="large", model=SMOLLM, relative_cost=3.0, use_examples=False, n_ctx=2048,
                          max_tokens=32, n_threads=2, timeout_s=60)]
    references = tmp_path / "references.jsonl"
    references.write_text(json.dumps({"prompt": WEAK_PROMPT, "reference": "4", "kind": "numeric"}) + "\n")
    values: dict[str, object] = {"samples": 2, "temperature": 0.0, "references_path": references,
                                 "settle_after_s": 0.0}
    values.update(replay)
    return Settings(data_dir=tmp_path, database_url=database_url, tiers=tiers, log_level="WARNING",
                    replay=ReplaySettings(**values))


def offloaded_response(request_id: str, example_id: int) -> ResponseRecord:
    ref = ExampleRef(id=example_id, similarity=0.93, prompt=WEAK_PROMPT, response="I am not sure.", model="old-model")
    return ResponseRecord(request_id=request_id, tenant="acme", custom_id=None,
                          messages=[Message(role="user", content="What's 2 + 2?")], text="5", tier="small",
                          model="echo-small", examples=[ref], submitted_at=time.time())


@pytest.mark.slow
async def test_an_idle_replay_round_upgrades_a_weak_entry_end_to_end(tmp_path: Path, database_url: str) -> None:
    settings = smollm_settings(tmp_path, database_url)
    history = SqlHistoryStore(database_url)
    await history.start()
    from echolm.generation.factory import make_generator

    generator = make_generator(settings.tier("large"), settings)
    try:
        [weak_id, other_id] = await history.admit_examples([
            candidate("weak", WEAK_PROMPT, "I am not sure.", seed=1),
            candidate("fine", "Name a colour.", "Blue.", seed=2)])
        cache = ExampleCache(8)
        await cache.sync_from(history)
        assert cache.search("acme", unit_vector(1)[None, :], 1)[0][0].example.response == "I am not sure."

        # Three offloaded responses used the weak entry; the stage records them once however often delivered.
        stage = ExampleStatsStage(settings, SqlExampleStatsStore(history))
        run = uuid.uuid4().hex[:8]  # usage markers outlive the PostgreSQL fixture's truncation
        responses = [offloaded_response(f"{run}-used-{i}", weak_id) for i in range(3)]
        await stage.process(responses)
        await stage.process(responses[:1])
        await stage.settle()

        service = replay_service_from_settings(settings, history, generator)
        started = time.monotonic()
        report = await service.run_round()
        elapsed = time.monotonic() - started

        assert report.idle and report.considered == 1
        [outcome] = report.outcomes
        assert outcome.status == "upgraded", outcome
        assert outcome.judge == "verifier" and (outcome.score_before, outcome.score_best) == (0.0, 1.0)
        [old, new] = await history.examples_by_id([weak_id, outcome.new_example_id])
        assert "4" in new.response and new.model == SMOLLM and new.version == 2 and new.quality == 1.0
        async with history._read() as connection:  # noqa: SLF001
            rows = {r.id: r for r in await connection.execute(
                select(ExampleRow.id, ExampleRow.status, ExampleRow.parent_id).where(ExampleRow.id.in_([weak_id, new.id])))}
        assert rows[weak_id].status == "superseded" and rows[new.id].parent_id == weak_id
        events = await history.cache_events_since(cache.last_seq)
        assert [(e.op, e.example.id) for e in events] == [("remove", weak_id), ("add", new.id)]

        await cache.sync_from(history)  # what every retriever's timer does
        [hit] = cache.search("acme", unit_vector(1)[None, :], 1)[0]
        assert hit.example.id == new.id and hit.example.response == new.response
        assert (await SqlExampleStatsStore(history).stats_for([new.id]))[new.id].replay_rounds == 1
        print(f"\nreplay round with SmolLM2 (2 samples + verifier): {elapsed:.2f} s")

        # The new version has not been used yet, the other entry never was: nothing else pays.
        assert (await service.run_round()).outcomes == []
    finally:
        await generator.aclose()
        await history.aclose()


@pytest.mark.slow
def test_cli_replays_historical_logs_with_a_summary(tmp_path: Path) -> None:
    from echolm.cli import app

    url = f"sqlite+aiosqlite:///{tmp_path / 'echolm.db'}"
    settings = smollm_settings(tmp_path, url)

    async def seed() -> int:
        await upgrade(url)
        history = SqlHistoryStore(url)
        try:
            [weak_id] = await history.admit_examples([candidate("weak", WEAK_PROMPT, "No idea, sorry.", seed=3)])
            await history.record_responses([response_log(f"h{i}", "small", [weak_id],
                                                         finished_at=datetime.now(UTC) - timedelta(hours=2))
                                             for i in range(3)])
            return weak_id
        finally:
            await history.aclose()

    weak_id = asyncio.run(seed())
    env = {"ECHOLM_DATABASE_URL": url, "ECHOLM_DATA_DIR": str(tmp_path),
           "ECHOLM_TIERS": json.dumps([t.model_dump(mode="json") for t in settings.tiers]),
           "ECHOLM_REPLAY": settings.replay.model_dump_json(), "ECHOLM_LOG_LEVEL": "WARNING"}
    runner = CliRunner()

    dry = runner.invoke(app, ["replay", "--from-history", "--dry-run", "--no-progress"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "planned" in dry.output and "history_usages               3" in dry.output

    summary_path = tmp_path / "summary.json"
    result = runner.invoke(app, ["replay", "--from-history", "--limit", "1", "--no-progress",
                                 "--summary-json", str(summary_path)], env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(summary_path.read_text())
    assert summary["new_usages"] == 0  # the dry run recorded them already: nothing counted twice
    assert (summary["examples_considered"], summary["replayed"], summary["upgraded"]) == (1, 1, 1)
    assert (summary["judge_verifier_mean_before"], summary["judge_verifier_mean_after"]) == (0.0, 1.0)
    assert summary["upgraded_entries"] == [f"{weak_id}->{weak_id + 1}"]
    assert "replay summary" in result.output


# ------------------------------------------------------------------ the streaming stages in a worker


def test_worker_replays_a_weak_entry_after_it_was_used(tmp_path: Path) -> None:
    """The example-stats and replay stages of an `echolm worker` (echo tiers, heuristic judge): a paraphrase
    is offloaded with the weak entry, its use is recorded and settled, the idle large tier replays the entry,
    and the next request retrieves the new version without a restart."""
    from echolm.retrieval.embedder import SentenceTransformerEmbedder
    from streams.batch import run_batch
    from streams.broker import EmbeddedBroker
    from streams.worker import WorkerProcess

    prompt = "Write a python function to reverse the words in a sentence."
    paraphrase = "Write a python function that reverses the words of a sentence."
    tiers = [TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0),
             TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False)]
    prefix = f"t{uuid.uuid4().hex[:8]}"

    with EmbeddedBroker(tmp_path / "broker") as broker:
        settings = Settings(data_dir=tmp_path / "state", kafka_bootstrap=broker.bootstrap,
                            topics=TopicSettings(prefix=prefix, partitions=2), consumer_group=prefix, tiers=tiers,
                            log_level="WARNING", embedder_threads=1,
                            replay=ReplaySettings(interval_s=1.0, settle_after_s=0.0, samples=1, judge="heuristic"))

        async def seed() -> int:
            await upgrade(settings.resolved_database_url)
            history = SqlHistoryStore(settings.resolved_database_url)
            try:
                vector = SentenceTransformerEmbedder(settings.embedder_model, num_threads=1).embed([prompt])[0]
                [weak] = await history.admit_examples([ExampleCandidate(
                    tenant="default", source_request_id="weak", prompt=prompt, response="no idea",
                    model="old-model", tier="large", embedding=vector)])
                return weak
            finally:
                await history.aclose()

        weak_id = asyncio.run(seed())
        worker = WorkerProcess(settings, log_path=tmp_path / "worker.log")
        worker.start()
        try:
            first = _ask(settings, tmp_path, "first", paraphrase)
            assert first["tier"] == "small" and first["examples"][0]["id"] == weak_id
            new_id = asyncio.run(_wait_for_new_version(settings, weak_id, timeout_s=60))
            assert new_id is not None, worker.tail(40)
            # Retrievers learn of the new version by polling cache events (cache_sync_interval_s), so a
            # request sent the instant the row is written may still see the old one: eventual, not instant.
            served_ids = []
            for attempt in range(5):
                second = _ask(settings, tmp_path, f"second-{attempt}", paraphrase)
                served_ids.append(second["examples"][0]["id"])
                if served_ids[-1] == new_id:
                    break
                time.sleep(settings.cache_sync_interval_s * 2)
            assert served_ids[-1] == new_id, (served_ids, worker.tail(40))
        finally:
            worker.stop()


def _ask(settings: Settings, tmp_path: Path, name: str, prompt: str) -> dict:
    from streams.batch import run_batch

    source = tmp_path / f"{name}.jsonl"
    source.write_text(json.dumps({"custom_id": name, "body": {"messages": [{"role": "user", "content": prompt}],
                                                            "max_tokens": 24}}) + "\n")
    out = tmp_path / f"{name}.out.jsonl"
    asyncio.run(run_batch(settings, source, out, stall_timeout_s=120, progress=False))
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    return line["response"]["body"]["echolm"]


async def _wait_for_new_version(settings: Settings, example_id: int, timeout_s: float) -> int | None:
    history = SqlHistoryStore(settings.resolved_database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            async with history._read() as connection:  # noqa: SLF001
                row = (await connection.execute(select(ExampleRow.id).where(ExampleRow.parent_id == example_id))).first()
            if row is not None:
                return int(row.id)
            await asyncio.sleep(0.5)
        return None
    finally:
        await history.aclose()


async def test_replay_waits_while_a_tier_sharing_the_machine_is_busy(tmp_path: Path, database_url: str) -> None:
    """idle_scope "all-tiers" (the default): llama.cpp tiers share the CPU, so a busy small tier keeps the
    large tier's replay waiting; with "tier" only the replay tier's own load counts."""
    from echolm.generation.factory import make_generator

    in_flight = {"small": 1.0, "large": 0.0}  # the small tier is generating; the large one is idle

    def probe(tier: str) -> Callable[[], float]:
        return lambda: in_flight[tier]

    history = SqlHistoryStore(database_url)
    await history.start()
    shared = smollm_settings(tmp_path, database_url)
    own = shared.model_copy(update={"replay": shared.replay.model_copy(update={"idle_scope": "tier"})})
    generator = make_generator(shared.tier("large"), shared)  # loads lazily: never used by these rounds
    try:
        waiting = await replay_service_from_settings(shared, history, generator, in_flight=probe).run_round()
        assert not waiting.idle and waiting.load >= 1.0 and waiting.outcomes == []
        alone = await replay_service_from_settings(own, history, generator, in_flight=probe).run_round()
        assert alone.idle and alone.load == 0.0
    finally:
        await generator.aclose()
        await history.aclose()
