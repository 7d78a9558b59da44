"""Measured per-tier token costs (``C_i`` of the router) from the history's tokens and timings.

The history has, per answer, its prompt and completion token counts and the generation's seconds, and
where the backend times one request alone (llama.cpp) the split of those seconds into prefill (until
the first generated token) and decode. Per tier, with enough split answers, the rates are the split's
seconds over its tokens: ``a`` seconds per prefilled token, ``b`` per decoded token. Without the split
(a batching engine, an HTTP server), ``seconds ~ a * prompt_tokens + b * completion_tokens`` is fitted
by non-negative least squares (``scipy.optimize.nnls``); that needs prompts and answers of varied
lengths, and a tier whose answers all stop at ``max_tokens`` gives it none. Examples add prefill only,
so a tier that receives examples gets a longer prompt in ``request_prompt_tokens``; the share of prompt
tokens a tier's prefix cache has been supplying (shared examples, the chat template) is expected to
cost nothing again. The rates seed ``policy.load_bias.TokenCostModel``, whose ``relative_costs`` gives
``C_i`` per request; a tier with too few answers keeps the configured prior.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from echolm.history.feedback_store import GenerationTiming
from echolm.policy.load_bias import TokenCostModel

MIN_TIMINGS = 5
DEFAULT_CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True, slots=True)
class TokenRates:
    """Seconds per prefill token and per decode token of one tier, and how many answers they rest on."""

    prefill_s_per_token: float
    decode_s_per_token: float
    samples: int
    # Share of the prompt tokens sent that the tier's prefix cache supplied (they cost no prefill).
    reused_share: float = 0.0


def fit_token_rates(timings: Sequence[GenerationTiming]) -> TokenRates | None:
    """Per-token rates from the logged split where at least ``MIN_TIMINGS`` answers have one, else the
    NNLS fit of ``seconds ~ a * prompt + b * completion``; None with fewer usable answers or when either
    rate comes out zero (the data cannot separate the two)."""
    usable = [t for t in timings if t.seconds > 0 and t.prompt_tokens > 0 and t.completion_tokens > 0]
    if len(usable) < MIN_TIMINGS:
        return None
    reused = sum(t.cached_prompt_tokens for t in usable) / sum(t.prompt_tokens + t.cached_prompt_tokens for t in usable)
    split = [t for t in usable if t.prefill_seconds is not None and t.decode_seconds is not None]
    if len(split) >= MIN_TIMINGS:
        prefill = sum(t.prefill_seconds or 0.0 for t in split) / sum(t.prompt_tokens for t in split)
        decode = sum(t.decode_seconds or 0.0 for t in split) / sum(t.completion_tokens for t in split)
        return TokenRates(prefill, decode, len(split), reused) if prefill > 0 and decode > 0 else None
    x = np.array([[t.prompt_tokens, t.completion_tokens] for t in usable], dtype=np.float64)
    y = np.array([t.seconds for t in usable], dtype=np.float64)
    (prefill, decode), _ = nnls(x, y)
    if prefill <= 0 or decode <= 0:  # collinear data (e.g. prompts all alike): no split to trust
        return None
    return TokenRates(float(prefill), float(decode), len(usable), reused)


def cost_model_from_rates(prior: Mapping[str, float], rates: Mapping[str, TokenRates]) -> TokenCostModel:
    """A ``TokenCostModel`` with the measured rates (tiers without rates fall back to ``prior``).

    The router counts every prompt token a request will send, so its prefill rate is per token sent:
    the rate per prefilled token times the share the tier's prefix cache has not been supplying.
    """
    return TokenCostModel(
        prior=dict(prior),
        prefill_s_per_token={t: r.prefill_s_per_token * (1.0 - r.reused_share) for t, r in rates.items() if t in prior},
        decode_s_per_token={t: r.decode_s_per_token for t, r in rates.items() if t in prior},
    )


def request_prompt_tokens(prompt_chars: int, example_chars: int, takes_examples: Mapping[str, bool],
                          chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> dict[str, int]:
    """Expected prompt tokens of one request on each tier (examples only on tiers that take them)."""
    base = max(1, round(prompt_chars / chars_per_token))
    extra = round(example_chars / chars_per_token)
    return {tier: base + (extra if takes else 0) for tier, takes in takes_examples.items()}


def estimate_chars_per_token(pairs: Sequence[tuple[int, int]]) -> float:
    """Median characters per prompt token over (prompt chars, prompt tokens) pairs; the default if none."""
    ratios = [chars / tokens for chars, tokens in pairs if chars > 0 and tokens > 0]
    return float(np.median(ratios)) if ratios else DEFAULT_CHARS_PER_TOKEN
