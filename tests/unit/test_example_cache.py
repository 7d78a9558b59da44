import asyncio

import numpy as np
import pytest

from echolm.domain import Example
from echolm.protocols import CacheEvent, ExampleCandidate
from echolm.retrieval.example_cache import ExampleCache
from echolm.testing import HashingEmbedder, InMemoryHistoryStore

DIM = 64
EMBED = HashingEmbedder(DIM)


def example(example_id: int, tenant: str = "a", prompt: str = "how do I reverse a list", version: int = 1) -> Example:
    return Example(id=example_id, tenant=tenant, prompt=prompt, response=f"answer {example_id} v{version}",
                   model="large-model", tier="large", version=version)


def add(seq: int, ex: Example) -> CacheEvent:
    return CacheEvent(seq=seq, op="add", example=ex, embedding=EMBED.embed([ex.prompt])[0])


def remove(seq: int, ex: Example) -> CacheEvent:
    return CacheEvent(seq=seq, op="remove", example=ex, embedding=None)


def query(cache: ExampleCache, tenant: str, text: str, k: int = 5, min_similarity: float = -1.0):
    return cache.search(tenant, EMBED.embed([text]), k, min_similarity)[0]


def test_a_tenant_never_sees_another_tenants_example_even_for_identical_text():
    cache = ExampleCache(DIM)
    text = "what is the capital of france"
    cache.apply([add(1, example(1, tenant="a", prompt=text))])

    assert query(cache, "b", text) == []
    cache.apply([add(2, example(2, tenant="b", prompt=text))])

    hits_a, hits_b = query(cache, "a", text), query(cache, "b", text)
    assert [h.example.id for h in hits_a] == [1] and [h.example.id for h in hits_b] == [2]
    assert hits_b[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert cache.size("a") == cache.size("b") == 1 and len(cache) == 2


def test_hits_are_sorted_by_similarity_and_filtered_by_the_minimum():
    cache = ExampleCache(DIM)
    prompts = ["sort a list of numbers in python", "sort a list of words", "bake bread at home tonight"]
    cache.apply([add(i + 1, example(i + 1, prompt=p)) for i, p in enumerate(prompts)])

    hits = query(cache, "a", "sort a list of numbers in python")
    assert [h.example.id for h in hits][:2] == [1, 2]
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)

    close = query(cache, "a", "sort a list of numbers in python", min_similarity=0.5)
    assert {h.example.id for h in close} == {1, 2}
    assert all(h.similarity >= 0.5 for h in close)


def test_reapplying_events_is_a_no_op():
    cache = ExampleCache(DIM)
    events = [add(1, example(1)), add(2, example(2, prompt="another question entirely")), remove(3, example(1))]

    first = cache.apply(events)
    second = cache.apply(events)

    assert (first.added, first.removed) == (1, 0)  # example 1's newest event is its removal
    assert (second.added, second.removed, second.ignored) == (0, 0, 3)
    assert len(cache) == 1 and cache.get(1) is None and cache.get(2) is not None
    assert cache.last_seq == 3


def test_remove_deletes_and_a_late_older_add_does_not_resurrect():
    cache = ExampleCache(DIM)
    cache.apply([add(1, example(1))])
    cache.apply([remove(2, example(1))])
    assert len(cache) == 0 and query(cache, "a", example(1).prompt) == []

    cache.apply([add(1, example(1))])  # the same add again, after its removal

    assert len(cache) == 0 and query(cache, "a", example(1).prompt) == []


def test_events_out_of_order_end_in_the_newest_state():
    cache = ExampleCache(DIM)
    cache.apply([remove(5, example(7))])
    cache.apply([add(4, example(7))])
    assert len(cache) == 0

    cache.apply([add(9, example(8, prompt="first version", version=1))])
    cache.apply([add(11, example(8, prompt="second version", version=2)),
                 add(10, example(8, prompt="stale version", version=1))])
    assert cache.get(8).version == 2 and cache.size("a") == 1
    assert query(cache, "a", "second version", k=1)[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_a_new_version_replaces_the_old_one_in_the_index():
    cache = ExampleCache(DIM)
    cache.apply([add(1, example(3, prompt="convert celsius to fahrenheit"))])
    cache.apply([add(2, example(3, prompt="parse a date string", version=2))])

    hits = query(cache, "a", "parse a date string")
    assert len(cache) == 1 and [h.example.version for h in hits] == [2]
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_an_invalid_event_is_skipped_without_blocking_the_others():
    cache = ExampleCache(DIM)
    broken = CacheEvent(seq=1, op="add", example=example(1), embedding=None)
    wrong_width = CacheEvent(seq=2, op="add", example=example(2), embedding=np.ones(DIM + 1, np.float32))
    result = cache.apply([broken, wrong_width, add(3, example(3, prompt="fine"))])
    assert result.added == 1 and result.ignored == 2 and len(cache) == 1


def test_search_rejects_vectors_of_the_wrong_width():
    cache = ExampleCache(DIM)
    with pytest.raises(ValueError, match="shape"):
        cache.search("a", np.ones((1, DIM - 1), np.float32), 3, 0.0)


def candidate(tenant: str, request_id: str, prompt: str) -> ExampleCandidate:
    return ExampleCandidate(tenant=tenant, source_request_id=request_id, prompt=prompt, response=f"re: {prompt}",
                            model="large-model", tier="large", embedding=EMBED.embed([prompt])[0])


async def test_sync_follows_the_history_store_and_a_cold_start_rebuilds_the_same_cache():
    history = InMemoryHistoryStore()
    ids = await history.admit_examples([candidate("a", "r1", "reverse a linked list"),
                                        candidate("a", "r2", "merge two sorted arrays"),
                                        candidate("b", "r3", "reverse a linked list")])
    cache = ExampleCache(DIM)
    assert await cache.sync_from(history) == 3
    assert cache.size("a") == 2 and cache.size("b") == 1

    await history.set_example_status([ids[0]], "evicted")
    new_id = await history.supersede_example(ids[1], response="better answer", model="large-model", tier="large")
    assert await cache.sync_from(history) == 3  # the eviction; the superseded version out, the new one in
    assert await cache.sync_from(history) == 0

    assert [h.example.id for h in query(cache, "a", "merge two sorted arrays")] == [new_id]
    assert query(cache, "a", "reverse a linked list", min_similarity=0.99) == []
    assert [h.example.id for h in query(cache, "b", "reverse a linked list")] == [ids[2]]

    cold = ExampleCache(DIM)
    await cold.sync_from(history, limit=2)  # pages through the whole log
    assert {e: cold.size(e) for e in ("a", "b")} == {e: cache.size(e) for e in ("a", "b")}
    assert cold.last_seq == cache.last_seq and cold.get(new_id).response == "better answer"


class HoleyHistory:
    """Events become visible out of seq order, as with concurrent PostgreSQL transactions."""

    def __init__(self) -> None:
        self.visible: list[CacheEvent] = []
        self.reads: list[int] = []

    async def cache_events_since(self, seq: int, limit: int = 10_000) -> list[CacheEvent]:
        self.reads.append(seq)
        return sorted((e for e in self.visible if e.seq > seq), key=lambda e: e.seq)[:limit]


async def test_an_event_committed_late_behind_a_newer_one_is_still_applied():
    history = HoleyHistory()
    history.visible = [add(1, example(1, prompt="one")), add(3, example(3, prompt="three"))]
    cache = ExampleCache(DIM)
    await cache.sync_from(history)  # type: ignore[arg-type]
    assert len(cache) == 2 and cache.floor == 1  # seq 2 is a hole: not given up yet

    history.visible.append(add(2, example(2, prompt="two")))
    await cache.sync_from(history)  # type: ignore[arg-type]

    assert history.reads == [0, 1] and len(cache) == 3 and cache.floor == 3
    await cache.sync_from(history)  # type: ignore[arg-type]
    assert history.reads[-1] == 3  # no hole left: reads only what is new


async def test_a_hole_is_given_up_after_its_time_to_live():
    history = HoleyHistory()
    history.visible = [add(1, example(1, prompt="one")), add(3, example(3, prompt="three"))]
    cache = ExampleCache(DIM, gap_ttl_s=0.0)
    await cache.sync_from(history)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    await cache.sync_from(history)  # type: ignore[arg-type]
    assert cache.floor == 3 and history.reads[-1] == 3


async def test_a_hung_history_store_times_out():
    class Hung:
        async def cache_events_since(self, seq: int, limit: int = 10_000) -> list[CacheEvent]:
            await asyncio.sleep(60)
            return []

    with pytest.raises(TimeoutError):
        await ExampleCache(DIM).sync_from(Hung(), timeout_s=0.05)  # type: ignore[arg-type]
