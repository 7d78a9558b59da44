"""The prefix-cache replay the cost model credits: shared prefixes, the last token, LRU by bytes."""

from __future__ import annotations

import pytest

from echolm.evaluation.prefix_reuse import KvFootprint, PrefixCredit, PrefixReuse, TierPrefixCache

ONE_BYTE = KvFootprint(bytes_per_token=1)


def test_a_prompt_reuses_the_longest_kept_prefix() -> None:
    cache = PrefixReuse(capacity_bytes=1_000, footprint=ONE_BYTE)
    assert cache.serve([1, 2, 3, 4, 5]) == 0  # empty cache
    assert cache.serve([9, 9]) == 0
    assert cache.serve([1, 2, 3, 7, 7, 7]) == 3  # shares 1, 2, 3 with the first
    assert cache.serve([1, 2, 3, 7, 7, 8]) == 5  # now also with the third


def test_an_exact_repeat_still_evaluates_its_last_token() -> None:
    cache = PrefixReuse(capacity_bytes=1_000, footprint=ONE_BYTE)
    cache.serve([1, 2, 3, 4])
    assert cache.serve([1, 2, 3, 4]) == 3
    assert cache.serve([1]) == 0


def test_least_recently_used_states_go_first_once_the_budget_is_spent() -> None:
    # Each state holds prompt + answer tokens: 4 + 1 bytes here; the budget holds two.
    cache = PrefixReuse(capacity_bytes=10, footprint=ONE_BYTE)
    cache.serve([1, 1, 1, 1], completion_tokens=1)
    cache.serve([2, 2, 2, 2], completion_tokens=1)
    assert cache.serve([1, 1, 1, 9], completion_tokens=1) == 3  # a hit refreshes [1,1,1,1]; [2,2,2,2] is dropped
    assert cache.serve([2, 2, 2, 9]) == 0
    assert cache.serve([1, 1, 1, 8]) == 3


def test_a_state_larger_than_the_budget_is_not_kept() -> None:
    cache = PrefixReuse(capacity_bytes=3, footprint=ONE_BYTE)
    cache.serve([1, 2, 3, 4])
    assert cache.serve([1, 2, 3, 5]) == 0


def test_footprint_of_qwen25_from_its_gguf_metadata() -> None:
    # Qwen2.5-Coder-0.5B: 24 layers, 14 heads of which 2 KV heads, 896 wide -> head size 64.
    metadata = {"general.architecture": "qwen2", "qwen2.block_count": "24", "qwen2.attention.head_count": "14",
                "qwen2.attention.head_count_kv": "2", "qwen2.embedding_length": "896"}
    footprint = KvFootprint.from_gguf_metadata(metadata)
    assert footprint.bytes_per_token == 24 * 2 * 64 * 2 * 2 + 12  # measured: 12,300 B per token


def test_credit_replays_each_tier_separately_and_restarts_per_system() -> None:
    calls: list[tuple[str, ...]] = []

    def tokens(messages):  # type: ignore[no-untyped-def]
        calls.append(tuple(messages))
        return [ord(c) for c in "".join(messages)]

    credit = PrefixCredit({"small": TierPrefixCache(1_000, ONE_BYTE, tokens)})
    credit.start()
    assert credit.reused("small", "a", ["abcd"], 0) == 0
    assert credit.reused("small", "b", ["abce"], 0) == 3
    assert credit.reused("large", "c", ["abcd"], 0) == 0  # no cache configured for this tier
    credit.start()  # the next system starts cold
    assert credit.reused("small", "b", ["abce"], 0) == 0
    assert len(calls) == 2  # tokens memoised by job key


@pytest.mark.parametrize("capacity", [0, 1])
def test_no_budget_no_reuse(capacity: int) -> None:
    cache = PrefixReuse(capacity_bytes=capacity, footprint=ONE_BYTE)
    cache.serve([1, 2, 3])
    assert cache.serve([1, 2, 3]) == 0
