"""The replay service: upgrades weak, much-used cache entries on the large tier while it is idle.

One round (``ReplayService.run_round``):

1. read the large tier's load; if it is not under ``idle_threshold``, do nothing (live traffic first);
2. take the examples with the highest potential gain G(e) from the statistics and let
   ``policy.replay.ReplayPlanner`` choose (cut-off where a replay no longer pays; at most
   ``max_rounds`` = 5 replays per cache entry);
3. for each chosen example whose current answer the judge cannot rank below a new one (the task
   verifier already passes it: ``ReplayJudge.unbeatable``), keep it without generating; otherwise
   generate ``samples`` answers on the large tier, re-reading the load
   before every sample and before judging, and giving up on the example at once (writing nothing,
   counting no round) when the tier got busy;
4. score the current answer and the samples with a ``ReplayJudge``; if the best sample beats the
   current answer by more than ``min_improvement``, write it as a new version of the entry with
   ``SqlHistoryStore.supersede_example`` (lineage: ``parent_id``, version, replay round in the
   statistics, judge quality), which emits the cache events retrievers apply without a restart;
   otherwise keep the current answer. Either way the round counts towards the cap.

Judges (``select_judge``), in the order the configuration allows:

* ``PairwiseReplayJudge``: the paper's LLM judge (pairwise, -3..+3, both orders; ``judging.judge``'s
  ``LlmPairwiseJudge`` over ``replay.judge_tier``), each sample against the current answer, which
  scores 0;
* ``VerifierReplayJudge``: where the example's prompt has a reference (numeric answer or Python tests;
  a ``judging.judge.ReferenceBook`` from ``replay.references_path``, else ``learning.references_path``),
  the task verifier's score in [0, 1] for the current answer and every sample;
* ``CompletenessReplayJudge`` (fallback, weak): a sample that did not finish (``finish_reason`` other
  than "stop") scores 0, a complete one its length in characters; the current answer counts as
  complete. So without a judge or reference, a replay upgrades only to a longer complete answer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, Protocol

from echolm.domain import ChatMessage, EchoLMError, Example, GenerationParams, GenerationResult
from echolm.history.example_stats_store import ExampleStats, ExampleStatsStore, UsagePolicy
from echolm.judging.judge import (
    Judge,
    JudgeTask,
    LlmPairwiseJudge,
    ReferenceBook,
    TaskReference,
    VerifierJudge,
)
from echolm.judging.pairwise import JudgeError, normalised_quality
from echolm.policy.eviction import DECAY_PER_HOUR
from echolm.policy.load_bias import LoadTracker
from echolm.policy.replay import ReplayPlanner, best_of
from echolm.protocols import Generator
from echolm.settings import Settings, TierSettings

if TYPE_CHECKING:
    from echolm.history.store import SqlHistoryStore

log = logging.getLogger(__name__)

LoadProbe = Callable[[], Awaitable[float]]
"""The replay tier's current load (smoothed), in the units of ``idle_threshold``."""


class ReplayHistory(Protocol):
    """The part of the history store replay writes to (``SqlHistoryStore``, ``InMemoryHistoryStore``)."""

    async def examples_by_id(self, ids: Sequence[int]) -> list[Example]: ...

    async def supersede_example(self, example_id: int, *, response: str, model: str, tier: str,
                                quality: float | None = None) -> int: ...


@dataclass(frozen=True, slots=True)
class Scored:
    """A judge's view of one answer: ``score`` is comparable among the answers to one prompt (higher is
    better); ``quality`` is a normalised [0, 1] quality where the judge has one (stored on the example)."""

    score: float
    quality: float | None = None


class ReplayJudge(Protocol):
    name: str

    async def unbeatable(self, example: Example) -> Scored | None:
        """The current answer's score when no sample could score higher (a verifier passes it), else None:
        the replay then keeps it without spending the tier's time on samples."""
        ...

    async def judge(self, example: Example, samples: Sequence[GenerationResult]) -> tuple[Scored, list[Scored]]:
        """(the current answer's score, each sample's score), on one scale."""
        ...


class PairwiseReplayJudge:
    """Each sample against the current answer with a pairwise ``Judge`` (``judging.judge.LlmPairwiseJudge``:
    the paper's -3..+3, both orders); the current answer scores 0."""

    name = "llm"

    def __init__(self, judge: Judge) -> None:
        self._judge = judge

    async def unbeatable(self, example: Example) -> Scored | None:
        return None  # a sample can always be preferred to the current answer

    async def judge(self, example: Example, samples: Sequence[GenerationResult]) -> tuple[Scored, list[Scored]]:
        scored = []
        for sample in samples:  # one by one: the judge model is the idle tier we must not flood
            try:
                verdict = await self._judge.judge(JudgeTask(example.prompt, sample.text,
                                                            reference_answer=example.response))
                scored.append(Scored(verdict.score, verdict.quality))
            except JudgeError as exc:
                log.warning("replay judge gave no score for example %d: %s", example.id, exc)
                scored.append(Scored(-math.inf))
        return Scored(0.0, normalised_quality(0.0)), scored


class VerifierReplayJudge:
    """Scores every answer with the task verifier for its prompt's reference (``judging.judge``:
    fraction of tests passed, or 1/0 for a numeric match)."""

    name = "verifier"

    def __init__(self, references: ReferenceBook, verifier: VerifierJudge | None = None) -> None:
        self._references = references
        self._verifier = verifier or VerifierJudge()
        # The current answer's score from ``unbeatable``, reused by the ``judge`` call that follows it for
        # the same answer: for MBPP each score is a sandboxed test run.
        self._last_current: tuple[int, str, Scored] | None = None

    def reference_for(self, example: Example) -> TaskReference | None:
        return self._references.lookup(example.prompt)

    async def unbeatable(self, example: Example) -> Scored | None:
        reference = self.reference_for(example)
        if reference is None:
            return None
        current = await self._score(example, reference, example.response)
        self._last_current = (example.id, example.response, current)
        return current if current.score >= 1.0 else None  # 1.0: the answer matches / every test passes

    async def _score(self, example: Example, reference: TaskReference, answer: str) -> Scored:
        try:
            verdict = await self._verifier.judge(JudgeTask(example.prompt, answer, reference=reference))
        except JudgeError as exc:  # an unusable reference: no answer can be told better
            log.warning("replay verifier failed for example %d: %s", example.id, exc)
            return Scored(0.0, None)
        return Scored(verdict.score, verdict.quality)

    async def judge(self, example: Example, samples: Sequence[GenerationResult]) -> tuple[Scored, list[Scored]]:
        reference = self.reference_for(example)
        if reference is None:
            raise ValueError(f"example {example.id} has no reference")
        remembered, self._last_current = self._last_current, None
        if remembered is not None and remembered[:2] == (example.id, example.response):
            current = remembered[2]
        else:
            current = await self._score(example, reference, example.response)
        return current, [await self._score(example, reference, s.text) for s in samples]


class CompletenessReplayJudge:
    """The fallback without judge or reference: the longest complete answer (module docstring)."""

    name = "heuristic"

    async def unbeatable(self, example: Example) -> Scored | None:
        return None

    async def judge(self, example: Example, samples: Sequence[GenerationResult]) -> tuple[Scored, list[Scored]]:
        def score(text: str, finished: bool) -> Scored:
            return Scored(float(len(text.strip())) if finished and text.strip() else 0.0)

        return score(example.response, True), [score(s.text, s.finish_reason == "stop") for s in samples]


def select_judge(mode: str, *, llm: ReplayJudge | None, verifier: VerifierReplayJudge | None,
                 fallback: ReplayJudge | None = None) -> Callable[[Example], ReplayJudge]:
    """The judge for each example: ``auto`` takes the LLM judge if configured, else the verifier when
    the example has a reference, else the completeness heuristic; the other modes force one."""
    heuristic = fallback or CompletenessReplayJudge()

    def choose(example: Example) -> ReplayJudge:
        if mode == "llm" or (mode == "auto" and llm is not None):
            if llm is None:
                raise ValueError("replay.judge=llm needs replay.judge_tier")
            return llm
        if mode in ("verifier", "auto") and verifier is not None and verifier.reference_for(example):
            return verifier
        if mode == "verifier":
            raise ValueError(f"replay.judge=verifier but example {example.id} has no reference")
        return heuristic

    return choose


OutcomeStatus = Literal["upgraded", "kept", "yielded", "failed", "stale", "planned"]


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """What happened to one chosen example. ``score_before``: the current answer's judge score;
    ``score_best``: the best sample's. ``planned``: a dry run's choice (nothing generated)."""

    example_id: int
    status: OutcomeStatus
    gain: float
    uses: float
    replay_round: int
    new_example_id: int | None = None
    judge: str | None = None
    samples: int = 0
    score_before: float | None = None
    score_best: float | None = None
    detail: str = ""

    @property
    def score_after(self) -> float | None:
        """The entry's score after the round: the better of its current answer and the best sample."""
        if self.status == "upgraded":
            return self.score_best
        return self.score_before if self.status == "kept" else None


@dataclass
class RoundReport:
    """One replay round: the load seen, what the planner considered and skipped, and each outcome."""

    load: float
    idle: bool
    considered: int = 0
    skipped_cap: int = 0
    skipped_cutoff: int = 0
    outcomes: list[ReplayOutcome] = field(default_factory=list)

    def count(self, status: OutcomeStatus) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """Knobs of the service (``echolm.settings.ReplaySettings`` maps onto these)."""

    tier: str
    samples: int = 3
    params: GenerationParams = GenerationParams(temperature=0.7)
    examples_per_round: int = 4
    idle_threshold: float = 0.2
    min_improvement: float = 0.0
    candidate_limit: int = 1000
    decay_per_hour: float = DECAY_PER_HOUR


class ReplayService:
    """Plans and runs replay rounds; every collaborator is injected (module docstring)."""

    def __init__(self, history: ReplayHistory, stats: ExampleStatsStore, generator: Generator,
                 judges: Callable[[Example], ReplayJudge], planner: ReplayPlanner, load: LoadProbe,
                 config: ReplayConfig) -> None:
        if planner.max_rounds > 5:
            raise ValueError("the paper caps replays at 5 rounds per example")
        self._history = history
        self._stats = stats
        self._generator = generator
        self._judges = judges
        self._planner = planner
        self._load = load
        self.config = config

    async def _busy(self) -> tuple[bool, float]:
        load = await self._load()
        return load >= self.config.idle_threshold, load

    async def plan(self, load: float, budget: int | None = None) -> tuple[list[ExampleStats], RoundReport]:
        """The examples to replay now at this load, and the report of what was considered and skipped."""
        idle = load < self.config.idle_threshold
        report = RoundReport(load=load, idle=idle)
        candidates = await self._stats.gain_candidates(self.config.candidate_limit)
        report.considered = len(candidates)
        report.skipped_cap = sum(1 for c in candidates if c.replay_rounds >= self._planner.max_rounds)
        if not idle:
            return [], report
        by_id = {c.example_id: c for c in candidates}
        budget = self.config.examples_per_round if budget is None else budget
        chosen = self._planner.select([c.as_gain() for c in candidates], budget, load, self.config.idle_threshold)
        under_cap = [c for c in candidates if c.replay_rounds < self._planner.max_rounds]
        report.skipped_cutoff = sum(1 for c in under_cap if not self._planner.pays(c.as_gain()))
        return [by_id[c.example_id] for c in chosen], report

    async def run_round(self, budget: int | None = None, *, dry_run: bool = False,
                        on_outcome: Callable[[ReplayOutcome], None] | None = None) -> RoundReport:
        """One round (module docstring). Never starts while the tier is busy; stops at the first yield.
        ``dry_run`` plans without generating; ``on_outcome`` sees each outcome as it happens."""
        busy, load = await self._busy()
        chosen, report = await self.plan(load, budget)
        if busy:
            return report
        for candidate in chosen:
            outcome = self._outcome(candidate, "planned") if dry_run else await self.replay_one(candidate)
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if outcome.status == "yielded":
                break
        return report

    def _outcome(self, candidate: ExampleStats, status: OutcomeStatus, **fields: object) -> ReplayOutcome:
        return ReplayOutcome(example_id=candidate.example_id, status=status, gain=candidate.gain,
                             uses=float(candidate.uses), replay_round=candidate.replay_rounds + 1,
                             **fields)  # type: ignore[arg-type]

    async def replay_one(self, candidate: ExampleStats) -> ReplayOutcome:
        """Replay one example (steps 3-4 of the module docstring)."""
        found = await self._history.examples_by_id([candidate.example_id])
        if not found:
            return self._outcome(candidate, "stale", detail="example no longer exists")
        example = found[0]
        judge = self._judges(example)
        settled = await judge.unbeatable(example)
        if settled is not None:
            await self._stats.mark_replayed(example.id, None, score=settled.score,
                                            decay_per_hour=self.config.decay_per_hour)
            return self._outcome(candidate, "kept", judge=judge.name, samples=0, score_before=settled.score,
                                 detail="no sample can beat the current answer")
        samples: list[GenerationResult] = []
        errors: list[str] = []
        for index in range(self.config.samples):
            busy, load = await self._busy()
            if busy:
                return self._outcome(candidate, "yielded", samples=len(samples),
                                     detail=f"load {load:.2f} before sample {index + 1}")
            try:
                samples.append(await self._generator.generate(
                    [ChatMessage("user", example.prompt)], self.config.params,
                    request_id=f"replay-{example.id}-r{candidate.replay_rounds + 1}-s{index}"))
            except EchoLMError as exc:  # one failed sample is not the end of the replay
                errors.append(str(exc))
                log.warning("replay sample %d of example %d failed: %s", index + 1, example.id, exc)
        if not samples:
            await self._stats.mark_replayed(example.id, None, score=None, decay_per_hour=self.config.decay_per_hour)
            return self._outcome(candidate, "failed", detail="; ".join(errors)[:500])
        busy, load = await self._busy()
        if busy:
            return self._outcome(candidate, "yielded", samples=len(samples), detail=f"load {load:.2f} before judging")
        current, scored = await judge.judge(example, samples)
        best_index, best = best_of(list(range(len(samples))), lambda i: scored[i].score)
        winner = samples[best_index]
        common = {"judge": judge.name, "samples": len(samples), "score_before": current.score, "score_best": best}
        if best > current.score + self.config.min_improvement:
            try:
                new_id = await self._history.supersede_example(
                    example.id, response=winner.text, model=winner.model, tier=self.config.tier,
                    quality=scored[best_index].quality)
            except (KeyError, ValueError) as exc:  # evicted or replaced while we generated
                return self._outcome(candidate, "stale", detail=str(exc), **common)
            await self._stats.mark_replayed(example.id, new_id, score=best, decay_per_hour=self.config.decay_per_hour)
            log.info("replay upgraded example %d -> %d (%s judge: %.3g -> %.3g)", example.id, new_id, judge.name,
                     current.score, best)
            return self._outcome(candidate, "upgraded", new_example_id=new_id, **common)
        await self._stats.mark_replayed(example.id, None, score=best, decay_per_hour=self.config.decay_per_hour)
        return self._outcome(candidate, "kept", **common)


class HistoryLoadProbe:
    """A tier's load from the history, until a live per-tier load feed exists.

    One sample = the fraction of the last ``window_s`` the tier spent generating (logged ``generate``
    timings of requests finished in the window, over ``window_s x concurrency``) plus the requests
    this process is generating on it right now (``in_flight``, per unit of concurrency), as in
    ``policy.load_bias.normalised_load``. The probe returns ``max(EMA, sample)``: the EMA (half-life
    ``half_life_s``) keeps a replay from starting in a short lull, the raw sample makes it yield as
    soon as traffic shows up. Limits: a generation still running in another process is seen only
    when it finishes, and requests queued on the tier's topic are not seen at all (the replay stage
    combines this probe with the generate workers' load reports, which see both: ``highest_load``).
    """

    def __init__(self, busy_seconds: Callable[[datetime], Awaitable[float]], *, tier: str, window_s: float,
                 concurrency: int = 1, half_life_s: float = 10.0, in_flight: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._busy_seconds = busy_seconds
        self._tier = tier
        self._window_s = window_s
        self._capacity = max(1, concurrency)
        self._in_flight = in_flight
        self._clock = clock
        self.tracker = LoadTracker(half_life_s=half_life_s)

    async def __call__(self) -> float:
        now = self._clock()
        busy = await self._busy_seconds(datetime.fromtimestamp(now - self._window_s, UTC))
        sample = busy / (self._window_s * self._capacity)
        if self._in_flight is not None:
            sample += max(0.0, self._in_flight()) / self._capacity
        return max(self.tracker.update(self._tier, sample, now), sample)


def highest_load(*probes: LoadProbe) -> LoadProbe:
    """A probe reporting the highest of several load estimates (replay waits until every one says idle)."""
    async def probe() -> float:
        return max([await p() for p in probes], default=0.0)

    return probe


def _tier_load_probes(settings: Settings, history: SqlHistoryStore, tier: TierSettings,
                      in_flight: Callable[[str], Callable[[], float]] | None,
                      live_load: Callable[[str], LoadProbe] | None) -> list[LoadProbe]:
    from echolm.history.example_stats_store import tier_busy_seconds

    async def busy(since: datetime) -> float:
        return await tier_busy_seconds(history, tier.name, since)

    config = settings.replay
    probes: list[LoadProbe] = [HistoryLoadProbe(busy, tier=tier.name, window_s=config.load_window_s,
                                                concurrency=tier.concurrency, half_life_s=config.load_half_life_s,
                                                in_flight=in_flight(tier.name) if in_flight else None)]
    if live_load is not None:
        probes.append(live_load(tier.name))
    return probes


def replay_service_from_settings(settings: Settings, history: SqlHistoryStore, generator: Generator, *,
                                 judge_generator: Generator | None = None, load: LoadProbe | None = None,
                                 in_flight: Callable[[str], Callable[[], float]] | None = None,
                                 live_load: Callable[[str], LoadProbe] | None = None) -> ReplayService:
    """The replay service as ``settings.replay`` configures it, on the SQL history store.

    ``load`` replaces the load estimate; by default it is the highest ``HistoryLoadProbe`` of the tiers
    ``replay.idle_scope`` watches (each with this process's ``in_flight(tier)``), combined with
    ``live_load(tier)`` (the generate workers' load reports) when given.
    """
    config = settings.replay
    tier = settings.tier(config.tier) if config.tier else settings.largest_tier
    if load is None:
        watched = list(settings.tiers) if config.idle_scope == "all-tiers" else [tier]
        load = highest_load(*(probe for t in watched for probe in _tier_load_probes(settings, history, t, in_flight,
                                                                                    live_load)))
    llm_judge: ReplayJudge | None = None
    if judge_generator is not None:
        judge_tier = settings.tier(config.judge_tier) if config.judge_tier else tier
        llm_judge = PairwiseReplayJudge(LlmPairwiseJudge.over(
            judge_generator, max_tokens=settings.learning.judge_max_tokens, timeout_s=judge_tier.timeout_s))
    # The replay's references, else the ones the judge stage uses.
    references_path = config.references_path or settings.learning.references_path
    verifier = VerifierReplayJudge(ReferenceBook.load(references_path)) if references_path else None
    planner = ReplayPlanner(samples_per_replay=config.samples, cost_per_sample=config.cost_per_sample,
                            max_rounds=config.max_rounds)
    params = GenerationParams(max_tokens=config.max_tokens or tier.max_tokens, temperature=config.temperature)
    from echolm.history.example_stats_store import SqlExampleStatsStore

    return ReplayService(
        history, SqlExampleStatsStore(history), generator, select_judge(config.judge, llm=llm_judge, verifier=verifier),
        planner, load,
        ReplayConfig(tier=tier.name, samples=config.samples, params=params, examples_per_round=config.examples_per_round,
                     idle_threshold=config.idle_threshold, min_improvement=config.min_improvement,
                     decay_per_hour=settings.eviction.decay_per_hour))


def usage_policy_from_settings(settings: Settings) -> UsagePolicy:
    """How uses become statistics: tier costs normalised by the costliest tier's ``relative_cost``."""
    top = settings.largest_tier.relative_cost
    return UsagePolicy(tier_costs={t.name: t.relative_cost / top for t in settings.tiers},
                       smoothing=settings.replay.gain_smoothing, default_quality=settings.replay.default_quality,
                       bad_quality_below=settings.replay.bad_quality_below,
                       decay_per_hour=settings.eviction.decay_per_hour)
