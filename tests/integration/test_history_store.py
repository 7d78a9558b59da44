"""The history store on real databases: SQLite files and the machine's PostgreSQL server.

The behavioural tests also run against ``echolm.testing.InMemoryHistoryStore``, so the test double
is held to exactly the semantics of the real store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from echolm.domain import ChatMessage, ExampleFeatures, RouteContext, RoutedExample
from echolm.history.migrate import (
    MigrationsNotFound,
    current_revision,
    downgrade,
    head_revision,
    migrations_dir,
    upgrade,
)
from echolm.history.store import SqlHistoryStore, make_engine
from echolm.history.tables import Base
from echolm.protocols import ExampleCandidate, HistoryStore, ResponseLog
from echolm.testing import InMemoryHistoryStore

pytestmark = pytest.mark.integration

HISTORY_TABLES = {"responses", "examples", "cache_events"}
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def sqlite_url(directory: Path) -> str:
    # A directory that does not exist yet: upgrade() must create it.
    return f"sqlite+aiosqlite:///{directory / 'state' / 'echolm.db'}"


def migrated_sqlite_url(directory: Path) -> str:
    url = sqlite_url(directory)
    asyncio.run(upgrade(url))
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("empty_postgres_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database."""
    if request.param == "sqlite":
        return migrated_sqlite_url(tmp_path)
    return str(request.getfixturevalue("clean_postgres_url"))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None for the in-memory double, else a migrated, empty database."""
    if request.param == "memory":
        return None
    if request.param == "sqlite":
        return migrated_sqlite_url(tmp_path)
    return str(request.getfixturevalue("clean_postgres_url"))


@pytest.fixture
async def store(backend: str | None) -> AsyncIterator[SqlHistoryStore | InMemoryHistoryStore]:
    history = InMemoryHistoryStore() if backend is None else SqlHistoryStore(backend)
    await history.start()
    yield history
    await history.aclose()


def response_log(request_id: str, *, tenant: str = "acme", response: str | None = "an answer",
                 tier: str | None = "large", **overrides: object) -> ResponseLog:
    fields: dict[str, object] = {
        "request_id": request_id, "tenant": tenant, "custom_id": f"custom-{request_id}",
        "messages": [ChatMessage("system", "be brief"), ChatMessage("user", f"question {request_id} — ünïcode ✓")],
        "prompt_text": f"question {request_id} — ünïcode ✓", "response": response, "tier": tier,
        "model": "qwen2.5-coder-1.5b-instruct", "example_ids": [3, 1], "example_similarities": [0.93, 0.81],
        "route_reason": "similarity>=0.8", "route_score": 0.875, "timings": {"embed": 0.01, "generate": 1.5},
        "prompt_tokens": 42, "cached_prompt_tokens": 30, "completion_tokens": 7, "error_code": None,
        "error_message": None,
        "submitted_at": T0, "finished_at": T0 + timedelta(seconds=2),
    }
    fields.update(overrides)
    return ResponseLog(**fields)  # type: ignore[arg-type]


def candidate(source: str, *, tenant: str = "acme", seed: int = 0, dimension: int = 8) -> ExampleCandidate:
    vector = np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    return ExampleCandidate(tenant=tenant, source_request_id=source, prompt=f"prompt of {source}",
                            response=f"response to {source}", model="big-model", tier="large",
                            embedding=vector / np.linalg.norm(vector), quality=0.75)


def schema_differences(connection) -> list:  # type: ignore[no-untyped-def]
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, Base.metadata)


# ------------------------------------------------------------------ migrations


async def test_migrations_apply_from_empty_and_match_the_models(empty_database_url: str) -> None:
    assert await current_revision(empty_database_url) is None
    await upgrade(empty_database_url)
    assert await current_revision(empty_database_url) == head_revision()
    await upgrade(empty_database_url)  # at head already: nothing to do, no error

    engine = make_engine(empty_database_url)
    try:
        async with engine.connect() as connection:
            tables = set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
            assert HISTORY_TABLES <= tables
            assert await connection.run_sync(schema_differences) == []
    finally:
        await engine.dispose()

    await downgrade(empty_database_url, "base")
    assert await current_revision(empty_database_url) is None
    engine = make_engine(empty_database_url)
    try:
        async with engine.connect() as connection:
            tables = set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
        assert not tables & HISTORY_TABLES
    finally:
        await engine.dispose()
    await upgrade(empty_database_url)
    assert await current_revision(empty_database_url) == head_revision()


async def test_concurrent_migrators_wait_for_each_other(empty_database_url: str) -> None:
    # Several workers start at once and each runs `echolm migrate`: none may fail.
    await asyncio.wait_for(asyncio.gather(*(upgrade(empty_database_url) for _ in range(3))), timeout=60)
    assert await current_revision(empty_database_url) == head_revision()


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    await upgrade(url)
    engine = make_engine(url, busy_timeout_s=7.5)
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"
            assert (await connection.execute(text("PRAGMA busy_timeout"))).scalar_one() == 7500
            assert (await connection.execute(text("PRAGMA foreign_keys"))).scalar_one() == 1
    finally:
        await engine.dispose()


# ------------------------------------------------------------------ responses


async def test_store_implements_the_protocol(store: HistoryStore) -> None:
    assert isinstance(store, HistoryStore)


async def test_response_round_trips_every_field(store: SqlHistoryStore) -> None:
    in_tokyo = timezone(timedelta(hours=9))
    failed = response_log("r-failed", response=None, tier=None, model=None, example_ids=[], example_similarities=[],
                          route_reason=None, route_score=None, timings={}, prompt_tokens=None, completion_tokens=None,
                          error_code="generation_timeout", error_message="took longer than 120 s",
                          custom_id=None, submitted_at=T0.astimezone(in_tokyo))
    answered = response_log("r-answered")
    await store.record_responses([answered, failed])

    got = await store.responses_for(["r-failed", "missing", "r-answered"])
    assert [r.request_id for r in got] == ["r-failed", "r-answered"]
    assert got[1] == answered
    # The same instant comes back, in UTC.
    assert got[0] == replace(failed, submitted_at=T0)
    assert got[0].submitted_at.tzinfo is not None and got[0].submitted_at.utcoffset() == timedelta(0)


ROUTE_CONTEXT = RouteContext(
    policy="bandit", tier="small", policy_version=4, explore=False, utilities={"small": 0.61, "large": 0.55},
    scores={"small": 0.61, "large": 0.21}, costs={"small": 1.0, "large": 2.8}, loads={"large": 2.2, "small": 0.1},
    load_tier="large", load=2.2, load_threshold=1.0, bias=0.12, prompt_chars=38, example_chars=410,
    examples=(RoutedExample(3, 0.93, 0.7, None), RoutedExample(1, 0.81, None, 0.9)),
    features=ExampleFeatures(2, 0.93, 0.87, 0.755, 0.7))


async def test_the_route_context_round_trips_and_rows_without_one_read_none(store: SqlHistoryStore) -> None:
    await store.record_responses([response_log("with", route_context=ROUTE_CONTEXT), response_log("without")])
    with_context, without = await store.responses_for(["with", "without"])
    assert with_context.route_context == ROUTE_CONTEXT
    assert without.route_context is None


async def test_rows_logged_before_migration_0004_keep_no_route_context(empty_database_url: str) -> None:
    from sqlalchemy import insert

    from echolm.history.store import _response_values
    from echolm.history.tables import ResponseRow

    await upgrade(empty_database_url, "0003")
    engine = make_engine(empty_database_url)
    try:
        async with engine.begin() as connection:  # a row as the 0003 schema wrote it: no route_context column
            values = _response_values(response_log("before-0004"), T0)
            del values["route_context"], values["cached_prompt_tokens"]  # 0004's and 0006's columns
            await connection.execute(insert(ResponseRow.__table__).values(**values))
    finally:
        await engine.dispose()
    await upgrade(empty_database_url)
    history = SqlHistoryStore(empty_database_url)
    try:
        (row,) = await history.responses_for(["before-0004"])
        assert row.route_context is None and row.route_reason == "similarity>=0.8"
        assert row.cached_prompt_tokens is None  # not reported before 0006
        await history.record_responses([response_log("after-0004", route_context=ROUTE_CONTEXT)])
        assert (await history.responses_for(["after-0004"]))[0].route_context == ROUTE_CONTEXT
    finally:
        await history.aclose()
    await downgrade(empty_database_url, "0003")  # the column goes, the rows stay
    assert await current_revision(empty_database_url) == "0003"
    engine = make_engine(empty_database_url)
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("responses")})
            count = (await connection.execute(text("SELECT count(*) FROM responses"))).scalar_one()
        assert "route_context" not in columns and count == 2
    finally:
        await engine.dispose()


async def test_upsert_is_idempotent_and_keeps_the_latest_content(store: SqlHistoryStore) -> None:
    first = response_log("r1", response="first answer", tier="small")
    redelivered = response_log("r1", response="second answer", tier="large", example_ids=[], timings={"generate": 9.0})
    await store.record_responses([first])
    await store.record_responses([redelivered, response_log("r2")])
    await store.record_responses([redelivered])  # at-least-once delivery: the same record again

    assert await store.count_responses() == 2
    (row,) = await store.responses_for(["r1"])
    assert (row.response, row.tier, list(row.example_ids)) == ("second answer", "large", [])
    assert row.timings == {"generate": 9.0}


async def test_last_record_of_a_request_wins_within_one_batch(store: SqlHistoryStore) -> None:
    await store.record_responses([response_log("r1", response="old"), response_log("r1", response="new")])
    assert [r.response for r in await store.responses_for(["r1"])] == ["new"]


async def test_logged_request_ids_and_counts_by_tenant(store: SqlHistoryStore) -> None:
    await store.record_responses([response_log("a1", tenant="acme"), response_log("a2", tenant="acme"),
                                  response_log("g1", tenant="globex")])
    assert await store.logged_request_ids(["a1", "g1", "nope", "a1"]) == {"a1", "g1"}
    assert await store.logged_request_ids([]) == set()
    assert (await store.count_responses(), await store.count_responses("acme"),
            await store.count_responses("globex"), await store.count_responses("initech")) == (3, 2, 1, 0)
    assert {r.request_id: r.tenant for r in await store.responses_for(["a1", "g1"])} == {"a1": "acme", "g1": "globex"}


async def test_many_ids_are_looked_up_in_chunks(store: SqlHistoryStore) -> None:
    ids = [f"bulk-{i}" for i in range(1_200)]
    await store.record_responses([response_log(i) for i in ids])
    assert await store.logged_request_ids(ids + ["absent"]) == set(ids)
    assert [r.request_id for r in await store.responses_for(ids[::-1])] == ids[::-1]


# ------------------------------------------------------------------ examples and cache events


async def test_admission_is_idempotent_and_emits_one_add_event_per_example(store: SqlHistoryStore) -> None:
    ids = await store.admit_examples([candidate("s1", seed=1), candidate("s2", seed=2), candidate("s1", seed=1)])
    assert ids[0] == ids[2] and ids[0] != ids[1]
    again = await store.admit_examples([candidate("s2", seed=2), candidate("s3", seed=3)])
    assert again[0] == ids[1] and again[1] not in ids

    events = await store.cache_events_since(0)
    assert [(e.op, e.example.id) for e in events] == [("add", ids[0]), ("add", ids[1]), ("add", again[1])]
    assert await store.count_examples() == 3
    for event, seed in zip(events, (1, 2, 3), strict=True):
        assert event.embedding is not None and event.embedding.dtype == np.float32
        np.testing.assert_array_equal(event.embedding, candidate("x", seed=seed).embedding)


async def test_same_source_request_in_two_tenants_is_two_examples(store: SqlHistoryStore) -> None:
    acme, globex = await store.admit_examples([candidate("shared", tenant="acme"),
                                               candidate("shared", tenant="globex")])
    assert acme != globex
    events = await store.cache_events_since(0)
    assert [(e.example.id, e.example.tenant) for e in events] == [(acme, "acme"), (globex, "globex")]
    counts = (await store.count_examples("acme"), await store.count_examples("globex"), await store.count_examples())
    assert counts == (1, 1, 2)
    examples = await store.examples_by_id([globex, 10_000, acme])
    assert [(e.id, e.tenant, e.prompt, e.response, e.model, e.tier, e.quality, e.version) for e in examples] == [
        (globex, "globex", "prompt of shared", "response to shared", "big-model", "large", 0.75, 1),
        (acme, "acme", "prompt of shared", "response to shared", "big-model", "large", 0.75, 1),
    ]


async def test_cache_events_since_orders_by_seq_and_honours_cursor_limit_and_overlap(store: SqlHistoryStore) -> None:
    ids = await store.admit_examples([candidate(f"s{i}", seed=i) for i in range(5)])
    await store.set_example_status([ids[1]], "evicted")
    everything = await store.cache_events_since(0)
    seqs = [e.seq for e in everything]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert [e.op for e in everything] == ["add"] * 5 + ["remove"]

    # A poller that pages with its cursor sees every event once, in order.
    seen, cursor = [], 0
    while page := await store.cache_events_since(cursor, limit=2):
        assert len(page) <= 2
        seen.extend(e.seq for e in page)
        cursor = page[-1].seq
    assert seen == seqs
    assert await store.cache_events_since(seqs[-1]) == []
    assert await store.cache_events_since(0, limit=0) == []

    reread = await store.cache_events_since(seqs[3], overlap=2)
    assert [e.seq for e in reread] == seqs[2:]


async def test_status_change_emits_remove_then_add_on_reactivation(store: SqlHistoryStore) -> None:
    ids = await store.admit_examples([candidate("keep", seed=1), candidate("evict", seed=2)])
    cursor = (await store.cache_events_since(0))[-1].seq

    assert await store.set_example_status([ids[1], 999_999], "evicted") == [ids[1]]
    assert await store.set_example_status([ids[1]], "evicted") == []  # already evicted: no second event
    removed = await store.cache_events_since(cursor)
    assert [(e.op, e.example.id, e.embedding) for e in removed] == [("remove", ids[1], None)]
    assert (await store.count_examples(), await store.count_examples(status="evicted"),
            await store.count_examples(status=None)) == (1, 1, 2)

    assert await store.set_example_status([ids[1]], "active") == [ids[1]]
    readded = await store.cache_events_since(removed[-1].seq)
    assert [(e.op, e.example.id) for e in readded] == [("add", ids[1])]
    assert readded[0].embedding is not None
    with pytest.raises(ValueError, match="status must be one of"):
        await store.set_example_status([ids[0]], "deleted")


async def test_supersede_adds_a_new_version_with_lineage(store: SqlHistoryStore) -> None:
    (old_id,) = await store.admit_examples([candidate("s1", seed=4)])
    new_id = await store.supersede_example(old_id, response="a better answer", model="bigger", tier="large",
                                           quality=0.9)
    events = await store.cache_events_since(1)
    assert [(e.op, e.example.id) for e in events] == [("remove", old_id), ("add", new_id)]
    new = events[1].example
    assert (new.version, new.response, new.model, new.quality, new.prompt) == (2, "a better answer", "bigger", 0.9,
                                                                               "prompt of s1")
    np.testing.assert_array_equal(events[1].embedding, candidate("x", seed=4).embedding)
    assert (await store.count_examples(), await store.count_examples(status="superseded")) == (1, 1)
    # Re-admitting the source request now answers with the newest version, without an event.
    assert await store.admit_examples([candidate("s1", seed=4)]) == [new_id]
    assert len(await store.cache_events_since(0)) == 3
    with pytest.raises(ValueError, match="only active"):
        await store.supersede_example(old_id, response="x", model="m", tier="large")
    with pytest.raises(KeyError):
        await store.supersede_example(123_456, response="x", model="m", tier="large")


# ------------------------------------------------------------------ several writers


async def test_concurrent_upserts_from_two_stores_do_not_fail(database_url: str) -> None:
    # Two stores = two connection pools, as a log stage in each of two processes.
    first, second = SqlHistoryStore(database_url), SqlHistoryStore(database_url)
    ids = [f"c{i}" for i in range(40)]

    async def writer(history: SqlHistoryStore, label: str) -> None:
        for round_no in range(10):
            batch = ids[round_no * 2:round_no * 2 + 20]  # overlapping batches, in both tasks
            await history.record_responses([response_log(i, response=f"{label}-{round_no}") for i in reversed(batch)])

    try:
        await asyncio.wait_for(asyncio.gather(writer(first, "a"), writer(second, "b")), timeout=60)
        assert await first.count_responses() == len(set(ids[:38]))
    finally:
        await first.aclose()
        await second.aclose()


async def test_concurrent_admission_and_polling_see_every_event_once(database_url: str) -> None:
    writers = [SqlHistoryStore(database_url) for _ in range(3)]
    poller = SqlHistoryStore(database_url)
    sources = [f"src{i}" for i in range(30)]
    done = asyncio.Event()

    async def admit(history: SqlHistoryStore, offset: int) -> None:
        order = sources[offset * 10:] + sources[:offset * 10]  # every writer admits every source
        for i in range(0, len(order), 3):
            await history.admit_examples([candidate(s, seed=int(s[3:])) for s in order[i:i + 3]])

    async def poll() -> list[int]:
        seen: list[int] = []
        cursor = 0
        while True:
            finished = done.is_set()
            page = await poller.cache_events_since(cursor)
            seen.extend(e.seq for e in page)
            cursor = page[-1].seq if page else cursor
            if finished and not page:
                return seen
            await asyncio.sleep(0.001)

    try:
        polling = asyncio.create_task(poll())
        await asyncio.wait_for(asyncio.gather(*(admit(w, n) for n, w in enumerate(writers))), timeout=60)
        done.set()
        seen = await asyncio.wait_for(polling, timeout=30)
        events = await poller.cache_events_since(0)
        assert seen == [e.seq for e in events]  # no event skipped, none seen twice
        assert len({e.example.id for e in events}) == len(events)  # one 'add' per example
        assert await poller.count_examples() == len(events)
    finally:
        for history in (*writers, poller):
            await history.aclose()


async def test_store_refuses_a_second_event_loop(database_url: str) -> None:
    history = SqlHistoryStore(database_url)
    await history.start()
    try:
        def in_other_loop() -> None:
            asyncio.run(history.count_responses())

        with pytest.raises(RuntimeError, match="another event loop"):
            await asyncio.to_thread(in_other_loop)
    finally:
        await history.aclose()


async def test_a_cache_change_waits_for_an_earlier_uncommitted_one(database_url: str) -> None:
    # The cursor contract: seq order must be commit order. A writer whose events are not committed
    # yet holds back every later cache change, so a poller can never pass over its seq.
    slow, fast, poller = (SqlHistoryStore(database_url) for _ in range(3))
    try:
        (first,) = await slow.admit_examples([candidate("first", seed=1)])
        cursor = (await poller.cache_events_since(0))[-1].seq
        async with slow._write() as connection:  # a transaction stalled between its event and its commit
            await slow._append_events(connection, [("remove", first, "acme")])
            later = asyncio.create_task(fast.admit_examples([candidate("later", seed=2)]))
            await asyncio.sleep(0.5)
            assert not later.done()
            assert await poller.cache_events_since(cursor) == []
        (second,) = await asyncio.wait_for(later, timeout=30)
        events = await poller.cache_events_since(cursor)
        assert [(e.op, e.example.id) for e in events] == [("remove", first), ("add", second)]
        assert events[0].seq < events[1].seq
    finally:
        for history in (slow, fast, poller):
            await history.aclose()


def test_missing_migrations_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationsNotFound, match="pip install -e"):
        migrations_dir(tmp_path / "not-a-checkout")
    assert (migrations_dir() / "versions").is_dir()


async def test_generation_timings_count_only_the_prefilled_prompt_tokens(store: SqlHistoryStore) -> None:
    """The router's token costs are fitted on prefilled tokens: those a prefix cache supplied are free."""
    from echolm.history.feedback_store import FeedbackStore

    if not isinstance(store, SqlHistoryStore):
        pytest.skip("FeedbackStore reads the SQL history")
    await store.record_responses([response_log("cached", tier="small"),  # 42 prompt tokens, 30 from the cache
                                  response_log("unreported", tier="small", cached_prompt_tokens=None)])
    timings = await FeedbackStore(store).generation_timings("small")
    assert sorted(t.prompt_tokens for t in timings) == [12, 42]


async def test_generation_timings_carry_the_backends_prefill_decode_split(store: SqlHistoryStore) -> None:
    from echolm.history.feedback_store import FeedbackStore

    if not isinstance(store, SqlHistoryStore):
        pytest.skip("FeedbackStore reads the SQL history")
    split = {"embed": 0.01, "generate": 1.5, "generate.prefill": 0.4, "generate.decode": 1.05}
    await store.record_responses([response_log("split", tier="small", timings=split),
                                  response_log("whole", tier="small")])
    timings = await FeedbackStore(store).generation_timings("small")
    assert sorted((t.prefill_seconds, t.decode_seconds) for t in timings if t.prefill_seconds) == [(0.4, 1.05)]
    assert [(t.prefill_seconds, t.decode_seconds) for t in timings if not t.prefill_seconds] == [(None, None)]
