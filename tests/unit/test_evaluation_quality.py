"""Quality: verifier-based win/tie/loss against the large model, win rate, intervals, verdict cache."""

from __future__ import annotations

import pytest

from echolm.datasets import TaskItem
from echolm.evaluation.quality import (
    VerdictCache,
    paired_lift,
    parity_headroom,
    pass_fail_outcome,
    verify,
    wilson_interval,
    win_rate_of,
)

MATH = TaskItem("q", "q", "What is 6*7?", "#### 42", "42", (), None)
CODE = TaskItem("c", "c", "Write add.", "def add(a, b): return a + b", None,
                ("assert add(1, 2) == 3", "assert add(2, 2) == 4"), "python")


def test_outcome_against_the_large_model_from_pass_fail() -> None:
    assert pass_fail_outcome(True, False) == "win"
    assert pass_fail_outcome(False, True) == "loss"
    assert pass_fail_outcome(True, True) == "tie"
    assert pass_fail_outcome(False, False) == "tie"


def test_win_rate_counts_half_ties() -> None:
    assert win_rate_of(["tie"] * 4) == 0.5
    assert win_rate_of(["win", "loss", "tie", "tie"]) == 0.5
    assert win_rate_of(["win", "tie"]) == 0.75
    with pytest.raises(ValueError):
        win_rate_of([])


def test_win_rate_is_half_plus_half_the_accuracy_gap() -> None:
    candidate = [True, True, False, False, True]
    large = [True, False, True, False, False]
    outcomes = [pass_fail_outcome(c, g) for c, g in zip(candidate, large, strict=True)]
    gap = (sum(candidate) - sum(large)) / len(candidate)
    assert win_rate_of(outcomes) == pytest.approx(0.5 + gap / 2)


def test_verify_numeric_and_code() -> None:
    assert verify(MATH, "6*7 = 42. The answer is 42.", "numeric").passed
    assert not verify(MATH, "The answer is 41.", "numeric").passed
    assert verify(CODE, "```python\ndef add(a, b):\n    return a + b\n```", "python-tests").passed
    assert not verify(CODE, "```python\ndef add(a, b):\n    return a - b\n```", "python-tests").passed
    assert not verify(CODE, "", "python-tests").passed
    assert verify(MATH, "```python\nprint(6 * 7)\n```", "program-output").passed
    assert not verify(MATH, "The answer is 42.", "program-output").passed  # a program was asked for
    with pytest.raises(ValueError, match="judge"):
        verify(MATH, "42", "none")


def test_wilson_interval_contains_the_estimate_and_narrows_with_n() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi
    lo2, hi2 = wilson_interval(50, 100)
    assert hi2 - lo2 < hi - lo


def test_verdict_cache_returns_the_stored_verdict(tmp_path) -> None:
    cache = VerdictCache(tmp_path)
    first = cache.verify(MATH, "The answer is 42.", "numeric")
    cache.close()
    reopened = VerdictCache(tmp_path)
    key = VerdictCache.key(MATH, "The answer is 42.", "numeric")
    row = reopened._db.execute("SELECT passed FROM verdicts WHERE key = ?", (key,)).fetchone()
    assert row == (1,)
    assert reopened.verify(MATH, "The answer is 42.", "numeric") == first
    reopened.close()


def test_paired_lift_is_the_difference_of_win_rates_with_an_interval() -> None:
    large = [True, False, False, True, False, True, False, False]
    small = [True, False, False, False, False, True, False, True]
    nearest = [True, True, False, True, False, True, True, False]
    lift = paired_lift(nearest, small, large)

    def rate(candidate: list[bool]) -> float:
        return win_rate_of([pass_fail_outcome(c, g) for c, g in zip(candidate, large, strict=True)])

    assert lift.points == pytest.approx(100 * (rate(nearest) - rate(small)))
    assert lift.low < lift.points < lift.high
    assert lift.requests == 8


def test_paired_lift_interval_narrows_with_more_requests_and_vanishes_without_differences() -> None:
    large, small, nearest = [False, False, True, False], [False, False, True, True], [True, False, True, False]
    few, many = paired_lift(nearest, small, large), paired_lift(nearest * 10, small * 10, large * 10)
    assert few.points == pytest.approx(many.points)
    assert many.high - many.low < few.high - few.low
    same = paired_lift(small, small, large)
    assert (same.points, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_lift([True], [True, False], [True])


def test_parity_headroom_is_what_tying_the_large_model_everywhere_adds() -> None:
    # Small alone: one win, two losses, one tie (win rate 0.375): tying everywhere adds 12.5 points.
    assert parity_headroom([True, False, False, True], [False, True, True, True]) == pytest.approx(12.5)
    # Already ahead of the large model: copying it would cost points.
    assert parity_headroom([True, True], [False, True]) == pytest.approx(-25.0)
    with pytest.raises(ValueError, match="equally long"):
        parity_headroom([True], [])
