"""Cost model and queueing: the fit recovers known rates; the simulated queue matches M/M/1 theory."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from echolm.evaluation.efficiency import (
    CostSample,
    fit_cost_model,
    fit_tier_cost,
    latency_percentiles,
    saturation_throughput,
    simulate_fifo_latencies,
)


def _samples(tier: str, intercept: float, prefill: float, decode: float, n: int = 60) -> list[CostSample]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        p, d = rng.randint(50, 1500), rng.randint(20, 256)
        out.append(CostSample(tier, p, d, intercept + prefill * p + decode * d))
    return out


def test_fit_recovers_prefill_and_decode_rates() -> None:
    model = fit_tier_cost("small", _samples("small", 0.2, 1 / 170, 1 / 40))
    assert model.prefill_tokens_per_s == pytest.approx(170, rel=1e-6)
    assert model.decode_tokens_per_s == pytest.approx(40, rel=1e-6)
    assert model.intercept_s == pytest.approx(0.2, abs=1e-9)
    assert model.median_abs_rel_error < 1e-9


def test_fit_ignores_a_few_contended_measurements() -> None:
    samples = _samples("large", 0.1, 1 / 80, 1 / 25)
    noisy = [CostSample(s.tier, s.prompt_tokens, s.completion_tokens, s.seconds * (6 if i % 15 == 0 else 1))
             for i, s in enumerate(samples)]
    model = fit_tier_cost("large", noisy)
    assert model.dropped >= 3
    assert model.decode_tokens_per_s == pytest.approx(25, rel=0.02)


def test_coefficients_are_never_negative() -> None:
    # Seconds that fall with prompt length would give a negative prefill rate in plain least squares.
    samples = [CostSample("t", p, 100, 5.0 - 0.001 * p) for p in range(100, 1100, 100)]
    model = fit_tier_cost("t", samples)
    assert model.prefill_s_per_token >= 0 and model.decode_s_per_token >= 0 and model.intercept_s >= 0


def test_fit_needs_samples_per_tier() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit_tier_cost("small", _samples("large", 0, 0.01, 0.02))
    costs = fit_cost_model(_samples("small", 0, 0.005, 0.02) + _samples("large", 0, 0.01, 0.05), 0.01)
    assert costs.seconds("large", 100, 100) > costs.seconds("small", 100, 100)


def test_saturation_throughput_is_requests_over_busy_time() -> None:
    assert saturation_throughput([1.0, 2.0, 3.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        saturation_throughput([0.0])


def test_fifo_queue_matches_mm1_mean_latency() -> None:
    # Exponential service (mean 1 s) at utilisation 0.5: M/M/1 mean time in system = 1 / (mu - lambda) = 2 s.
    service = np.random.default_rng(3).exponential(1.0, size=5000)
    latencies = simulate_fifo_latencies(service, 0.5, n_arrivals=100_000, seed=4)
    assert latencies.mean() == pytest.approx(2.0, rel=0.08)
    # ... and its median: the sojourn time is exponential with rate mu - lambda.
    assert np.median(latencies) == pytest.approx(math.log(2) / 0.5, rel=0.08)


def test_latency_at_or_above_saturation_is_infinite() -> None:
    assert math.isinf(latency_percentiles([2.0, 2.0], 0.5)["p99"])
    light = latency_percentiles([2.0, 2.0], 0.05)
    assert 2.0 <= light["p50"] <= light["p99"] < 10.0
