"""The first routing policies: a similarity rule, and fixed tiers for baselines.

``SimilarityRouter`` offloads a request to the cheapest tier that takes examples when enough
retrieved examples are close to it, and otherwise sends it to the most expensive tier without
examples. It is the rule-based stand-in for the paper's bandit router; load awareness
(``RoutingContext.load``) belongs to that later policy and is deliberately not consulted here.
"""

from __future__ import annotations

from collections.abc import Sequence

from echolm.domain import RetrievedExample, RouteDecision
from echolm.protocols import RoutingContext
from echolm.settings import Settings, TierSettings


def best_similarity(examples: Sequence[RetrievedExample]) -> float:
    """Highest similarity among ``examples``; 0.0 when there are none."""
    return max((e.similarity for e in examples), default=0.0)


class SimilarityRouter:
    """Offload when at least ``min_examples`` examples have similarity >= ``min_similarity``.

    ``scores`` holds the two quantities compared, so a decision can be read back from them:
    the offload tier's score is the ``min_examples``-th best similarity (the evidence; -1 when
    there are fewer examples, 1 when none are needed), the large tier's is ``min_similarity``
    (the bar); the request is offloaded when evidence >= bar.
    Tiers in between are never chosen by this rule and get no score.
    """

    def __init__(self, tiers: Sequence[TierSettings], *, min_examples: int, min_similarity: float) -> None:
        if not tiers:
            raise ValueError("at least one tier is required")
        if min_examples < 0:
            raise ValueError(f"min_examples must be >= 0, got {min_examples}")
        by_cost = sorted(tiers, key=lambda t: t.relative_cost)
        self.large = by_cost[-1]
        # The offload target must accept examples: prepending them is what makes it good enough.
        self.offload = next((t for t in by_cost if t.use_examples and t is not self.large), None)
        self.min_examples = min_examples
        self.min_similarity = min_similarity

    @classmethod
    def from_settings(cls, settings: Settings) -> SimilarityRouter:
        return cls(settings.tiers, min_examples=settings.offload_min_examples,
                   min_similarity=settings.offload_min_similarity)

    def route(self, context: RoutingContext) -> RouteDecision:
        best = best_similarity(context.examples)
        if self.offload is None:
            return RouteDecision(tier=self.large.name, score=best, use_examples=False,
                                 reason=f"no cheaper tier takes examples; {self.large.name}",
                                 scores={self.large.name: self.min_similarity})
        ranked = sorted((e.similarity for e in context.examples), reverse=True)
        close = sum(1 for s in ranked if s >= self.min_similarity)
        if self.min_examples == 0:
            evidence = 1.0  # nothing is needed: as strong as evidence gets
        elif len(ranked) >= self.min_examples:
            evidence = ranked[self.min_examples - 1]
        else:
            evidence = -1.0  # too few examples: as weak as evidence gets
        scores = {self.offload.name: evidence, self.large.name: self.min_similarity}
        described = (f"{close} of {len(ranked)} examples >= {self.min_similarity:.2f} "
                     f"(best {best:.2f}; need {self.min_examples})")
        if close >= self.min_examples:
            return RouteDecision(tier=self.offload.name, score=best, use_examples=True,
                                 reason=f"{described}: offload to {self.offload.name}", scores=scores)
        return RouteDecision(tier=self.large.name, score=best, use_examples=False,
                             reason=f"{described}: {self.large.name}", scores=scores)


class FixedTierRouter:
    """Always the same tier: the always-large / always-small baselines."""

    def __init__(self, tier: str, *, use_examples: bool) -> None:
        self.tier = tier
        self.use_examples = use_examples

    def route(self, context: RoutingContext) -> RouteDecision:
        examples = "with" if self.use_examples else "without"
        return RouteDecision(tier=self.tier, score=best_similarity(context.examples), use_examples=self.use_examples,
                             reason=f"fixed policy: {self.tier} {examples} examples", scores={self.tier: 1.0})
