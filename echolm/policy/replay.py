"""Which cached examples to replay on the large model, and when (paper, "Replay and cache management").

Potential gain of an example ``e`` (paper): each time ``e`` is used, the response it helped produce has
a normalised quality ``q`` in [0, 1] and was served by a model of normalised cost ``c`` in [0, 1] (the
tier's cost over the costliest tier's); the sample ``(1 - q) * c`` is folded into a decaying average

    G(e) <- (1 - alpha) * G(e) + alpha * (1 - q) * c        (the first use sets G(e) directly).

Replay rule used here (the paper gives no formula for its cut-off; we choose this one):

* nothing at all while the large tier's load EMA is at or above the idle threshold (live traffic first);
* candidates replayed ``max_rounds`` (5) times or more are skipped;
* candidates are taken in decreasing ``G`` (ties: more uses, then lower id), up to ``budget``;
* cut-off: a replay is worth it only if ``G(e) * uses(e) >= replay_cost``, where
  ``uses`` is the example's use count since its last replay (past popularity predicts reuse) and
  ``replay_cost = samples_per_replay * cost_per_sample``, in the same normalised units as ``G``. The walk
  stops at the first candidate in ``G`` order that fails it when ``stop_at_cutoff`` (the paper's
  "stop at the cut-off"); otherwise such candidates are skipped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ExampleGain:
    """Replay bookkeeping of one example: its potential gain and how often it was used and replayed."""

    example_id: int
    gain: float = 0.0
    uses: float = 0.0
    replay_rounds: int = 0


@dataclass
class GainTracker:
    """``G(e)`` per example as a decaying average over its uses (module docstring).

    ``uses`` counts uses since the example's last replay: a replayed example is a new version whose
    gain has to be measured afresh, so both reset while ``replay_rounds`` grows.
    """

    smoothing: float = 0.2
    gains: dict[int, ExampleGain] = field(default_factory=dict)

    def observe_use(self, example_id: int, quality: float, cost: float) -> ExampleGain:
        """One use of ``example_id``: ``quality`` and ``cost`` normalised to [0, 1]."""
        sample = (1.0 - _unit(quality)) * _unit(cost)
        old = self.gains.get(example_id)
        if old is None or old.uses == 0:
            new = ExampleGain(example_id, sample, 1.0, old.replay_rounds if old else 0)
        else:
            gain = old.gain + self.smoothing * (sample - old.gain)
            new = replace(old, gain=gain, uses=old.uses + 1.0)
        self.gains[example_id] = new
        return new

    def on_replayed(self, example_id: int) -> ExampleGain:
        """The example got a new version: one more round, and its gain must be learned anew."""
        old = self.gains.get(example_id, ExampleGain(example_id))
        new = ExampleGain(example_id, 0.0, 0.0, old.replay_rounds + 1)
        self.gains[example_id] = new
        return new

    def candidates(self) -> list[ExampleGain]:
        return list(self.gains.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "smoothing": self.smoothing,
            "gains": [[g.example_id, g.gain, g.uses, g.replay_rounds] for g in self.gains.values()],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> GainTracker:
        gains = {int(i): ExampleGain(int(i), float(g), float(u), int(r)) for i, g, u, r in state["gains"]}
        return cls(smoothing=float(state["smoothing"]), gains=gains)


@dataclass(frozen=True)
class ReplayPlanner:
    """Picks examples to replay now (module docstring gives the rule)."""

    samples_per_replay: int = 3
    cost_per_sample: float = 0.05
    max_rounds: int = 5
    stop_at_cutoff: bool = True

    @property
    def replay_cost(self) -> float:
        return self.samples_per_replay * self.cost_per_sample

    def pays(self, candidate: ExampleGain) -> bool:
        return candidate.gain * candidate.uses >= self.replay_cost and candidate.gain > 0.0

    def select(
        self, candidates: Iterable[ExampleGain], budget: int, large_load: float, idle_threshold: float
    ) -> list[ExampleGain]:
        """Up to ``budget`` examples to replay now, highest ``G`` first; empty unless the large tier is idle."""
        if budget <= 0 or large_load >= idle_threshold:
            return []
        eligible = [c for c in candidates if c.replay_rounds < self.max_rounds]
        eligible.sort(key=lambda c: (-c.gain, -c.uses, c.example_id))
        chosen: list[ExampleGain] = []
        for candidate in eligible:
            if len(chosen) >= budget:
                break
            if not self.pays(candidate):
                if self.stop_at_cutoff:
                    break
                continue
            chosen.append(candidate)
        return chosen


def best_of(samples: Sequence[T], scorer: Callable[[T], float]) -> tuple[T, float]:
    """The best-scoring sample and its score (paper: several samples, keep the best). Ties: the first."""
    if not samples:
        raise ValueError("best_of needs at least one sample")
    scores = [scorer(s) for s in samples]
    best = max(range(len(samples)), key=lambda i: (scores[i], -i))
    return samples[best], scores[best]


async def best_of_async(samples: Sequence[T], scorer: Callable[[T], Awaitable[float]]) -> tuple[T, float]:
    """``best_of`` for an async scorer (an LLM judge). Scored one by one to keep load on the judge low."""
    if not samples:
        raise ValueError("best_of needs at least one sample")
    scores = [await scorer(s) for s in samples]
    best = max(range(len(samples)), key=lambda i: (scores[i], -i))
    return samples[best], scores[best]


def _unit(value: float) -> float:
    return min(1.0, max(0.0, float(value)))
