"""The paper's pairwise LLM judge, independent of the model that judges (paper, "Evaluation in the paper":
pairwise score -3..+3, both orders sampled, ties within +-0.3, win rate = (wins + 0.5 ties) / total).

Sign convention everywhere in this module: a positive score means the *candidate* is better than the
*reference* (e.g. the small tier's answer vs the large tier's). The judge sees the pair twice, once in
each position; the second order's score is negated, and the two are averaged, cancelling position bias.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from echolm.domain import ChatMessage

MAX_SCORE = 3.0
TIE_MARGIN = 0.3

JUDGE_SYSTEM_PROMPT = (
    "You are an impartial judge. You compare two responses to the same user request and decide which "
    "one is better: more correct, helpful, relevant, complete and clear. Do not let the order of the "
    "responses, their length or their style sway you."
)

JUDGE_INSTRUCTIONS = (
    "Compare Response A and Response B to the request above. Explain your reasoning in a few sentences, "
    "then end with a line of the form\n"
    "Score: N\n"
    "where N is an integer from -3 to 3: -3 means A is much better, -2 A is better, -1 A is slightly "
    "better, 0 they are equally good, 1 B is slightly better, 2 B is better, 3 B is much better."
)

Outcome = Literal["win", "tie", "loss"]


def judge_messages(request: str, response_a: str, response_b: str) -> list[ChatMessage]:
    """The judge prompt for one order: A first, B second; the judge's score is positive when B is better."""
    user = (
        f"[Request]\n{request.strip()}\n\n"
        f"[Response A]\n{response_a.strip()}\n\n"
        f"[Response B]\n{response_b.strip()}\n\n"
        f"{JUDGE_INSTRUCTIONS}"
    )
    return [ChatMessage("system", JUDGE_SYSTEM_PROMPT), ChatMessage("user", user)]


_SIGNED = r"([+\-\u2212\u2013]?\s*\d+(?:\.\d+)?)"
_SCORE_PATTERNS = (
    re.compile(r"score\s*(?:is|of)?\s*[:=]?\s*\**\s*" + _SIGNED, re.IGNORECASE),
    re.compile(r"\[\[\s*" + _SIGNED + r"\s*\]\]"),
)


def parse_judge_score(reply: str) -> float | None:
    """The score in a judge's reply, or None if there is none in [-3, 3].

    Looks for the last "Score: N" (also "score is N", "**Score:** N"), then the last "[[N]]", then a reply
    that is only a number. Unicode minus and en dash count as minus. Out-of-range numbers are rejected
    rather than clamped: they mean the judge used another scale.
    """
    for pattern in _SCORE_PATTERNS:
        matches = pattern.findall(reply)
        if matches:
            return _in_range(matches[-1])
    bare = reply.strip().strip("*").strip()
    if re.fullmatch(_SIGNED, bare):
        return _in_range(bare)
    return None


def _in_range(text: str) -> float | None:
    value = float(re.sub(r"\s", "", text).replace("\u2212", "-").replace("\u2013", "-"))
    return value if -MAX_SCORE <= value <= MAX_SCORE else None


def combine_orders(forward: float | None, backward: float | None) -> float | None:
    """Average of the candidate-second score and the negated candidate-first score; one if only one parsed."""
    scores = [s for s in (forward, None if backward is None else -backward) if s is not None]
    return sum(scores) / len(scores) if scores else None


def outcome(score: float, tie_margin: float = TIE_MARGIN) -> Outcome:
    """Win above ``+tie_margin``, loss below ``-tie_margin``, tie within (inclusive)."""
    if score > tie_margin:
        return "win"
    if score < -tie_margin:
        return "loss"
    return "tie"


def win_rate(scores: Iterable[float], tie_margin: float = TIE_MARGIN) -> float:
    """``(wins + 0.5 * ties) / total``; 0.5 means parity with the reference."""
    outcomes = [outcome(s, tie_margin) for s in scores]
    if not outcomes:
        raise ValueError("win rate of no scores")
    return (outcomes.count("win") + 0.5 * outcomes.count("tie")) / len(outcomes)


def normalised_quality(score: float) -> float:
    """A judge score mapped to [0, 1] (``(s + 3) / 6``), the quality the router and replay agent use."""
    return (max(-MAX_SCORE, min(MAX_SCORE, score)) + MAX_SCORE) / (2 * MAX_SCORE)


def should_sample(key: str, rate: float) -> bool:
    """Whether a request (by id) is in the judged sample: a stable hash, so every process agrees."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


class JudgeError(Exception):
    """The judge gave no usable score in either order."""


@dataclass(frozen=True, slots=True)
class PairwiseVerdict:
    """``score`` > 0: the candidate is better. ``forward``: candidate shown second; ``backward``: first
    (raw judge score, before negation). Either may be None if that reply had no score."""

    score: float
    outcome: Outcome
    forward: float | None
    backward: float | None


class PairwiseJudge:
    """Judges a candidate against a reference with any chat model behind ``generate``."""

    def __init__(
        self,
        generate: Callable[[list[ChatMessage]], Awaitable[str]],
        *,
        tie_margin: float = TIE_MARGIN,
        timeout_s: float = 120.0,
        both_orders: bool = True,
    ) -> None:
        self._generate = generate
        self.tie_margin = tie_margin
        self.timeout_s = timeout_s
        self.both_orders = both_orders

    async def compare(self, request: str, candidate: str, reference: str) -> PairwiseVerdict:
        """Both orders concurrently, each bounded by ``timeout_s``; raises ``JudgeError`` if neither parses
        (a timeout or failure of one order is tolerated when the other gives a score)."""
        orders: list[Sequence[ChatMessage]] = [judge_messages(request, reference, candidate)]
        if self.both_orders:
            orders.append(judge_messages(request, candidate, reference))
        replies = await asyncio.gather(
            *(asyncio.wait_for(self._generate(list(messages)), self.timeout_s) for messages in orders),
            return_exceptions=True,
        )
        parsed = [parse_judge_score(r) if isinstance(r, str) else None for r in replies]
        forward = parsed[0]
        backward = parsed[1] if self.both_orders else None
        score = combine_orders(forward, backward)
        if score is None:
            problems = [repr(r)[:200] for r in replies]
            raise JudgeError(f"no judge score in either order: {problems}")
        return PairwiseVerdict(score, outcome(score, self.tie_margin), forward, backward)
