"""The prefix index both the llama.cpp tiers' KV-state cache and the evaluation's replay of it use."""

from __future__ import annotations

import numpy as np

from echolm.prefix_index import PrefixIndex, common_prefix_length


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length(np.array([5]), [6]) == 0
    assert common_prefix_length([], [1]) == 0


def test_longest_finds_the_entry_sharing_most_and_returns_its_value() -> None:
    index: PrefixIndex[str] = PrefixIndex(capacity_bytes=100)
    index.keep([1, 2, 3, 4], "a", size=4)
    index.keep([1, 2, 9], "b", size=3)
    length, kept = index.longest([1, 2, 3, 7])
    assert (length, kept.value if kept else None) == (3, "a")
    assert index.longest([5, 5]) == (0, None)


def test_an_entry_must_beat_at_least_to_be_found() -> None:
    # The tiers pass the live context's shared length: a kept state is restored only when it beats it.
    index: PrefixIndex[str] = PrefixIndex(capacity_bytes=100)
    index.keep([1, 2, 3], "a", size=3)
    assert index.longest([1, 2, 3, 4], at_least=3) == (3, None)
    assert index.longest([1, 2, 3, 4], at_least=2)[0] == 3


def test_ties_go_to_the_least_recently_used_entry() -> None:
    index: PrefixIndex[str] = PrefixIndex(capacity_bytes=100)
    index.keep([1, 2, 8], "old", size=3)
    index.keep([1, 2, 9], "new", size=3)
    _, kept = index.longest([1, 2, 7])
    assert kept is not None and kept.value == "old"


def test_least_recently_used_entries_are_dropped_to_fit_and_a_hit_refreshes() -> None:
    index: PrefixIndex[str] = PrefixIndex(capacity_bytes=10)
    index.keep([1, 1], "one", size=5)
    index.keep([2, 2], "two", size=5)
    index.longest([1, 1, 5])  # refreshes "one"
    index.keep([3, 3], "three", size=5)  # drops "two"
    assert len(index) == 2 and index.bytes_used == 10
    assert index.longest([2, 2]) == (0, None)
    assert index.longest([1, 1])[0] == 2


def test_keeping_a_sequence_again_replaces_it_and_an_oversized_entry_is_refused() -> None:
    index: PrefixIndex[str] = PrefixIndex(capacity_bytes=10)
    index.keep([1, 2], "first", size=4)
    index.keep([1, 2], "second", size=6)
    assert len(index) == 1 and index.bytes_used == 6
    _, kept = index.longest([1, 2])
    assert kept is not None and kept.value == "second"
    assert not index.fits(11)
    index.keep([7, 7], "huge", size=11)
    assert len(index) == 1 and index.bytes_used == 6


def test_kept_tokens_are_a_copy() -> None:
    # The tiers pass a view of llama.cpp's live token buffer, which the next generation overwrites.
    live = np.array([1, 2, 3])
    index: PrefixIndex[None] = PrefixIndex(capacity_bytes=10)
    index.keep(live, None, size=3)
    live[:] = 0
    assert index.longest([1, 2, 3])[0] == 3


def test_prefix_lengths_agree_with_one_comparison_per_entry() -> None:
    from echolm.prefix_index import prefix_lengths

    rng = np.random.default_rng(0)
    header = rng.integers(0, 50, size=30)
    kept = [np.concatenate([header[: rng.integers(0, 31)], rng.integers(0, 3, size=rng.integers(0, 20))])
            for _ in range(200)]
    for _ in range(50):
        wanted = np.concatenate([header[: rng.integers(0, 31)], rng.integers(0, 3, size=rng.integers(0, 20))])
        assert prefix_lengths(kept, wanted).tolist() == [common_prefix_length(k, wanted) for k in kept]
    assert prefix_lengths([np.array([1, 2, 3])], np.array([], dtype=np.int64)).tolist() == [0]
