"""Orchestration of an evaluation run: workloads, similarity tables, and the generation phases.

Generation runs in **phases of decreasing priority**, each over every workload, so that a run stopped
early (or given a ``--max-minutes`` budget) still has the most important arms for all data sets:

1. ``cache``: the large model answers the cache part (this seeds the example cache);
2. ``large``, ``small``: the traffic on each tier alone;
3. ``nearest``, ``random``: the small tier with stage 1's nearest examples, and with random ones;
4. ``cache-size``: stage 1 on smaller caches (prefixes of the cache part);
5. ``selected``: stage 2's selection at cold start (similarity), when ``echolm.selection`` provides one;
6. ``learned``: stage 2 with a helpfulness proxy trained on the outcomes of phases 3
   (``echolm.evaluation.stage2``); most of its prompts equal an earlier arm's and cost nothing;
7. ``replay``: the replay agent upgrades cache entries on the traffic's verifier feedback, then the small
   tier serves the traffic with the upgraded nearest examples (``echolm.evaluation.replay_phase``);
8. ``calibrate``: a few requests of each main arm timed again with the serving thread count (the cost
   model's input; see ``echolm.evaluation.efficiency``).

Every generation lands in the ``GenerationCache`` first, so phases already done cost nothing on a re-run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from echolm.datasets import TaskItem
from echolm.domain import Example
from echolm.evaluation.generation_cache import CachedGeneration, GenerationCache, GenerationJob, generate_missing
from echolm.evaluation.systems import Arm, ArmFactory, SimilarityTable, cache_examples, job_for
from echolm.evaluation.workload import Workload

if TYPE_CHECKING:
    from echolm.evaluation.replay_phase import ReplayOutcome
from echolm.protocols import Embedder
from echolm.settings import Settings

log = logging.getLogger(__name__)

PHASES = ("cache", "large", "small", "nearest", "random", "cache-size", "selected", "learned", "replay", "calibrate")
# The phases whose generations a phase's jobs are built from (the cache part's answers are the examples;
# trained stage 2 learns from the nearest and random arms' outcomes).
PHASE_NEEDS = {"nearest": ("cache",), "random": ("cache",), "selected": ("cache",), "cache-size": ("cache",),
               "learned": ("cache", "nearest", "random"), "replay": ("cache", "nearest")}
REPLAYED_ARM = "small+replayed"
CALIBRATION_ARMS = ("large", "small", "small+nearest")
# Cache sizes of the sweep, as fractions of the cache part, in the order they are generated.
CACHE_SIZE_FRACTIONS = (0.5, 0.1, 0.25, 0.01)


def cache_sizes(n_cache: int, fractions: Sequence[float] = CACHE_SIZE_FRACTIONS) -> list[int]:
    """Distinct cache sizes (at least 1 entry, below the full cache) for the given fractions, in order."""
    sizes: list[int] = []
    for fraction in fractions:
        size = max(1, round(fraction * n_cache))
        if size < n_cache and size not in sizes:
            sizes.append(size)
    return sizes


class MissingGenerations(RuntimeError):
    """A result needs generations that are not in the cache yet (run the generation phases first)."""


@dataclass
class WorkloadRun:
    """One workload with its similarity table, example cache and arms; builds the jobs of each phase."""

    workload: Workload
    settings: Settings
    cache: GenerationCache
    table: SimilarityTable
    k: int
    seed: int
    embed_seconds_per_request: float
    vectors: dict[str, np.ndarray]
    selector: Callable[[TaskItem, list[tuple[int, float]], list[Example]], tuple[int, ...]] | None = None
    cache_vectors: np.ndarray | None = None
    # Stage 2 with a trained proxy: computes every request's kept cache indices from the outcomes of
    # earlier arms (raises MissingGenerations until they exist); see echolm.evaluation.stage2.
    learned_selector: Callable[[WorkloadRun], dict[str, tuple[int, ...]]] | None = None
    # The replay phase: (run, generate) -> the stored replay outcome, replaying first when ``generate``
    # (None when there is none); see echolm.evaluation.replay_phase.stored_or_replayed.
    replayer: Callable[[WorkloadRun, bool], ReplayOutcome | None] | None = None
    _examples: list[Example] | None = field(default=None, init=False)
    _replay: ReplayOutcome | None = field(default=None, init=False)
    _learned: dict[str, tuple[int, ...]] | None = field(default=None, init=False)

    @classmethod
    def build(cls, workload: Workload, settings: Settings, cache: GenerationCache, embedder: Embedder, *,
              k: int, seed: int) -> WorkloadRun:
        requests = workload.unique_traffic
        embedder.embed([requests[0].prompt])  # loads the model: not part of the per-request overhead
        per_request = float("inf")
        for item in requests[:16]:  # one at a time, as a request arrives; the fastest of a few (busy machine)
            started = time.perf_counter()
            embedder.embed([item.prompt])
            per_request = min(per_request, time.perf_counter() - started)
        request_vectors = embedder.embed([item.prompt for item in requests])
        cache_vectors = embedder.embed([item.prompt for item in workload.cache])
        ids = [item.id for item in requests] + [f"cache:{item.id}" for item in workload.cache]
        table = SimilarityTable(ids, np.vstack([request_vectors, cache_vectors]), cache_vectors)
        vectors = {item.id: vector for item, vector in zip(requests, request_vectors, strict=True)}
        return cls(workload, settings, cache, table, k, seed, per_request, vectors, cache_vectors=cache_vectors)

    def request_vectors(self, request_ids: Sequence[str]) -> np.ndarray:
        """The traffic requests' embeddings, stacked in the given order."""
        return np.vstack([self.vectors[rid] for rid in request_ids])

    # ---------------------------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, str]:
        return {tier.name: tier.model for tier in self.settings.tiers}

    @property
    def arms(self) -> ArmFactory:
        return ArmFactory(self.table, len(self.workload.cache), self.k, self.seed)

    def job(self, item: TaskItem, arm: Arm, *, as_cache_entry: bool = False) -> GenerationJob:
        examples = []
        if arm.examples:
            examples = self.replayed_examples() if arm.name == REPLAYED_ARM else self.examples()
        row_item = item
        if as_cache_entry:
            row_item = TaskItem(f"cache:{item.id}", item.group, item.prompt, item.reference, item.answer, item.tests,
                                item.language)
        job = job_for(row_item, arm, examples=examples, table=self.table, models=self.models,
                      max_tokens=self.workload.max_tokens, temperature=self.settings.temperature,
                      budget_chars=self.settings.max_examples_prompt_chars, layout=self.settings.prompt_layout)
        return job

    def cache_jobs(self) -> list[GenerationJob]:
        return [self.job(item, self.arms.large(), as_cache_entry=True) for item in self.workload.cache]

    def examples(self) -> list[Example]:
        """The example cache: the cache part with the large model's answers (needs phase ``cache``)."""
        if self._examples is None:
            jobs = self.cache_jobs()
            found = self.cache.get_many(job.key for job in jobs)
            missing = [job for job in jobs if job.key not in found]
            if missing:
                raise MissingGenerations(f"{self.workload.name}: {len(missing)} cache answers are not generated yet")
            self._examples = cache_examples(self.workload.cache, [found[job.key].text for job in jobs],
                                            self.models["large"])
        return self._examples

    def replay_outcome(self, *, generate: bool = False) -> ReplayOutcome | None:
        """The replay phase's outcome (replayed now if ``generate`` and none is stored), or None."""
        if self._replay is None and self.replayer is not None:
            self._replay = self.replayer(self, generate)
        return self._replay

    def replayed_examples(self) -> list[Example]:
        """The example cache after the replay phase (raises ``MissingGenerations`` before it)."""
        outcome = self.replay_outcome()
        if outcome is None:
            raise MissingGenerations(f"{self.workload.name}: the cache is not replayed yet (phase replay)")
        return cache_examples(self.workload.cache, outcome.answers, self.models["large"])

    def with_cache_answers(self, responses: Sequence[str]) -> WorkloadRun:
        """The same run with the example cache holding ``responses`` instead of the cache phase's answers
        (the cache after a replay, say); its jobs, and so their generation-cache keys, follow."""
        if len(responses) != len(self.workload.cache):
            raise ValueError(f"{len(responses)} answers for a cache part of {len(self.workload.cache)}")
        changed = replace(self)
        changed._examples = cache_examples(self.workload.cache, list(responses), self.models["large"])
        return changed

    def arm_for(self, item: TaskItem, arm_name: str) -> Arm:
        """The arm called ``arm_name`` for ``item`` (``small+nearest@n`` names a cache size)."""
        factory = self.arms
        if arm_name == "large":
            return factory.large()
        if arm_name == "small":
            return factory.small()
        if arm_name == "small+nearest":
            return factory.nearest(item.id)
        if arm_name.startswith("small+nearest@"):
            return factory.nearest(item.id, int(arm_name.rsplit("@", 1)[1]))
        if arm_name == "small+random":
            return factory.random(item.id)
        if arm_name == REPLAYED_ARM:
            return replace(factory.nearest(item.id), name=REPLAYED_ARM)
        if arm_name == "small+selected":
            if self.selector is None:
                raise MissingGenerations("no stage 2 selector is available")
            candidates = self.table.nearest(item.id, self.settings.retrieve_top_k)
            return Arm("small+selected", "small", self.selector(item, candidates, self.examples()))
        if arm_name == "small+learned":
            if self.learned_selector is None:
                raise MissingGenerations("no trained stage 2 is configured")
            if self._learned is None:
                self._learned = self.learned_selector(self)
            return Arm("small+learned", "small", self._learned[item.id])
        raise ValueError(f"unknown arm {arm_name!r}")

    def arm_names(self, phase: str) -> list[str]:
        if phase in ("large", "small"):
            return [phase]
        if phase == "nearest":
            return ["small+nearest"]
        if phase == "random":
            return ["small+random"]
        if phase == "cache-size":
            return [f"small+nearest@{n}" for n in cache_sizes(len(self.workload.cache))]
        if phase == "selected":
            return ["small+selected"] if self.selector is not None else []
        if phase == "learned":
            return ["small+learned"] if self.learned_selector is not None else []
        if phase == "replay":
            return [REPLAYED_ARM] if self.replayer is not None else []
        raise ValueError(f"unknown phase {phase!r}")

    def phase_jobs(self, phase: str) -> list[GenerationJob]:
        if phase == "cache":
            return self.cache_jobs()
        jobs = []
        for arm_name in self.arm_names(phase):
            jobs.extend(self.job(item, self.arm_for(item, arm_name)) for item in self.workload.unique_traffic)
        return jobs

    def generation(self, item: TaskItem, arm: Arm) -> CachedGeneration:
        job = self.job(item, arm)
        found = self.cache.get(job.key)
        if found is None:
            raise MissingGenerations(f"{self.workload.name}: {item.id} on {arm.name} is not generated yet")
        return found


def run_phases(runs: Sequence[WorkloadRun], settings: Settings, cache: GenerationCache, *,
               phases: Sequence[str] = PHASES, deadline: float | None = None, progress: bool = True) -> list[str]:
    """Generate the phases in order over every workload (``ordered_phases``: a requested phase that
    another needs runs first); stop before a phase once ``deadline`` (``time.monotonic()``) has passed.
    A phase whose inputs were neither requested nor generated earlier is skipped with a warning.
    Returns the phases completed for every workload."""
    done = []
    for phase in ordered_phases(phases):
        if phase == "calibrate":
            continue  # needs the serving settings: run by calibrate_costs
        skipped = False
        for run in runs:
            if deadline is not None and time.monotonic() > deadline:
                log.warning("time budget spent: stopping before phase %s of %s", phase, run.workload.name)
                return done
            try:
                if phase == "replay":
                    run.replay_outcome(generate=True)
                jobs = run.phase_jobs(phase)
            except MissingGenerations as exc:
                needs = ", ".join(PHASE_NEEDS.get(phase, ()))
                log.warning("skipping phase %s of %s: %s (it needs the phases %s)", phase, run.workload.name, exc,
                            needs)
                skipped = True
                continue
            ran = generate_missing(jobs, settings, cache, progress=progress,
                                   description=f"{run.workload.name}:{phase}")
            log.info("%s %s: %d jobs, %d generated now", run.workload.name, phase, len(jobs), ran)
        if not skipped:
            done.append(phase)
    return done


def ordered_phases(phases: Sequence[str]) -> list[str]:
    """``phases`` in the given (priority) order, except that a requested phase another one needs is
    moved right before the first phase that needs it."""
    ordered: list[str] = []

    def place(phase: str) -> None:
        if phase in ordered:
            return
        for needed in PHASE_NEEDS.get(phase, ()):
            if needed in phases:
                place(needed)
        ordered.append(phase)

    for phase in phases:
        place(phase)
    return ordered


def calibration_jobs(runs: Sequence[WorkloadRun], per_arm: int) -> list[GenerationJob]:
    """``per_arm`` distinct traffic requests per workload and main arm, spread over the traffic order."""
    jobs = []
    for run in runs:
        items = run.workload.unique_traffic
        step = max(1, len(items) // max(1, per_arm))
        chosen = items[::step][:per_arm]
        for arm_name in CALIBRATION_ARMS:
            jobs.extend(run.job(item, run.arm_for(item, arm_name)) for item in chosen)
        # The large tier's own prompts are all short, which leaves its prefill rate unidentified: time it
        # on a few long (example-carrying) prompts too. Timing only: these answers are never used.
        for item in chosen:
            long_prompt = run.job(item, run.arm_for(item, "small+nearest"))
            jobs.append(replace(long_prompt, tier="large", model=run.models["large"]))
    return jobs


def default_embedder(settings: Settings) -> Embedder:
    """MiniLM as the pipeline uses it, with one torch thread (the models generate on the same cores)."""
    from echolm.retrieval.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(settings.embedder_model, batch_size=settings.embed_batch_size, num_threads=1,
                                       dtype=settings.embedder_dtype)


def results_dir(cache_dir: Path) -> Path:
    return Path(cache_dir)
