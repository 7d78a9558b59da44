"""Routing policies: which model tier answers a request, and whether examples are prepended."""

from echolm.routing.factory import make_router
from echolm.routing.similarity import FixedTierRouter, SimilarityRouter

__all__ = ["FixedTierRouter", "SimilarityRouter", "make_router"]
