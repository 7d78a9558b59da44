"""The test doubles in ``echolm.testing`` honour the protocols' contracts.

(The history-store tests in tests/integration also run every behaviour against the in-memory store,
side by side with SQLite and PostgreSQL.)
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from echolm.domain import ChatMessage, RetrievedExample
from echolm.protocols import Embedder, ExampleCandidate, HistoryStore, ResponseLog, Router, RoutingContext
from echolm.testing import HashingEmbedder, InMemoryHistoryStore, StaticRouter

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def response_log(request_id: str, response: str = "answer", tenant: str = "acme") -> ResponseLog:
    return ResponseLog(
        request_id=request_id, tenant=tenant, custom_id=None, messages=(ChatMessage("user", "q"),),
        prompt_text="q", response=response, tier="large", model="m", example_ids=(np.int64(4),),
        example_similarities=(np.float32(0.5),), route_reason="r", route_score=np.float64(0.25),
        timings={"generate": 1.0}, prompt_tokens=1, completion_tokens=2, error_code=None, error_message=None,
        submitted_at=T0, finished_at=T0 + timedelta(seconds=1),
    )


def candidate(source: str, tenant: str = "acme") -> ExampleCandidate:
    return ExampleCandidate(tenant=tenant, source_request_id=source, prompt=f"p {source}", response=f"r {source}",
                            model="big", tier="large", embedding=np.full(4, 0.5, dtype=np.float32))


def test_doubles_satisfy_the_protocols() -> None:
    assert isinstance(InMemoryHistoryStore(), HistoryStore)
    assert isinstance(HashingEmbedder(), Embedder)
    assert isinstance(StaticRouter("small"), Router)


async def test_upsert_replaces_and_never_duplicates() -> None:
    store = InMemoryHistoryStore()
    await store.record_responses([response_log("r1", "first"), response_log("r2")])
    await store.record_responses([response_log("r1", "second")])
    assert await store.count_responses() == 2
    (row,) = await store.responses_for(["r1"])
    assert row.response == "second"
    # Stored as the SQL store returns it: plain Python numbers and lists.
    assert row.example_ids == [4] and type(row.example_ids[0]) is int
    assert type(row.route_score) is float and type(row.example_similarities[0]) is float
    assert await store.logged_request_ids(["r1", "r2", "r3"]) == {"r1", "r2"}


async def test_timestamps_come_back_in_utc() -> None:
    store = InMemoryHistoryStore()
    plus_two = timezone(timedelta(hours=2))
    naive = T0.replace(tzinfo=None)
    record = response_log("r1")
    await store.record_responses([replace(record, submitted_at=T0.astimezone(plus_two), finished_at=naive)])
    (row,) = await store.responses_for(["r1"])
    assert row.submitted_at.utcoffset() == timedelta(0) and row.submitted_at == T0
    assert row.finished_at == T0  # naive timestamps are taken to be UTC


async def test_admission_is_idempotent_per_tenant_and_source() -> None:
    store = InMemoryHistoryStore()
    ids = await store.admit_examples([candidate("s1"), candidate("s1"), candidate("s1", tenant="globex")])
    assert ids[0] == ids[1] != ids[2]
    assert await store.admit_examples([candidate("s1")]) == [ids[0]]
    events = await store.cache_events_since(0)
    assert [(e.op, e.example.id, e.example.tenant) for e in events] == [("add", ids[0], "acme"),
                                                                       ("add", ids[2], "globex")]
    assert events[0].embedding is not None and events[0].embedding.dtype == np.float32


async def test_events_are_ordered_and_follow_the_cursor() -> None:
    store = InMemoryHistoryStore()
    ids = await store.admit_examples([candidate(f"s{i}") for i in range(4)])
    assert await store.set_example_status([ids[2], ids[2]], "evicted") == [ids[2]]
    new_id = await store.supersede_example(ids[0], response="better", model="bigger", tier="large")
    events = await store.cache_events_since(0)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6, 7]
    assert [(e.op, e.example.id) for e in events[4:]] == [("remove", ids[2]), ("remove", ids[0]), ("add", new_id)]
    assert [e.embedding is None for e in events[4:]] == [True, True, False]
    assert [e.seq for e in await store.cache_events_since(5, limit=1)] == [6]
    assert [e.seq for e in await store.cache_events_since(5, overlap=2)] == [4, 5, 6, 7]
    assert (await store.examples_by_id([new_id]))[0].version == 2
    assert (await store.count_examples(), await store.count_examples(status=None)) == (3, 5)


async def test_reactivation_emits_add_and_bad_status_is_refused() -> None:
    store = InMemoryHistoryStore()
    (example_id,) = await store.admit_examples([candidate("s1")])
    await store.set_example_status([example_id], "evicted")
    assert await store.set_example_status([example_id], "active") == [example_id]
    assert [e.op for e in await store.cache_events_since(0)] == ["add", "remove", "add"]
    with pytest.raises(ValueError):
        await store.set_example_status([example_id], "gone")
    with pytest.raises(KeyError):
        await store.supersede_example(example_id + 100, response="x", model="m", tier="t")
    with pytest.raises(ValueError, match="1-d vector"):
        await store.admit_examples([ExampleCandidate("acme", "bad", "p", "r", "m", "t", embedding=np.zeros((2, 2)))])


async def test_concurrent_tasks_admit_each_source_once() -> None:
    store = InMemoryHistoryStore()
    batches = [[candidate(f"s{(i + offset) % 10}") for i in range(10)] for offset in range(5)]
    results = await asyncio.gather(*(store.admit_examples(batch) for batch in batches))
    assert all(sorted(ids) == sorted(results[0]) for ids in results)
    assert len(await store.cache_events_since(0)) == 10


def test_hashing_embedder_is_deterministic_normalised_and_similarity_preserving() -> None:
    embedder = HashingEmbedder(dimension=128)
    texts = ["Write a python function to reverse the words in a sentence.",
             "Write a python function that reverses the words of a sentence.",
             "Explain the causes of the French revolution in two sentences.",
             "", "!!!"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (5, 128) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(vectors, HashingEmbedder(dimension=128).embed(texts))
    paraphrase, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert paraphrase > 0.6 and paraphrase > unrelated + 0.3
    assert float(vectors[0] @ embedder.embed([texts[0].upper()])[0]) == pytest.approx(1.0)
    np.testing.assert_array_equal(vectors[3], vectors[4])  # no words: the same fixed unit vector
    assert embedder.embed([]).shape == (0, 128)
    with pytest.raises(ValueError):
        HashingEmbedder(dimension=1)


def test_static_router_always_picks_its_tier() -> None:
    router = StaticRouter("small", use_examples=False)
    context = RoutingContext(request_id="r", tenant="acme", prompt_chars=10,
                             examples=[RetrievedExample(example=None, similarity=0.9)])  # type: ignore[arg-type]
    decision = router.route(context)
    assert (decision.tier, decision.use_examples, decision.reason) == ("small", False, "static:small")
    assert decision.scores == {"small": 1.0}
