"""Verbatim reuse: which example, if any, may answer a repeat without generation."""

from __future__ import annotations

import pytest

from echolm.domain import Example, RetrievedExample
from echolm.routing.reuse import reusable_example
from echolm.settings import Settings, TierSettings


def hit(example_id: int, similarity: float, response: str = "answer", quality: float | None = None) -> RetrievedExample:
    example = Example(id=example_id, tenant="t", prompt="p", response=response, model="big", tier="large",
                      quality=quality)
    return RetrievedExample(example=example, similarity=similarity)


def test_only_the_best_example_above_the_bar_is_reused() -> None:
    hits = [hit(1, 0.95), hit(2, 0.99), hit(3, 0.97)]
    assert reusable_example(hits, 0.98, 0.5).example.id == 2
    assert reusable_example(hits, 0.995, 0.5) is None
    assert reusable_example(hits, None, 0.5) is None  # off
    assert reusable_example([], 0.5, 0.5) is None


def test_ties_go_to_the_lower_id_and_poor_or_empty_answers_are_never_reused() -> None:
    assert reusable_example([hit(5, 0.99), hit(4, 0.99)], 0.98, 0.5).example.id == 4
    assert reusable_example([hit(1, 0.999, quality=0.2)], 0.98, 0.5) is None
    assert reusable_example([hit(1, 0.999, quality=0.9)], 0.98, 0.5) is not None
    assert reusable_example([hit(1, 0.999, response="  ")], 0.98, 0.5) is None


def test_no_model_tier_may_be_called_like_the_cache() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Settings(tiers=[TierSettings(name="cache", backend="echo", model="m", relative_cost=1.0)],
                 admit_from_tiers=["cache"])
