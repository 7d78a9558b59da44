"""Cost model and queueing: the fit recovers known rates; the simulated queue matches M/M/1 theory."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from echolm.evaluation.efficiency import (
    CostSample,
    ONE_GENERATION_AT_A_TIME,
    fit_cost_model,
    fit_shared_cpu_slowdown,
    fit_tier_cost,
    latency_percentiles,
    queue_latencies,
    saturation_throughput,
    simulate_latencies,
    tier_makespan,
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
    assert saturation_throughput([("large", 1.0), ("large", 2.0), ("large", 3.0)]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        saturation_throughput([("large", 0.0)])


def test_tier_makespan_spans_one_server_to_fully_parallel_tiers() -> None:
    work = {"large": 30.0, "small": 10.0, "cache": 0.0}
    # 2.0: one generation's worth of work at a time, whatever runs (the old one-server model).
    assert tier_makespan(work, ONE_GENERATION_AT_A_TIME) == pytest.approx(40.0)
    assert tier_makespan(work, 1.0) == pytest.approx(30.0)  # the tiers never slow each other
    # 1.5: both run 1.5x slower for the 15 s the small tier needs, then large alone for its last 20 s.
    assert tier_makespan(work, 1.5) == pytest.approx(15.0 + 20.0)
    # Three busy tiers each run 1 + 2 * 0.5 = 2x slower.
    assert tier_makespan({"a": 1.0, "b": 1.0, "c": 1.0}, 1.5) == pytest.approx(2.0)
    # A system on one tier is unaffected by the slowdown.
    assert saturation_throughput([("large", 2.0)] * 4, 1.3) == pytest.approx(0.5)


def test_fitted_slowdown_reproduces_the_measured_wall_time() -> None:
    alone = {"large": 187.0, "small": 128.0}
    slowdown = fit_shared_cpu_slowdown(alone, 272.0)
    assert tier_makespan(alone, slowdown) == pytest.approx(272.0, rel=1e-6)
    assert 1.0 < slowdown < ONE_GENERATION_AT_A_TIME
    # Together faster than the longer tier alone can only be noise: no better than fully parallel.
    assert fit_shared_cpu_slowdown(alone, 150.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two tiers"):
        fit_shared_cpu_slowdown({"large": 10.0}, 10.0)


def test_one_tier_queue_matches_mm1_mean_latency() -> None:
    # Exponential service (mean 1 s) at utilisation 0.5: M/M/1 mean time in system = 1 / (mu - lambda) = 2 s.
    service = [("large", s) for s in np.random.default_rng(3).exponential(1.0, size=5000)]
    latencies = simulate_latencies(service, 0.5, n_arrivals=100_000, seed=4)
    assert latencies.mean() == pytest.approx(2.0, rel=0.08)
    # ... and its median: the sojourn time is exponential with rate mu - lambda.
    assert np.median(latencies) == pytest.approx(math.log(2) / 0.5, rel=0.08)


def test_two_tier_queues_share_the_cpu() -> None:
    service = [("large", 2.0), ("small", 3.0)]
    # Two requests arriving at once: the same tier serves them one after the other; different tiers run
    # side by side, each 1.5x slower, until large is done at 3 s with 2 of small's 3 s done.
    expected = {("large", "large"): [2.0, 4.0], ("small", "small"): [3.0, 6.0], ("mixed",): [3.0, 4.0]}
    seen = set()
    for seed in range(12):
        latencies = sorted(simulate_latencies(service, 1e9, slowdown=1.5, n_arrivals=2, seed=seed))
        matches = [case for case, want in expected.items() if latencies == pytest.approx(want, abs=1e-6)]
        assert len(matches) == 1, latencies
        seen.add(matches[0])
    assert ("mixed",) in seen
    # Light load: a request takes about its own service time.
    assert latency_percentiles([("large", 2.0)], 0.01, slowdown=1.5, n_arrivals=5000)["p50"] == pytest.approx(2.0)
    # A mix one server saturates at 0.4 req/s stays stable at 0.45 req/s when the tiers overlap.
    assert math.isinf(latency_percentiles(service, 0.45)["p99"])
    overlapped = latency_percentiles(service, 0.45, slowdown=1.5)
    assert overlapped["utilisation"] < 1.0 and math.isfinite(overlapped["p99"])


def test_latency_at_or_above_saturation_is_infinite() -> None:
    assert math.isinf(latency_percentiles([("large", 2.0)] * 2, 0.5)["p99"])
    light = latency_percentiles([("large", 2.0)] * 2, 0.05)
    assert 2.0 <= light["p50"] <= light["p99"] < 10.0


def test_queue_latencies_follow_given_arrivals() -> None:
    arrivals = [0.0, 0.0, 1.0]
    requests = [("large", 2.0), ("small", 3.0), ("large", 1.0)]
    # Both tiers busy from 0 (each 1.5x slower); the second large request waits for the first, done at 3 s;
    # then it and the small one (1 s of work left each) run side by side and finish together at 4.5 s.
    assert queue_latencies(arrivals, requests, slowdown=1.5).tolist() == pytest.approx([3.0, 4.5, 3.5])
    # One generation at a time: the 6 s of work end at 6 s.
    assert queue_latencies(arrivals, requests).tolist() == pytest.approx([4.0, 6.0, 5.0])


def test_calibrated_pairs_sum_only_requests_that_calibration_also_timed() -> None:
    from echolm.evaluation.validation import CalibratedPairs

    pairs = CalibratedPairs()
    pairs.add(12.0, [10.0, 11.0])
    pairs.add(5.0, [])  # never calibrated
    pairs.add(0.0, [3.0])  # no generate timing in the response
    pairs.add(6.0, [4.0, 5.0, 6.0])
    assert (pairs.requests, pairs.pipeline_s, pairs.fastest_s, pairs.mean_s) == (2, 18.0, 14.0, 15.5)


def _batch_output_line(custom_id: str, tier: str, prompt: int, cached: int, completion: int,
                       timings: dict[str, float]) -> str:
    import json

    body = {"choices": [{"message": {"content": f"answer {custom_id}"}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "prompt_tokens_details": {"cached_tokens": cached}},
            "echolm": {"tier": tier, "timings": timings}}
    return json.dumps({"custom_id": custom_id, "response": {"body": body}, "error": None})


def test_tier_work_splits_a_gap_into_work_and_engine_speed(tmp_path) -> None:
    import json

    from echolm.evaluation.efficiency import CostModel, TierCostModel
    from echolm.evaluation.validation import TierWork, read_answers

    output = tmp_path / "requests.out.jsonl"
    output.write_text("\n".join([
        _batch_output_line("0000:a", "small", 300, 200, 50,
                           {"generate": 3.0, "generate.prefill": 0.5, "generate.decode": 2.5}),
        _batch_output_line("0001:b", "small", 120, 0, 30, {"generate": 2.0}),  # a backend without the split
        json.dumps({"custom_id": "0002:c", "response": None, "error": {"code": "generation_timeout"}}),
    ]) + "\n")
    answers = read_answers(output)
    assert answers["0000:a"].cached_tokens == 200
    # The split's sum, not the stage's timing: that also holds the wait for a shared compute thread.
    answers["0000:a"].timings["generate"] = 9.0
    assert answers["0000:a"].generate_s == 3.0
    assert answers["0001:b"].generate_s == 2.0
    assert answers["0002:c"].text == "" and answers["0002:c"].generate_s == 0.0

    # 0.01 s per prefilled token, 0.05 s per decoded one.
    costs = CostModel({"small": TierCostModel("small", 0.0, 0.01, 0.05, 10, 0, 0.0)})
    work = TierWork()
    work.add(answers["0000:a"], costs, (100, 40, 3.0))  # expected: 100 prefilled, 40 decoded
    work.add(answers["0001:b"], costs, (120, 30, 2.7))
    assert (work.requests, work.prefilled, work.decoded) == (2, 220, 80)
    assert (work.predicted_prefilled, work.predicted_decoded) == (220, 70)
    assert work.predicted_s == pytest.approx(5.7)
    # The cost model on what the pipeline did: (100 x 0.01 + 50 x 0.05) + (120 x 0.01 + 30 x 0.05).
    assert work.modelled_s == pytest.approx(3.5 + 2.7)
    assert work.generate_s == pytest.approx(5.0)
    # Only the answer with a split gives the worker's rates: 100 tokens in 0.5 s, 50 in 2.5 s.
    assert (work.split_requests, work.split_prefilled, work.split_decoded) == (1, 100, 50)
    assert (work.prefill_s, work.decode_s) == (0.5, 2.5)


def test_report_shows_where_the_error_comes_from() -> None:
    from echolm.evaluation.evaluate import _work_lines

    work = {"requests": 2, "prefilled": 220, "decoded": 80, "predicted_prefilled": 220, "predicted_decoded": 70,
            "predicted_s": 5.7, "modelled_s": 6.2, "generate_s": 5.0, "split_requests": 1, "split_prefilled": 100,
            "split_decoded": 50, "prefill_s": 0.5, "decode_s": 2.5}
    lines = _work_lines([{"workload": "w", "system": "always-large", "work": {"large": work}},
                         {"workload": "w", "system": "before session 14"}])
    rows = [line for line in lines if line.startswith("| w |")]
    assert rows == ["| w | always-large | large | 2 | 220 / 220 | 80 / 70 | 5.7 / 6.2 / 5.0 | 200 / 20.0 |"]
    assert _work_lines([{"workload": "w", "system": "s"}]) == []


def test_validation_pipeline_runs_without_background_work(tmp_path) -> None:
    from types import SimpleNamespace

    from echolm.evaluation.validation import pipeline_settings
    from echolm.settings import Settings

    settings = pipeline_settings(Settings(), SimpleNamespace(k=1), tmp_path, policy="always-large", threshold=None)
    # Nothing the cost model does not predict runs beside the traffic: no replay, no admissions, no live judging.
    assert not settings.replay.enabled and settings.admit_from_tiers == []
    assert settings.learning.judge_sample_rate == 0.0
    assert settings.router_policy == "always-large" and settings.retrieve_top_k == 1
