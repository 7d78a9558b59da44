"""Load bias (paper, SOSP router): S_i = mu_i - lambda0 * tanh(gamma * max(0, L - thr)) * C_i."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echolm.policy.load_bias import (
    LoadTracker,
    TokenCostModel,
    biased_scores,
    load_bias,
    normalised_load,
    softmax,
)

utilities = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False)
positive_costs = st.floats(min_value=0.1, max_value=10.0, allow_nan=False)
loads = st.floats(min_value=0.0, max_value=20.0, allow_nan=False)


@st.composite
def tier_tables(draw: st.DrawFn) -> tuple[dict[str, float], dict[str, float]]:
    n = draw(st.integers(min_value=2, max_value=5))
    names = [f"t{i}" for i in range(n)]
    costs = draw(st.lists(positive_costs, min_size=n, max_size=n, unique=True))
    mu = draw(st.lists(utilities, min_size=n, max_size=n))
    return dict(zip(names, mu, strict=True)), dict(zip(names, costs, strict=True))


@given(tier_tables(), st.floats(min_value=0.0, max_value=5.0), loads)
def test_bias_vanishes_at_or_below_threshold(tables, threshold, load):
    mu, costs = tables
    load = min(load, threshold)
    assert biased_scores(mu, load, costs, threshold, lambda0=1.5, gamma=3.0) == mu


@given(tier_tables(), loads, st.floats(min_value=0.0, max_value=5.0), st.floats(min_value=0.01, max_value=50.0))
def test_bias_is_bounded_by_lambda0_times_cost(tables, load, lambda0, gamma):
    mu, costs = tables
    scores = biased_scores(mu, load, costs, threshold=1.0, lambda0=lambda0, gamma=gamma)
    for tier in mu:
        assert 0.0 <= mu[tier] - scores[tier] <= lambda0 * costs[tier] + 1e-12


@settings(max_examples=200)
@given(tier_tables(), loads, loads)
def test_probability_moves_monotonically_to_cheaper_tiers(tables, load_a, load_b):
    mu, costs = tables
    low, high = sorted((load_a, load_b))
    p_low = softmax(biased_scores(mu, low, costs, threshold=1.0, lambda0=2.0, gamma=1.0))
    p_high = softmax(biased_scores(mu, high, costs, threshold=1.0, lambda0=2.0, gamma=1.0))
    cheapest = min(costs, key=costs.get)
    costliest = max(costs, key=costs.get)
    eps = 1e-9
    assert p_high[cheapest] >= p_low[cheapest] - eps
    assert p_high[costliest] <= p_low[costliest] + eps
    expected_cost = lambda p: sum(p[t] * costs[t] for t in costs)  # noqa: E731
    assert expected_cost(p_high) <= expected_cost(p_low) + eps


def test_bias_formula_known_values():
    assert load_bias(0.5, threshold=1.0, lambda0=2.0, gamma=3.0) == 0.0
    assert load_bias(1.5, threshold=1.0, lambda0=2.0, gamma=3.0) == pytest.approx(2.0 * math.tanh(1.5))
    scores = biased_scores({"small": 0.4, "large": 0.9}, 1.5, {"small": 1.0, "large": 3.0}, 1.0, 2.0, 3.0)
    bias = 2.0 * math.tanh(1.5)
    assert scores == pytest.approx({"small": 0.4 - bias, "large": 0.9 - 3.0 * bias})


def test_mismatched_tiers_are_rejected():
    with pytest.raises(ValueError):
        biased_scores({"a": 1.0}, 2.0, {"b": 1.0}, 1.0, 1.0, 1.0)


def test_softmax_is_stable_and_normalised():
    p = softmax({"a": 1000.0, "b": 999.0, "c": -1000.0})
    assert sum(p.values()) == pytest.approx(1.0)
    assert p["a"] / p["b"] == pytest.approx(math.e)
    assert p["c"] == pytest.approx(0.0)
    sharper = softmax({"a": 1.0, "b": 0.0}, temperature=0.1)
    assert sharper["a"] > softmax({"a": 1.0, "b": 0.0})["a"]
    with pytest.raises(ValueError):
        softmax({})


def test_normalised_load():
    assert normalised_load(queue_lag=3, in_flight=1, capacity=2) == 2.0
    assert normalised_load(queue_lag=-5, in_flight=0, capacity=1) == 0.0
    with pytest.raises(ValueError):
        normalised_load(1, 1, 0)


def test_load_tracker_time_aware_smoothing():
    tracker = LoadTracker(half_life_s=10.0)
    assert tracker.load("large") == 0.0
    assert tracker.update("large", 4.0, now=100.0) == 4.0  # first sample is taken as is
    # one half-life later, the EMA moves half way to the new sample
    assert tracker.update("large", 0.0, now=110.0) == pytest.approx(2.0)
    # a late (older) sample gets no weight and does not move the clock back
    assert tracker.update("large", 100.0, now=90.0) == pytest.approx(2.0)
    # two half-lives: three quarters of the way
    assert tracker.update("large", 2.0 + 8.0, now=130.0) == pytest.approx(2.0 + 0.75 * 8.0)
    assert tracker.snapshot() == {"large": pytest.approx(8.0)}


def test_load_tracker_state_round_trip():
    tracker = LoadTracker(half_life_s=3.0)
    tracker.update("small", 1.0, 0.0)
    tracker.update("small", 3.0, 1.0)
    restored = LoadTracker.from_state_dict(tracker.state_dict())
    assert restored.update("small", 5.0, 2.5) == tracker.update("small", 5.0, 2.5)


def test_token_costs_use_prior_until_measured_then_measurements():
    model = TokenCostModel(prior={"small": 1.0, "large": 4.0})
    assert model.relative_costs({"small": 100, "large": 100}, 50) == {"small": 1.0, "large": 4.0}
    model.observe("small", prompt_tokens=1000, completion_tokens=100, prefill_s=1.0, decode_s=2.0)
    model.observe("large", prompt_tokens=100, completion_tokens=100, prefill_s=0.3, decode_s=6.0)
    # small: 1 ms per prefill token, 20 ms per decode token; large: 3 ms and 60 ms
    # with 2000 example tokens added on small, 100 prompt tokens on large, 10 completion tokens:
    small = 2100 * 0.001 + 10 * 0.02
    large = 100 * 0.003 + 10 * 0.06
    costs = model.relative_costs({"small": 2100, "large": 100}, 10)
    assert costs == pytest.approx({"small": small / large, "large": 1.0})
    assert costs["small"] > 1.0  # long example prefill can make the small tier the costlier one
    restored = TokenCostModel.from_state_dict(model.state_dict())
    assert restored.relative_costs({"small": 2100, "large": 100}, 10) == costs
