"""Verbatim reuse: answer a request with a cached answer, without generating, when it is a repeat.

The paper's point is that a semantic cache (return the nearest cached answer verbatim) loses quality
on near-duplicates that differ in content: "the same task with camelCase names" or "the same problem
with other numbers" needs a new answer, for which the cached one is only an example. On *exact*
repeats, though, generating again is waste: a verbatim answer is as good and costs nothing. So
EchoLM can treat reuse as one more option before routing, off by default and gated by a similarity
bar high enough that only repeats pass (``ECHOLM_REUSE_MIN_SIMILARITY``, e.g. 0.995), and by the
example's quality where a judge or replay has scored it.
"""

from __future__ import annotations

from collections.abc import Sequence

from echolm.domain import REUSE_TIER, RetrievedExample

__all__ = ["REUSE_TIER", "reusable_example"]


def reusable_example(examples: Sequence[RetrievedExample], min_similarity: float | None,
                     min_quality: float) -> RetrievedExample | None:
    """The example whose answer can be returned verbatim, or None.

    The most similar example qualifies when its similarity is at least ``min_similarity`` (None:
    reuse is off) and its answer is not empty nor known to be poor (``quality`` below ``min_quality``;
    unscored examples pass). Ties go to the lower id, so the choice is reproducible.
    """
    if min_similarity is None or not examples:
        return None
    best = min(examples, key=lambda e: (-e.similarity, e.example.id))
    if best.similarity < min_similarity or not best.example.response.strip():
        return None
    if best.example.quality is not None and best.example.quality < min_quality:
        return None
    return best
