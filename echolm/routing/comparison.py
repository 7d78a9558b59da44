"""Request ids of selective-feedback comparisons (paper: when the router's scores are nearly uniform,
serve the top tier and also run a second one, to collect a pairwise preference).

The second generation travels the pipeline as its own request, ``<request id>~vs~<tier>``, so it is
logged like any answer, never returned to the requester (batch jobs ignore ids they did not send),
and the judge stage pairs it with the original by this id.
"""

from __future__ import annotations

COMPARISON_MARK = "~vs~"
MAX_REQUEST_ID_CHARS = 200


def comparison_request_id(request_id: str, tier: str) -> str | None:
    """The comparison's request id, or None when it would exceed the request id limit."""
    candidate = f"{request_id}{COMPARISON_MARK}{tier}"
    return candidate if len(candidate) <= MAX_REQUEST_ID_CHARS else None


def split_comparison_id(request_id: str) -> tuple[str, str] | None:
    """(original request id, compared tier) for a comparison id; None for an ordinary request id."""
    base, mark, tier = request_id.rpartition(COMPARISON_MARK)
    if not mark or not base or not tier:
        return None
    return base, tier
