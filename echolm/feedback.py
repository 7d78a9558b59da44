"""User feedback as accepted by ``echolm feedback`` and the feedback topic: one JSON object per line.

Three forms (``tenant``, ``source`` (default "user"), ``comment`` and ``feedback_id`` are optional):

* thumbs on a response:        ``{"request_id": "r1", "rating": "up"}``  (also "down", 1/-1, true/false)
* a scalar score:              ``{"request_id": "r1", "score": 4, "score_min": 1, "score_max": 5}``
  (the range defaults to [0, 1]; the stored quality is the score's position in it)
* a pairwise preference, between the answers to two requests or two tiers' answers to one request:
  ``{"request_id_a": "r1", "request_id_b": "r2", "preferred": "b"}`` or
  ``{"request_id": "r1", "tier_a": "large", "tier_b": "small", "score": -1.5}``
  ``preferred`` is "a", "b" or "tie"; ``score`` is the judge scale -3..+3, positive when B is better.
  A stated preference counts as score +-2 ("B is better").

The stored row is about B (``request_id`` = B's request, ``tier`` = B's tier) with quality
``(score + 3) / 6``; A is the other side. Without ``feedback_id`` the id is a hash of the content, so
sending the same line twice stores it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from echolm.history.feedback_store import Feedback
from echolm.judging.pairwise import MAX_SCORE, normalised_quality

PREFERENCE_SCORE = 2.0
FEEDBACK_SCHEMA_VERSION = 1

_ID = Field(default=None, min_length=1, max_length=200)


class FeedbackInput(BaseModel):
    """One feedback line (module docstring). Validation errors name the field and what is wrong."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = FEEDBACK_SCHEMA_VERSION
    feedback_id: str | None = _ID
    request_id: str | None = _ID
    request_id_a: str | None = _ID
    request_id_b: str | None = _ID
    tier: str | None = Field(default=None, max_length=31)
    tier_a: str | None = Field(default=None, max_length=31)
    tier_b: str | None = Field(default=None, max_length=31)
    rating: Literal["up", "down"] | None = None
    preferred: Literal["a", "b", "tie"] | None = None
    score: float | None = Field(default=None, allow_inf_nan=False)
    score_min: float = Field(default=0.0, allow_inf_nan=False)
    score_max: float = Field(default=1.0, allow_inf_nan=False)
    tenant: str = Field(default="default", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    source: str = Field(default="user", min_length=1, max_length=50)
    comment: str | None = Field(default=None, max_length=2000)

    @field_validator("rating", mode="before")
    @classmethod
    def _rating_aliases(cls, value: object) -> object:
        if isinstance(value, bool):
            return "up" if value else "down"
        if isinstance(value, int | float) and value in (1, -1):
            return "up" if value == 1 else "down"
        if isinstance(value, str):
            return {"+1": "up", "1": "up", "-1": "down", "thumbs_up": "up", "thumbs_down": "down"}.get(
                value.strip().lower(), value.strip().lower())
        return value

    @model_validator(mode="after")
    def _one_form(self) -> FeedbackInput:
        pair_of_requests = self.request_id_a is not None or self.request_id_b is not None
        pair_of_tiers = self.tier_a is not None or self.tier_b is not None
        if self.preferred is not None or pair_of_requests or pair_of_tiers:
            self._check_pairwise(pair_of_requests, pair_of_tiers)
        elif self.rating is not None:
            if self.request_id is None:
                raise ValueError("thumbs feedback needs request_id")
            if self.score is not None:
                raise ValueError("give either rating or score, not both")
        elif self.score is not None:
            if self.request_id is None:
                raise ValueError("score feedback needs request_id")
            if self.score_max <= self.score_min:
                raise ValueError(f"score_max ({self.score_max}) must exceed score_min ({self.score_min})")
            if not self.score_min <= self.score <= self.score_max:
                raise ValueError(f"score {self.score} is outside [{self.score_min}, {self.score_max}]")
        else:
            raise ValueError("no feedback: give rating (thumbs), score, or a pairwise preference (preferred or "
                             "score with request_id_a/request_id_b or tier_a/tier_b)")
        return self

    def _check_pairwise(self, pair_of_requests: bool, pair_of_tiers: bool) -> None:
        if self.rating is not None:
            raise ValueError("a pairwise preference takes preferred or score, not rating")
        if (self.preferred is None) == (self.score is None):
            raise ValueError("a pairwise preference needs exactly one of preferred ('a', 'b', 'tie') or score (-3..3)")
        if self.score is not None and not -MAX_SCORE <= self.score <= MAX_SCORE:
            raise ValueError(f"a pairwise score must be in [-3, 3] (positive: B is better), got {self.score}")
        if pair_of_requests:
            if self.request_id_a is None or self.request_id_b is None:
                raise ValueError("a preference between two requests needs both request_id_a and request_id_b")
            if self.request_id is not None:
                raise ValueError("give request_id_a/request_id_b or request_id with tier_a/tier_b, not both")
        elif pair_of_tiers:
            if self.request_id is None or self.tier_a is None or self.tier_b is None:
                raise ValueError("a preference between two tiers' answers needs request_id, tier_a and tier_b")
            if self.tier_a == self.tier_b:
                raise ValueError("tier_a and tier_b must differ")
        else:
            raise ValueError("a pairwise preference needs request_id_a and request_id_b, or request_id with "
                             "tier_a and tier_b")

    def to_feedback(self) -> Feedback:
        """The stored form (module docstring): about B for a pairwise preference."""
        detail = {"comment": self.comment} if self.comment else None
        if self.preferred is not None or self.request_id_a is not None or self.tier_a is not None:
            score = self.score if self.score is not None else \
                {"a": -PREFERENCE_SCORE, "b": PREFERENCE_SCORE, "tie": 0.0}[self.preferred or "tie"]
            if self.request_id_a is not None:
                request_id, other_request, tier, other_tier = self.request_id_b, self.request_id_a, self.tier_b, self.tier_a
            else:
                request_id, other_request, tier, other_tier = self.request_id, None, self.tier_b, self.tier_a
            assert request_id is not None
            return self._with_id(Feedback(
                feedback_id="", request_id=request_id, kind="pairwise", source=self.source, score=score,
                quality=normalised_quality(score), tenant=self.tenant, tier=tier, other_request_id=other_request,
                other_tier=other_tier, detail=detail))
        assert self.request_id is not None
        if self.rating is not None:
            up = self.rating == "up"
            return self._with_id(Feedback(
                feedback_id="", request_id=self.request_id, kind="thumbs", source=self.source,
                score=1.0 if up else -1.0, quality=1.0 if up else 0.0, tenant=self.tenant, tier=self.tier,
                detail=detail))
        assert self.score is not None
        quality = (self.score - self.score_min) / (self.score_max - self.score_min)
        return self._with_id(Feedback(
            feedback_id="", request_id=self.request_id, kind="score", source=self.source, score=self.score,
            quality=quality, tenant=self.tenant, tier=self.tier, detail=detail))

    def _with_id(self, feedback: Feedback) -> Feedback:
        from dataclasses import replace

        return replace(feedback, feedback_id=self.feedback_id or content_id(feedback))


def content_id(feedback: Feedback) -> str:
    """A stable id from what the feedback says (not when it arrived): duplicates collapse."""
    canonical = json.dumps([feedback.kind, feedback.source, feedback.tenant, feedback.request_id, feedback.tier,
                            feedback.other_request_id, feedback.other_tier, round(feedback.score, 6)],
                           separators=(",", ":"))
    return "fb-" + hashlib.blake2b(canonical.encode(), digest_size=12).hexdigest()


def describe_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def parse_feedback_line(line: str) -> FeedbackInput:
    """One JSONL line -> validated feedback; ``ValueError`` with a readable message otherwise."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return FeedbackInput.model_validate(data)
    except ValidationError as exc:
        raise ValueError(describe_error(exc)) from exc


def parse_feedback_lines(lines: Iterable[str]) -> tuple[list[FeedbackInput], list[tuple[int, str]]]:
    """Valid feedback, and (line number, problem) for each rejected line; blank lines are skipped."""
    accepted: list[FeedbackInput] = []
    rejected: list[tuple[int, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            accepted.append(parse_feedback_line(line))
        except ValueError as exc:
            rejected.append((number, str(exc)))
    return accepted, rejected


def wire_record(item: FeedbackInput) -> bytes:
    """The topic payload: the validated line with its ``feedback_id`` filled in."""
    feedback_id = item.feedback_id or item.to_feedback().feedback_id
    return item.model_copy(update={"feedback_id": feedback_id}).model_dump_json(exclude_none=True).encode()
