"""Load awareness for the router (paper, "Router: contextual bandit with load bias", SOSP version).

Three pieces, all pure:

* ``LoadTracker`` keeps a per-tier exponential moving average of load, where one load sample is
  ``(queue lag + in-flight requests) / capacity`` (see ``normalised_load``). Samples arrive at irregular
  times, so the smoothing factor depends on the time since the previous sample (a half-life), not on the
  sample count: ``alpha = 1 - 2 ** (-dt / half_life)``.
* ``TokenCostModel`` measures each tier's cost per prefill token and per decode token separately
  (examples add prefill only), so the relative costs ``C_i`` come from measurements, not constants.
* ``biased_scores`` and ``softmax`` implement
  ``S_i(L) = mu_i - lambda0 * tanh(gamma * max(0, L - threshold)) * C_i`` and ``P_i = softmax(S_i)``.
  The bias is zero below the threshold and never exceeds ``lambda0 * C_i``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def normalised_load(queue_lag: float, in_flight: float, capacity: float) -> float:
    """One load sample of a tier: waiting plus running requests per unit of the tier's capacity.

    ``capacity`` is how many requests the tier serves at once (its worker concurrency); a value of 1.0
    means the tier is exactly saturated.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    return (max(0.0, queue_lag) + max(0.0, in_flight)) / capacity


@dataclass
class LoadTracker:
    """Per-tier EMA of load with time-aware smoothing (paper: "keep an EMA of load L").

    ``half_life_s`` is the time after which an old sample's weight has halved. The first sample of a
    tier sets its EMA directly. Samples with a timestamp older than the tier's last one are folded in as
    if they arrived at the same time (dt = 0 gives them no weight), so out-of-order reports cannot move
    the clock backwards.
    """

    half_life_s: float = 5.0
    _ema: dict[str, float] = field(default_factory=dict)
    _last_at: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.half_life_s <= 0:
            raise ValueError(f"half_life_s must be positive, got {self.half_life_s}")

    def update(self, tier: str, value: float, now: float) -> float:
        """Fold one load sample taken at ``now`` (seconds, any monotonic clock) in; returns the new EMA."""
        if tier not in self._ema:
            self._ema[tier] = float(value)
            self._last_at[tier] = now
            return self._ema[tier]
        dt = max(0.0, now - self._last_at[tier])
        alpha = 1.0 - 2.0 ** (-dt / self.half_life_s)
        self._ema[tier] += alpha * (float(value) - self._ema[tier])
        self._last_at[tier] = max(self._last_at[tier], now)
        return self._ema[tier]

    def load(self, tier: str) -> float:
        """The tier's smoothed load; 0.0 for a tier never reported (an idle tier reports nothing)."""
        return self._ema.get(tier, 0.0)

    def snapshot(self) -> dict[str, float]:
        return dict(self._ema)

    def state_dict(self) -> dict[str, Any]:
        return {"half_life_s": self.half_life_s, "ema": dict(self._ema), "last_at": dict(self._last_at)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LoadTracker:
        return cls(
            half_life_s=float(state["half_life_s"]),
            _ema={k: float(v) for k, v in state["ema"].items()},
            _last_at={k: float(v) for k, v in state["last_at"].items()},
        )


@dataclass
class TokenCostModel:
    """Measured seconds per prefill token and per decode token of each tier, as EMAs over requests.

    ``relative_costs`` turns them into the router's ``C_i`` for one request: its expected cost on each
    tier (prefill includes the examples only on tiers that get them) divided by the cheapest tier's.
    Tiers not measured yet fall back to ``prior`` (relative costs from configuration).
    """

    prior: dict[str, float]
    smoothing: float = 0.1
    prefill_s_per_token: dict[str, float] = field(default_factory=dict)
    decode_s_per_token: dict[str, float] = field(default_factory=dict)

    def observe(
        self, tier: str, *, prompt_tokens: int, completion_tokens: int, prefill_s: float, decode_s: float
    ) -> None:
        """Fold one finished request's timing split in (tokens must be positive to count)."""
        if prompt_tokens > 0 and prefill_s >= 0:
            _ema_into(self.prefill_s_per_token, tier, prefill_s / prompt_tokens, self.smoothing)
        if completion_tokens > 0 and decode_s >= 0:
            _ema_into(self.decode_s_per_token, tier, decode_s / completion_tokens, self.smoothing)

    def request_cost(self, tier: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Expected seconds for one request on ``tier``, or None until both rates are measured."""
        if tier not in self.prefill_s_per_token or tier not in self.decode_s_per_token:
            return None
        return prompt_tokens * self.prefill_s_per_token[tier] + completion_tokens * self.decode_s_per_token[tier]

    def relative_costs(self, prompt_tokens: Mapping[str, int], completion_tokens: int) -> dict[str, float]:
        """``C_i`` for one request: per-tier expected cost over the cheapest tier's (cheapest = 1.0).

        ``prompt_tokens`` is per tier because a tier that receives examples has a longer prompt. If any
        tier is still unmeasured, all tiers use the configured ``prior`` so the values stay comparable.
        """
        costs = {t: self.request_cost(t, prompt_tokens[t], completion_tokens) for t in self.prior}
        if any(c is None or c <= 0 for c in costs.values()):
            return _relative(self.prior)
        return _relative({t: float(c) for t, c in costs.items() if c is not None})

    def state_dict(self) -> dict[str, Any]:
        return {
            "prior": dict(self.prior),
            "smoothing": self.smoothing,
            "prefill_s_per_token": dict(self.prefill_s_per_token),
            "decode_s_per_token": dict(self.decode_s_per_token),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> TokenCostModel:
        return cls(
            prior=dict(state["prior"]),
            smoothing=float(state["smoothing"]),
            prefill_s_per_token=dict(state["prefill_s_per_token"]),
            decode_s_per_token=dict(state["decode_s_per_token"]),
        )


def _ema_into(table: dict[str, float], key: str, value: float, smoothing: float) -> None:
    table[key] = value if key not in table else table[key] + smoothing * (value - table[key])


def _relative(costs: Mapping[str, float]) -> dict[str, float]:
    cheapest = min(costs.values())
    return {t: c / cheapest for t, c in costs.items()}


def load_bias(load: float, threshold: float, lambda0: float, gamma: float) -> float:
    """``lambda0 * tanh(gamma * max(0, L - threshold))``: 0 below the threshold, bounded by ``lambda0``."""
    return lambda0 * math.tanh(gamma * max(0.0, load - threshold))


def biased_scores(
    mu: Mapping[str, float],
    load: float,
    costs: Mapping[str, float],
    threshold: float,
    lambda0: float,
    gamma: float,
) -> dict[str, float]:
    """Paper (SOSP), load-aware routing: ``S_i = mu_i - lambda0 * tanh(gamma * max(0, L - thr)) * C_i``.

    ``mu`` and ``costs`` must name the same tiers. Costlier tiers lose more score as load rises, so
    probability mass moves to cheaper tiers; the expected cost under ``softmax(S)`` is non-increasing
    in ``L`` (its derivative is ``-bias'(L) * Var_P(C) <= 0``).
    """
    if set(mu) != set(costs):
        raise ValueError(f"mu and costs name different tiers: {sorted(mu)} vs {sorted(costs)}")
    bias = load_bias(load, threshold, lambda0, gamma)
    return {tier: mu[tier] - bias * costs[tier] for tier in mu}


def softmax(scores: Mapping[str, float], temperature: float = 1.0) -> dict[str, float]:
    """``P_i = exp(S_i / T) / sum_j exp(S_j / T)``, computed stably (max subtracted first)."""
    if not scores:
        raise ValueError("softmax of no scores")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    top = max(scores.values())
    weights = {k: math.exp((v - top) / temperature) for k, v in scores.items()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}
