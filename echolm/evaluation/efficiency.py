"""Efficiency: a per-tier cost model fitted on measured generations, and what it implies for throughput
and latency.

What is **measured**: every generation's prompt tokens (prefill), completion tokens (decode) and wall
seconds, through the project's llama.cpp generator, one request at a time.

What is **derived**: per tier, seconds = intercept + prefill_s x prompt tokens + decode_s x completion
tokens (least squares with non-negative coefficients, after dropping outliers above 3 MADs: the
machine is shared, and a neighbour's burst inflates single measurements). On a CPU both tiers share the
same cores, so serving is modelled as one server that works on one generation at a time:

* saturation throughput of a system = requests / sum of its requests' predicted seconds;
* latency at a fixed load = a FIFO single-server queue fed by Poisson arrivals, with service times
  drawn from the system's per-request costs (simulated over many arrivals, so p99 is stable).

``validate_cost_model`` compares the model's prediction with real pipeline runs at saturation
(``echolm batch``-style jobs on the embedded broker): the model is only trusted as far as that check
holds, and the report prints both numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class CostSample:
    """One measured generation."""

    tier: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class TierCostModel:
    """seconds = intercept_s + prefill_s_per_token * prompt + decode_s_per_token * completion."""

    tier: str
    intercept_s: float
    prefill_s_per_token: float
    decode_s_per_token: float
    samples: int
    dropped: int
    median_abs_rel_error: float

    def predict(self, prompt_tokens: float, completion_tokens: float) -> float:
        return self.intercept_s + self.prefill_s_per_token * prompt_tokens + self.decode_s_per_token * completion_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return 1.0 / self.prefill_s_per_token if self.prefill_s_per_token > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token if self.decode_s_per_token > 0 else float("inf")


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (active-set over 3 columns: small enough to enumerate)."""
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y * y))
    n = x.shape[1]
    for mask in range(1, 2**n):
        cols = [i for i in range(n) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if np.any(coef < 0):
            continue
        full = np.zeros(n)
        full[cols] = coef
        err = float(np.sum((x @ full - y) ** 2))
        if err < best_err:
            best, best_err = full, err
    return best


def fit_tier_cost(tier: str, samples: Sequence[CostSample], outlier_mads: float = 3.0) -> TierCostModel:
    """Fit the linear cost model of one tier (see the module docstring)."""
    rows = [s for s in samples if s.tier == tier and s.seconds > 0]
    if len(rows) < 3:
        raise ValueError(f"tier {tier}: {len(rows)} measured generations; at least 3 are needed")
    x = np.array([[1.0, s.prompt_tokens, s.completion_tokens] for s in rows])
    y = np.array([s.seconds for s in rows])
    coef = _nonnegative_lstsq(x, y)
    residual = y - x @ coef
    mad = float(np.median(np.abs(residual - np.median(residual)))) or 1e-9
    keep = np.abs(residual) <= outlier_mads * 1.4826 * mad
    if keep.sum() >= 3 and keep.sum() < len(rows):
        coef = _nonnegative_lstsq(x[keep], y[keep])
    predicted = x @ coef
    rel = np.abs(predicted - y) / y
    return TierCostModel(tier, float(coef[0]), float(coef[1]), float(coef[2]), len(rows), int((~keep).sum()),
                         float(np.median(rel)))


@dataclass(frozen=True, slots=True)
class CostModel:
    """Cost models of every tier, plus the fixed overhead of embedding and retrieval per request."""

    tiers: dict[str, TierCostModel]
    retrieval_overhead_s: float = 0.0

    def seconds(self, tier: str, prompt_tokens: int, completion_tokens: int) -> float:
        return self.tiers[tier].predict(prompt_tokens, completion_tokens)


def fit_cost_model(samples: Sequence[CostSample], retrieval_overhead_s: float = 0.0) -> CostModel:
    tiers = sorted({s.tier for s in samples})
    return CostModel({tier: fit_tier_cost(tier, samples) for tier in tiers}, retrieval_overhead_s)


def saturation_throughput(costs: Sequence[float]) -> float:
    """Requests per second of one server working through ``costs`` back to back."""
    total = float(np.sum(costs))
    if total <= 0:
        raise ValueError("costs must sum to a positive number")
    return len(costs) / total


def simulate_fifo_latencies(service_times: Sequence[float], rate: float, *, n_arrivals: int = 20_000,
                            seed: int = 0) -> np.ndarray:
    """Latencies (wait + service) of ``n_arrivals`` Poisson arrivals at ``rate``/s to one FIFO server;
    each arrival's service time is drawn (with replacement) from ``service_times``."""
    rng = np.random.default_rng(seed)
    service = rng.choice(np.asarray(service_times, dtype=float), size=n_arrivals, replace=True)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n_arrivals))
    latencies = np.empty(n_arrivals)
    free_at = 0.0
    for i in range(n_arrivals):
        start = max(arrivals[i], free_at)
        free_at = start + service[i]
        latencies[i] = free_at - arrivals[i]
    return latencies


def latency_percentiles(service_times: Sequence[float], rate: float, *, n_arrivals: int = 20_000,
                        seed: int = 0) -> dict[str, float]:
    """p50/p99 latency at ``rate``, or infinities when the load is at or above saturation."""
    if rate >= saturation_throughput(service_times):
        return {"p50": float("inf"), "p99": float("inf"), "utilisation": rate / saturation_throughput(service_times)}
    latencies = simulate_fifo_latencies(service_times, rate, n_arrivals=n_arrivals, seed=seed)
    # The first arrivals find an empty queue: skip a warm-up tenth.
    steady = latencies[n_arrivals // 10:]
    return {"p50": float(np.percentile(steady, 50)), "p99": float(np.percentile(steady, 99)),
            "utilisation": rate / saturation_throughput(service_times)}


@dataclass(frozen=True, slots=True)
class ValidationPoint:
    """One real pipeline run at saturation next to the cost model's prediction for the same requests."""

    system: str
    requests: int
    measured_s: float
    predicted_s: float
    measured_rps: float
    predicted_rps: float
    same_answers: int
    by_tier: dict[str, int]
    # Sums over the requests of the model's own time (the generate stage's timing) and of the cost model's
    # generation seconds: what separates a slower engine from the pipeline's own overhead.
    generate_s: float = 0.0
    predicted_generate_s: float = 0.0

    @property
    def error(self) -> float:
        """Relative error of the predicted throughput against the measured one."""
        return self.predicted_rps / self.measured_rps - 1.0


@dataclass(frozen=True, slots=True)
class LatencyPoint:
    """Latency through the real pipeline under a Poisson stream at a fixed load."""

    system: str
    load: float  # the rate as a multiple of always-large's capacity measured through the pipeline
    rate_rps: float
    requests: int
    errors: int
    p50_s: float
    p99_s: float
    mean_s: float
    by_tier: dict[str, int]
