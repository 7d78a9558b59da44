"""Builds the configured ``Router`` from ``Settings.router_policy``."""

from __future__ import annotations

from echolm.protocols import Router
from echolm.routing.similarity import FixedTierRouter, SimilarityRouter
from echolm.settings import Settings


def make_router(settings: Settings) -> Router:
    """similarity: offload when close examples exist; bandit: the learned, load-aware contextual bandit
    (``routing.bandit_router``); always-large: the most expensive tier without examples; always-small:
    the cheapest tier, with examples if that tier takes them."""
    policy = settings.router_policy
    if policy == "similarity":
        return SimilarityRouter.from_settings(settings)
    if policy == "always-large":
        return FixedTierRouter(settings.largest_tier.name, use_examples=False)
    if policy == "bandit":
        from echolm.routing.bandit_router import BanditRouterService

        return BanditRouterService(settings)
    if policy == "always-small":
        cheapest = settings.tiers_by_cost[0]
        return FixedTierRouter(cheapest.name, use_examples=cheapest.use_examples)
    raise ValueError(f"unknown router policy {policy!r}")
