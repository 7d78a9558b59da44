"""Dynamic utility threshold and example selection (paper, "Stage 2: helpfulness proxy")."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from echolm.policy.threshold import (
    ScoredExample,
    ThresholdOutcome,
    choose_threshold,
    select_examples,
    summarise_outcomes,
)


def _curve(drop_after: float) -> list[ThresholdOutcome]:
    """Quality flat at 0.8 up to ``drop_after``, then falling; efficiency rising with the threshold."""
    outcomes = []
    for i in range(10):
        t = i / 10
        quality = 0.8 if t <= drop_after + 1e-9 else 0.8 - 0.4 * (t - drop_after)
        outcomes.append(ThresholdOutcome(t, quality, efficiency=0.3 + 0.5 * t, samples=20))
    return outcomes


def test_best_efficiency_at_equal_quality():
    assert choose_threshold(_curve(0.5)) == 0.5
    assert choose_threshold(_curve(0.2)) == 0.2
    assert choose_threshold(_curve(0.5), quality_target=0.8) == 0.5
    # tolerating a small quality loss buys a higher threshold: quality(0.6) = 0.76
    assert choose_threshold(_curve(0.5), tolerance=0.05) == pytest.approx(0.6)


def test_unreachable_target_keeps_best_quality():
    assert choose_threshold(_curve(0.5), quality_target=0.95) == 0.5  # ties broken by efficiency


def test_sparse_outcomes_are_ignored():
    outcomes = [ThresholdOutcome(0.3, 0.8, 0.4, samples=50), ThresholdOutcome(0.9, 0.9, 0.9, samples=2)]
    assert choose_threshold(outcomes, min_samples=10) == 0.3
    with pytest.raises(ValueError):
        choose_threshold(outcomes, min_samples=100)


def test_summarise_outcomes_averages_per_threshold():
    summary = summarise_outcomes([(0.5, 1.0, 0.2), (0.1, 0.0, 1.0), (0.5, 0.0, 0.4)])
    assert summary == [ThresholdOutcome(0.1, 0.0, 1.0, 1), ThresholdOutcome(0.5, 0.5, pytest.approx(0.3), 2)]


def test_select_examples_guards():
    scored = [
        ScoredExample(1, 0.9, 400, "a"),
        ScoredExample(2, 0.8, 300, "b"),
        ScoredExample(3, 0.7, 100, "c"),
        ScoredExample(4, 0.2, 10, "d"),
        ScoredExample(5, math.nan, 10, "e"),
    ]
    assert [s.id for s in select_examples(scored, 0.5, max_count=5, token_budget=10_000)] == [1, 2, 3]
    assert [s.id for s in select_examples(scored, 0.5, max_count=2, token_budget=10_000)] == [1, 2]
    # 1 and 2 do not fit together in 500 tokens: 2 is skipped, the smaller 3 still fits
    assert [s.id for s in select_examples(scored, 0.5, max_count=5, token_budget=500)] == [1, 3]
    assert [s.id for s in select_examples(scored, 0.0, max_count=5, token_budget=0)] == []
    assert select_examples(scored, 0.5, max_count=0, token_budget=10_000) == []
    assert select_examples(scored, 0.95, max_count=5, token_budget=10_000) == []
    with pytest.raises(ValueError):
        select_examples(scored, 0.5, 5, -1)


@given(st.permutations(list(range(8))), st.floats(min_value=0.0, max_value=1.0), st.integers(0, 8))
def test_selection_order_does_not_depend_on_input_order(order, threshold, max_count):
    base = [ScoredExample(i, round((i * 37 % 10) / 10, 1), 50 + 10 * i) for i in range(8)]
    shuffled = [base[i] for i in order]
    picked = select_examples(shuffled, threshold, max_count, token_budget=300)
    assert picked == select_examples(base, threshold, max_count, token_budget=300)
    assert [(-s.score, s.id) for s in picked] == sorted((-s.score, s.id) for s in picked)
    assert sum(s.tokens for s in picked) <= 300 and len(picked) <= max_count
