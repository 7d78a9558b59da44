"""The dynamic utility threshold of stage 2 (paper, "Stage 2: helpfulness proxy").

Examples whose helpfulness score is below a threshold are dropped, so the number of examples varies per
request; a maximum count and a prompt-token budget are hard guards. The threshold is re-chosen
periodically: requests are sampled and served at several candidate thresholds, each yielding a quality
(e.g. mean judge score) and an efficiency (e.g. offload share or throughput; higher is better), and the
threshold with the best efficiency at equal quality is kept (``choose_threshold``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ThresholdOutcome:
    """Mean quality and efficiency observed when serving sampled requests at one threshold."""

    threshold: float
    quality: float
    efficiency: float
    samples: int = 1


def summarise_outcomes(samples: Iterable[tuple[float, float, float]]) -> list[ThresholdOutcome]:
    """Group ``(threshold, quality, efficiency)`` samples by threshold and average them; sorted by threshold."""
    groups: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for threshold, quality, efficiency in samples:
        groups[float(threshold)].append((quality, efficiency))
    return [
        ThresholdOutcome(t, sum(q for q, _ in g) / len(g), sum(e for _, e in g) / len(g), len(g))
        for t, g in sorted(groups.items())
    ]


def choose_threshold(
    outcomes: Sequence[ThresholdOutcome],
    quality_target: float | None = None,
    *,
    tolerance: float = 0.0,
    min_samples: int = 1,
) -> float:
    """The threshold with the highest efficiency among those with ``quality >= target``.

    ``target`` defaults to the best observed quality minus ``tolerance`` ("equal quality", up to noise).
    Ties go to higher quality, then the lower threshold. If no threshold reaches the target, the one with
    the best quality wins: quality is never traded away silently. Outcomes with fewer than
    ``min_samples`` samples are ignored.
    """
    usable = [o for o in outcomes if o.samples >= min_samples and math.isfinite(o.quality)]
    if not usable:
        raise ValueError("no threshold outcome has enough samples")
    target = max(o.quality for o in usable) - tolerance if quality_target is None else quality_target
    qualifying = [o for o in usable if o.quality >= target]
    if qualifying:
        best = max(qualifying, key=lambda o: (o.efficiency, o.quality, -o.threshold))
    else:
        best = max(usable, key=lambda o: (o.quality, o.efficiency, -o.threshold))
    return best.threshold


@dataclass(frozen=True, slots=True)
class ScoredExample(Generic[T]):
    """A candidate example with its helpfulness ``score`` and its prompt size in ``tokens``."""

    id: int
    score: float
    tokens: int
    item: T | None = None


def select_examples(
    scored: Sequence[ScoredExample[T]], threshold: float, max_count: int, token_budget: int
) -> list[ScoredExample[T]]:
    """Examples with ``score >= threshold``, best first, at most ``max_count`` and ``token_budget`` tokens.

    Order is deterministic (score descending, then id), so identical candidates give a byte-identical
    prompt. An example that does not fit the remaining budget is skipped and a smaller, lower-scored one
    may still be taken. NaN scores never pass.
    """
    if token_budget < 0:
        raise ValueError(f"token_budget must be non-negative, got {token_budget}")
    passing = sorted((s for s in scored if s.score >= threshold), key=lambda s: (-s.score, s.id))
    chosen: list[ScoredExample[T]] = []
    used = 0
    for candidate in passing:
        if len(chosen) >= max_count:
            break
        if candidate.tokens < 0 or used + candidate.tokens > token_budget:
            continue
        chosen.append(candidate)
        used += candidate.tokens
    return chosen
