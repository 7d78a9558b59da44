"""Efficiency: a per-tier cost model fitted on measured generations, and what it implies for throughput
and latency.

What is **measured**: every generation's prompt tokens (prefill), completion tokens (decode) and wall
seconds, through the project's llama.cpp generator, one request at a time.

What is **derived**: per tier, seconds = intercept + prefill_s x prompt tokens + decode_s x completion
tokens (least squares with non-negative coefficients, after dropping outliers above 3 MADs: the
machine is shared, and a neighbour's burst inflates single measurements).

Serving is modelled the way the pipeline's worker serves: one FIFO queue per tier, each worked by its
own generator, and the tiers share the CPU. While ``k`` tiers generate at once each one runs
``1 + (slowdown - 1) (k - 1)`` times slower than alone (processor sharing). ``slowdown`` is measured
(``shared_cpu_slowdown``: each tier's calibration requests timed alone, then both tiers' at once):
2.0 means the CPU does one generation's worth of work at a time whatever runs, 1.0 that the tiers do
not slow each other at all. Two llama.cpp tiers on one 2-core machine measured between the two (session
10: 429 s of model time in 272 s of wall), which a one-server model could not show: it over-charged every
system that mixes tiers.

* saturation throughput of a system = requests / the makespan of its per-tier work (``tier_makespan``);
* latency at a fixed load = those queues fed by Poisson arrivals, each arrival's (tier, service time)
  drawn from the system's per-request costs (simulated over many arrivals, so p99 is stable).

``validate_cost_model`` compares the model's prediction with real pipeline runs at saturation
(``echolm batch``-style jobs on the embedded broker): the model is only trusted as far as that check
holds, and the report prints both numbers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


# The slowdown that makes the tiers' queues add up to one server's: what is assumed without a measurement.
ONE_GENERATION_AT_A_TIME = 2.0


@dataclass(frozen=True, slots=True)
class CostModel:
    """Cost models of every tier, the fixed overhead of embedding and retrieval per request, and how much
    tiers generating at the same time slow each other (module docstring)."""

    tiers: dict[str, TierCostModel]
    retrieval_overhead_s: float = 0.0
    shared_cpu_slowdown: float = ONE_GENERATION_AT_A_TIME

    def seconds(self, tier: str, prompt_tokens: int, completion_tokens: int) -> float:
        return self.tiers[tier].predict(prompt_tokens, completion_tokens)


def fit_cost_model(samples: Sequence[CostSample], retrieval_overhead_s: float = 0.0,
                   shared_cpu_slowdown: float = ONE_GENERATION_AT_A_TIME) -> CostModel:
    tiers = sorted({s.tier for s in samples})
    return CostModel({tier: fit_tier_cost(tier, samples) for tier in tiers}, retrieval_overhead_s,
                     shared_cpu_slowdown)


# One request as the model serves it: the queue (tier) it waits in and the seconds it takes alone.
Service = tuple[str, float]


def _sharing_factor(busy: int, slowdown: float) -> float:
    """How many times slower each of ``busy`` tiers runs than alone."""
    return 1.0 + (slowdown - 1.0) * (busy - 1)


def tier_makespan(work_by_tier: Mapping[str, float], slowdown: float) -> float:
    """Seconds until every tier has worked through its queue when all queues start full (saturation)."""
    works = sorted(w for w in work_by_tier.values() if w > 0)
    elapsed = done = 0.0
    for i, work in enumerate(works):
        elapsed += (work - done) * _sharing_factor(len(works) - i, slowdown)
        done = work
    return elapsed


def work_by_tier(service: Sequence[Service]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for tier, seconds in service:
        totals[tier] = totals.get(tier, 0.0) + seconds
    return totals


def saturation_throughput(service: Sequence[Service], slowdown: float = ONE_GENERATION_AT_A_TIME) -> float:
    """Requests per second when every request is queued at once (``tier_makespan``)."""
    makespan = tier_makespan(work_by_tier(service), slowdown)
    if makespan <= 0:
        raise ValueError("service times must sum to a positive number")
    return len(service) / makespan


def fit_shared_cpu_slowdown(alone_s: Mapping[str, float], together_s: float) -> float:
    """The slowdown under which ``tier_makespan`` of the tiers' alone-times equals ``together_s``, the
    measured wall time of the same work started at once (bisection: the makespan grows with it)."""
    if sum(1 for w in alone_s.values() if w > 0) < 2:
        raise ValueError("the slowdown needs the alone times of at least two tiers")
    low, high = 1.0, 8.0  # below 1 the tiers would each run faster together than alone: noise
    for _ in range(60):
        middle = (low + high) / 2
        if tier_makespan(alone_s, middle) < together_s:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def queue_latencies(arrivals: Sequence[float], requests: Sequence[Service], *,
                    slowdown: float = ONE_GENERATION_AT_A_TIME) -> np.ndarray:
    """Latency (wait + service) of each request arriving at ``arrivals[i]`` (ascending) with
    ``requests[i]`` = (tier, seconds alone): one FIFO queue per tier, the busy tiers sharing the CPU
    (module docstring)."""
    queues: dict[str, deque[list[float]]] = {tier: deque() for tier, _ in requests}  # [request index, work left]
    latencies = np.empty(len(requests))
    now, nxt = 0.0, 0
    while nxt < len(requests) or any(queues.values()):
        busy = [q for q in queues.values() if q]
        factor = _sharing_factor(len(busy), slowdown) if busy else 1.0
        least = min(q[0][1] for q in busy) if busy else float("inf")
        if nxt < len(requests) and (arrivals[nxt] - now) / factor < least:
            step, now = (arrivals[nxt] - now) / factor, float(arrivals[nxt])
            for q in busy:
                q[0][1] -= step
            tier, seconds = requests[nxt]
            queues[tier].append([nxt, seconds])
            nxt += 1
            continue
        # The heads with the least work left finish now: popped by comparison, not by a float reaching 0.
        now += least * factor
        for q in busy:
            if q[0][1] <= least * (1 + 1e-9):
                index = int(q[0][0])
                latencies[index] = now - arrivals[index]
                q.popleft()
            else:
                q[0][1] -= least
    return latencies


def simulate_latencies(service: Sequence[Service], rate: float, *, slowdown: float = ONE_GENERATION_AT_A_TIME,
                       n_arrivals: int = 20_000, seed: int = 0) -> np.ndarray:
    """``queue_latencies`` of ``n_arrivals`` Poisson arrivals at ``rate``/s, each one's (tier, seconds)
    drawn with replacement from ``service``."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(service), size=n_arrivals)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n_arrivals))
    return queue_latencies(arrivals, [service[i] for i in drawn], slowdown=slowdown)


def latency_percentiles(service: Sequence[Service], rate: float, *, slowdown: float = ONE_GENERATION_AT_A_TIME,
                        n_arrivals: int = 20_000, seed: int = 0) -> dict[str, float]:
    """p50/p99 latency at ``rate``, or infinities when the load is at or above saturation."""
    utilisation = rate / saturation_throughput(service, slowdown)
    if utilisation >= 1.0:
        return {"p50": float("inf"), "p99": float("inf"), "utilisation": utilisation}
    latencies = simulate_latencies(service, rate, slowdown=slowdown, n_arrivals=n_arrivals, seed=seed)
    # The first arrivals find empty queues: skip a warm-up tenth.
    steady = latencies[n_arrivals // 10:]
    return {"p50": float(np.percentile(steady, 50)), "p99": float(np.percentile(steady, 99)),
            "utilisation": utilisation}


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
    # Sums over the requests of the model's own time (llama.cpp's prefill + decode where the backend splits
    # them, else the generate stage's timing) and of the cost model's generation seconds: what separates a
    # slower engine from the pipeline's own overhead.
    generate_s: float = 0.0
    predicted_generate_s: float = 0.0
    # The requests whose exact generation phase calibrate also timed: their generate-stage seconds in the
    # pipeline next to calibration's fastest and mean run of the same prompt. Equal sums put a gap between
    # model and pipeline on the fit; a larger pipeline sum means the engine itself runs slower in the worker.
    calibrated_requests: int = 0
    calibrated_pipeline_s: float = 0.0
    calibrated_fastest_s: float = 0.0
    calibrated_mean_s: float = 0.0
    workload: str = ""
    # Per tier, the generated answers' tokens and model seconds in the pipeline next to the cost model's
    # (``echolm.evaluation.validation.TierWork``, as a dict): where a gap between the two comes from.
    work: dict[str, dict[str, float]] = field(default_factory=dict)

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
    # The cost model's queues fed the same arrivals and requests (``queue_latencies``): what the figures
    # above check.
    predicted_p50_s: float = float("nan")
    predicted_p99_s: float = float("nan")
    predicted_mean_s: float = float("nan")
    workload: str = ""
