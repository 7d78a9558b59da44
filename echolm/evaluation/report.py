"""Scoring every system on the same traffic, and the tables of ``docs/evaluation.md``.

``WorkloadScorer`` turns a workload's generations into per-request results (answer, verdict, outcome
against the large model, tokens, measured and modelled seconds) and evaluates each system's choices;
``evaluate_workload`` runs every system and its knob sweep; ``render_results`` writes the markdown.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from echolm.datasets import TaskItem
from echolm.evaluation.efficiency import (
    CostModel,
    Service,
    latency_percentiles,
    tier_makespan,
    work_by_tier,
)
from echolm.evaluation.generation_cache import GenerationJob
from echolm.evaluation.harness import REPLAYED_ARM, MissingGenerations, WorkloadRun
from echolm.evaluation.prefix_reuse import PrefixCredit
from echolm.evaluation.quality import (
    Lift,
    VerdictCache,
    paired_lift,
    parity_headroom,
    pass_fail_outcome,
    wilson_interval,
    win_rate_of,
)
from echolm.evaluation.systems import Choice, similarity_weighted_scores, sweep_thresholds, threshold_choices

ALWAYS_LARGE = "always-large"
ALWAYS_SMALL = "always-small"
SMALL_RANDOM = "small + random examples"
SMALL_NEAREST = "small + nearest examples (stage 1)"
ECHOLM_SIMILARITY = "EchoLM (stage 1 + similarity router)"
ECHOLM_LEARNED = "EchoLM (stage 1 + learned router)"
SMALL_SELECTED = "small + stage 2 examples (cold start)"
ECHOLM_COLD = "EchoLM (cold-start stage 2 + bandit router)"
SMALL_LEARNED = "small + stage 2 examples (trained proxy)"
ECHOLM_FULL = "EchoLM (stage 2 + bandit router)"
ECHOLM_REUSE = "EchoLM + verbatim reuse of repeats"
SEMANTIC_CACHE = "semantic cache (GPTCache-style)"
SMALL_REPLAYED = "small + nearest examples, replayed cache"
ECHOLM_REPLAY = "EchoLM with replay (stage 1 + similarity router)"
ECHOLM_REPLAY_REUSE = "EchoLM with replay + verbatim reuse of repeats"
# The same pipeline with the reuse bar swept as low as a semantic cache's: a semantic cache in front of
# EchoLM, which then serves the misses (a semantic cache sends them all to the large model).
ECHOLM_REPLAY_CACHE_FRONT = "EchoLM with replay behind a semantic cache"
SEMANTIC_CACHE_REPLAYED = "semantic cache on the replayed cache"
ROUTELLM = "RouteLLM-style router (no examples)"
TARGET_WIN_RATE = 0.5
# ECHOLM_REUSE_MIN_SIMILARITY settings tried: bars high enough that only repeats pass.
REUSE_BARS = (0.95, 0.98, 0.99, 0.995)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request served one way."""

    request_id: str
    arm: str
    tier: str
    passed: bool
    prompt_tokens: int
    completion_tokens: int
    measured_s: float
    cost_s: float
    examples: int = 0


@dataclass
class SystemPoint:
    """A system at one knob setting, over the whole traffic (repeats included)."""

    workload: str
    system: str
    knob: str
    knob_value: float | None
    requests: int
    accuracy: float
    win_rate: float
    wins: int
    ties: int
    losses: int
    throughput_rps: float
    throughput_ratio: float
    measured_throughput_ratio: float
    small_share: float
    cache_hit_share: float
    mean_cost_s: float
    tokens: dict[str, dict[str, float]] = field(default_factory=dict)
    service_times: list[Service] = field(default_factory=list, repr=False)
    # The verbatim-reuse bar of the systems that answer repeats from the cache (None for the others).
    reuse_min_similarity: float | None = None

    @property
    def prefill_reused_share(self) -> float:
        """Share of the prompt tokens sent to the models that their prefix caches spared."""
        tiers = list(self.tokens.values())
        prefill = sum(t["prefill"] * t["requests"] for t in tiers)
        reused = sum(t.get("prefill_reused", 0.0) * t["requests"] for t in tiers)
        return reused / prefill if prefill else 0.0

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("service_times")
        data["prefill_reused_share"] = self.prefill_reused_share
        return data


class WorkloadScorer:
    """Per-request results of one workload from its generations, verdicts and the cost model."""

    def __init__(self, run: WorkloadRun, verdicts: VerdictCache, costs: CostModel,
                 prefix: PrefixCredit | None = None) -> None:
        self.run = run
        self.verdicts = verdicts
        self.costs = costs
        self.prefix = prefix
        self._large_cost_s: float | None = None
        self._jobs: dict[tuple[str, str], GenerationJob] = {}
        self.items = {item.id: item for item in run.workload.unique_traffic}
        self.counts = Counter(item.id for item in run.workload.traffic)
        self._memo: dict[tuple[str, str], RequestResult] = {}

    def arm_result(self, item: TaskItem, arm_name: str) -> RequestResult:
        key = (item.id, arm_name)
        if key not in self._memo:
            arm = self.run.arm_for(item, arm_name)
            generated = self.run.generation(item, arm)
            verdict = self.verdicts.verify(item, generated.text, self.run.workload.verifier)
            cost = self.costs.seconds(arm.tier, generated.prompt_tokens, generated.completion_tokens)
            self._memo[key] = RequestResult(item.id, arm_name, arm.tier, verdict.passed, generated.prompt_tokens,
                                            generated.completion_tokens, generated.latency_s, cost, len(arm.examples))
        return self._memo[key]

    def cached_result(self, item: TaskItem, index: int, replayed: bool = False) -> RequestResult:
        """The semantic cache returning cache entry ``index``'s answer verbatim (as replayed, if ``replayed``)."""
        key = (item.id, f"cache#{index}" + ("/replayed" if replayed else ""))
        if key not in self._memo:
            entries = self.run.replayed_examples() if replayed else self.run.examples()
            answer = entries[index].response
            verdict = self.verdicts.verify(item, answer, self.run.workload.verifier)
            overhead = self.costs.retrieval_overhead_s
            self._memo[key] = RequestResult(item.id, key[1], "cache", verdict.passed, 0, 0, overhead, overhead)
        return self._memo[key]

    def result(self, item: TaskItem, choice: Choice) -> RequestResult:
        if choice.cached_index is not None:
            return self.cached_result(item, choice.cached_index, choice.replayed_cache)
        assert choice.arm is not None
        return self.arm_result(item, choice.arm)

    def available(self, arm_name: str) -> bool:
        try:
            for item in self.items.values():
                self.arm_result(item, arm_name)
        except MissingGenerations:
            return False
        return True

    def served(self, choices: dict[str, Choice], items: Sequence[TaskItem] | None = None,
               ) -> list[tuple[TaskItem, RequestResult, float, int]]:
        """``items`` (default: the whole traffic, repeats included) served in order, each with its result,
        its modelled seconds and the prompt tokens its tier's prefix cache spared (``PrefixCredit``; 0
        without one)."""
        if self.prefix is not None:
            self.prefix.start()
        served = []
        for item in self.run.workload.traffic if items is None else items:
            result = self.result(item, choices[item.id])
            cost, reused = result.cost_s, 0
            if self.prefix is not None and result.tier != "cache":
                job = self._job(item, result.arm)
                reused = self.prefix.reused(result.tier, job.key, job.messages, result.completion_tokens)
                if reused:
                    cost = self.costs.seconds(result.tier, max(1, result.prompt_tokens - reused),
                                              result.completion_tokens)
            served.append((item, result, cost, reused))
        return served

    def _job(self, item: TaskItem, arm_name: str) -> GenerationJob:
        key = (item.id, arm_name)
        if key not in self._jobs:
            self._jobs[key] = self.run.job(item, self.run.arm_for(item, arm_name))
        return self._jobs[key]

    def service(self, served: Sequence[tuple[TaskItem, RequestResult, float, int]], *,
                uses_retrieval: bool = True) -> list[Service]:
        """Each ``served`` request's queue and modelled seconds: its generation plus the retrieval overhead
        (where the system retrieves), or the overhead alone for an answer reused from the cache."""
        overhead = self.costs.retrieval_overhead_s if uses_retrieval else 0.0
        return [(result.tier, cost + overhead if result.tier != "cache" else cost) for _, result, cost, _ in served]

    def large_cost_s(self) -> float:
        """Always-large's modelled seconds over the traffic: every system's throughput is relative to it."""
        if self._large_cost_s is None:
            self._large_cost_s = sum(cost for _, _, cost, _ in self.served({r: Choice(arm="large") for r in self.items}))
        return self._large_cost_s

    def evaluate(self, system: str, choices: dict[str, Choice], *, knob: str = "", knob_value: float | None = None,
                 uses_retrieval: bool = True, reuse_min_similarity: float | None = None) -> SystemPoint:
        large_total = self.large_cost_s()
        large_measured = sum(self.arm_result(self.items[r], "large").measured_s * n for r, n in self.counts.items())
        overhead = self.costs.retrieval_overhead_s if uses_retrieval else 0.0
        slowdown = self.costs.shared_cpu_slowdown
        outcomes: list[str] = []
        passed: list[bool] = []
        measured: list[Service] = []
        tokens: dict[str, dict[str, float]] = {}
        small = hits = 0
        served = self.served(choices)
        for item, result, cost, reused in served:
            large = self.arm_result(item, "large")
            outcomes.append(pass_fail_outcome(result.passed, large.passed))
            passed.append(result.passed)
            extra = overhead if result.tier != "cache" else 0.0
            measured.append((result.tier, result.measured_s + extra))
            small += result.tier == "small"
            hits += result.tier == "cache"
            per_tier = tokens.setdefault(result.tier, {"requests": 0, "prefill": 0.0, "prefill_reused": 0.0,
                                                       "decode": 0.0})
            per_tier["requests"] += 1
            per_tier["prefill"] += result.prompt_tokens
            per_tier["prefill_reused"] += reused
            per_tier["decode"] += result.completion_tokens
        n = len(outcomes)
        counts = Counter(outcomes)
        service = self.service(served, uses_retrieval=uses_retrieval)
        makespan = tier_makespan(work_by_tier(service), slowdown)
        for per_tier in tokens.values():
            for key in ("prefill", "prefill_reused", "decode"):
                per_tier[key] /= per_tier["requests"]
        return SystemPoint(
            workload=self.run.workload.name, system=system, knob=knob, knob_value=knob_value, requests=n,
            accuracy=sum(passed) / n, win_rate=win_rate_of(outcomes), wins=counts["win"], ties=counts["tie"],
            losses=counts["loss"], throughput_rps=n / makespan, throughput_ratio=large_total / makespan,
            measured_throughput_ratio=large_measured / tier_makespan(work_by_tier(measured), slowdown),
            small_share=small / n, cache_hit_share=hits / n, mean_cost_s=float(np.mean([s for _, s in service])),
            tokens=tokens,
            service_times=service, reuse_min_similarity=reuse_min_similarity)

    # ---------------------------------------------------------------------------------------------
    # Per-request scores the routers threshold on

    def best_similarity(self) -> dict[str, tuple[int, float]]:
        return {rid: self.run.table.best(rid) for rid in self.items}

    def learned_scores(self, cheap_arm: str) -> dict[str, float]:
        """Similarity-weighted, leave-one-out estimate of ``cheap_arm``'s win rate against the large model."""
        ids = list(self.items)
        labels = {}
        for rid in ids:
            cheap, large = self.arm_result(self.items[rid], cheap_arm), self.arm_result(self.items[rid], "large")
            labels[rid] = {"win": 1.0, "tie": 0.5, "loss": 0.0}[pass_fail_outcome(cheap.passed, large.passed)]
        vectors = self.run.request_vectors(ids)
        return similarity_weighted_scores(ids, vectors, [self.items[r].group for r in ids], labels, dict(self.counts))


    def bandit_scores(self, cheap_arm: str, *, epochs: int = 150, seed: int = 0) -> dict[str, float]:
        """The bandit router's utility gap ``mu_small - mu_large``, trained leave-one-group-out.

        Uses the project's ``TierUtilityModel`` on its ``context_vector`` (request embedding + features of
        the request's examples on ``cheap_arm``) with its ``reward`` (verifier pass as quality, modelled
        cost relative to the costlier arm, amplified penalty for a quality gap). For each near-duplicate
        group a fresh model is fitted on every *other* request's two logged outcomes (small with examples,
        large), weighted by how often the request was served, and scores the group's requests. Sweeping a
        threshold on the gap is sweeping the load bias ``lambda0 * tanh(...) * (C_large - C_small)`` of the
        paper's router, which shifts the same comparison.
        """
        from echolm.domain import RetrievedExample
        from echolm.policy.bandit import ExampleFeatures, TierUtilityModel, context_vector, reward

        ids = list(self.items)
        dim = len(self.run.vectors[ids[0]])
        contexts, samples = {}, {}
        examples = self.run.examples()
        for rid in ids:
            item = self.items[rid]
            arm = self.run.arm_for(item, cheap_arm)
            sims = self.run.table.row(rid)
            retrieved = [RetrievedExample(example=examples[i], similarity=float(sims[i])) for i in arm.examples]
            contexts[rid] = context_vector(self.run.vectors[rid], ExampleFeatures.from_retrieved(retrieved), dim)
            cheap, large = self.arm_result(item, cheap_arm), self.arm_result(item, "large")
            top = max(cheap.cost_s, large.cost_s)
            best = float(max(cheap.passed, large.passed))
            samples[rid] = [("small", reward(float(cheap.passed), cheap.cost_s / top, best)),
                            ("large", reward(float(large.passed), large.cost_s / top, best))]
        scores = {}
        for group in sorted({self.items[r].group for r in ids}):
            held_out = [r for r in ids if self.items[r].group == group]
            train = [r for r in ids if self.items[r].group != group]
            x, tiers, rewards = [], [], []
            for rid in train:
                for tier, value in samples[rid]:
                    for _ in range(self.counts[rid]):
                        x.append(contexts[rid])
                        tiers.append(tier)
                        rewards.append(value)
            model = TierUtilityModel(("small", "large"), dim + 5, hidden=(64,), seed=seed)
            if x:
                model.fit(np.stack(x), tiers, rewards, epochs=epochs, batch_size=64)
            for rid in held_out:
                mu = model.utilities(contexts[rid])
                scores[rid] = mu["small"] - mu["large"]
        return scores


def _fixed(scorer: WorkloadScorer, system: str, arm: str, uses_retrieval: bool) -> SystemPoint:
    return scorer.evaluate(system, {rid: Choice(arm=arm) for rid in scorer.items}, uses_retrieval=uses_retrieval)


def _router_sweep(scorer: WorkloadScorer, system: str, knob: str, scores: dict[str, float],
                  above: Choice | dict[str, Choice], below: Choice) -> list[SystemPoint]:
    return [scorer.evaluate(system, threshold_choices(scores, t, above, below), knob=knob, knob_value=t)
            for t in sweep_thresholds(scores.values())]


def evaluate_workload(scorer: WorkloadScorer) -> dict[str, list[SystemPoint]]:
    """Every available system (fixed ones as one point, routers and caches as their sweep)."""
    systems: dict[str, list[SystemPoint]] = {
        ALWAYS_LARGE: [_fixed(scorer, ALWAYS_LARGE, "large", False)],
    }
    if scorer.available("small"):
        systems[ALWAYS_SMALL] = [_fixed(scorer, ALWAYS_SMALL, "small", False)]
        systems[ROUTELLM] = _router_sweep(scorer, ROUTELLM, "predicted win rate >=",
                                          scorer.learned_scores("small"), Choice(arm="small"), Choice(arm="large"))
    if scorer.available("small+random"):
        systems[SMALL_RANDOM] = [_fixed(scorer, SMALL_RANDOM, "small+random", True)]
    best = scorer.best_similarity()
    similarity = {rid: sim for rid, (_, sim) in best.items()}
    if scorer.available("small+nearest"):
        systems[SMALL_NEAREST] = [_fixed(scorer, SMALL_NEAREST, "small+nearest", True)]
        systems[ECHOLM_SIMILARITY] = _router_sweep(scorer, ECHOLM_SIMILARITY, "best example similarity >=",
                                                   similarity, Choice(arm="small+nearest"), Choice(arm="large"))
        systems[ECHOLM_LEARNED] = _router_sweep(scorer, ECHOLM_LEARNED, "predicted win rate >=",
                                                scorer.learned_scores("small+nearest"), Choice(arm="small+nearest"),
                                                Choice(arm="large"))
    hits = {rid: Choice(cached_index=index, similarity=sim) for rid, (index, sim) in best.items()}
    if scorer.run.selector is not None and scorer.available("small+selected"):
        systems[SMALL_SELECTED] = [_fixed(scorer, SMALL_SELECTED, "small+selected", True)]
        gaps = scorer.bandit_scores("small+selected")
        systems[ECHOLM_COLD] = _router_sweep(scorer, ECHOLM_COLD, "utility gap mu_small - mu_large >=", gaps,
                                             Choice(arm="small+selected"), Choice(arm="large"))
        systems[ECHOLM_REUSE] = [
            scorer.evaluate(ECHOLM_REUSE, reuse_choices(similarity, hits, bar, threshold_choices(
                                gaps, t, Choice(arm="small+selected"), Choice(arm="large"))),
                            knob=f"reuse at similarity >= {bar}; utility gap >=", knob_value=t, reuse_min_similarity=bar)
            for bar in REUSE_BARS for t in sweep_thresholds(gaps.values())]
    if scorer.run.learned_selector is not None and scorer.available("small+learned"):
        systems[SMALL_LEARNED] = [_fixed(scorer, SMALL_LEARNED, "small+learned", True)]
        systems[ECHOLM_FULL] = _router_sweep(scorer, ECHOLM_FULL, "utility gap mu_small - mu_large >=",
                                             scorer.bandit_scores("small+learned"), Choice(arm="small+learned"),
                                             Choice(arm="large"))
    systems[SEMANTIC_CACHE] = _router_sweep(scorer, SEMANTIC_CACHE, "similarity >=", similarity, hits,
                                            Choice(arm="large"))
    if scorer.available(REPLAYED_ARM):
        systems[SMALL_REPLAYED] = [_fixed(scorer, SMALL_REPLAYED, REPLAYED_ARM, True)]
        systems[ECHOLM_REPLAY] = _router_sweep(scorer, ECHOLM_REPLAY, "best example similarity >=", similarity,
                                               Choice(arm=REPLAYED_ARM), Choice(arm="large"))
        replayed_hits = {rid: replace(choice, replayed_cache=True) for rid, choice in hits.items()}
        systems[SEMANTIC_CACHE_REPLAYED] = _router_sweep(scorer, SEMANTIC_CACHE_REPLAYED, "similarity >=", similarity,
                                                         replayed_hits, Choice(arm="large"))
        # The pipeline's ECHOLM_REUSE_MIN_SIMILARITY on a replayed cache: repeats get the (upgraded) cached
        # answer, everything else goes through the similarity router.
        systems[ECHOLM_REPLAY_REUSE] = [
            scorer.evaluate(ECHOLM_REPLAY_REUSE, replay_reuse_choices(similarity, replayed_hits, bar, t),
                            knob=f"reuse at similarity >= {bar}; best example similarity >=", knob_value=t,
                            reuse_min_similarity=bar)
            for bar in REUSE_BARS for t in sweep_thresholds(similarity.values())]
        thresholds = sweep_thresholds(similarity.values())
        systems[ECHOLM_REPLAY_CACHE_FRONT] = [
            scorer.evaluate(ECHOLM_REPLAY_CACHE_FRONT, replay_reuse_choices(similarity, replayed_hits, bar, t),
                            knob=f"reuse at similarity >= {bar:.4f}; best example similarity >=", knob_value=t,
                            reuse_min_similarity=bar)
            for bar in thresholds for t in thresholds]
    return systems


def reuse_choices(similarity: dict[str, float], hits: dict[str, Choice], bar: float,
                  routed: dict[str, Choice]) -> dict[str, Choice]:
    """Verbatim reuse in front of a router: a repeat (similarity >= ``bar``) gets its cache hit, the rest
    what the router chose."""
    return {rid: hits[rid] if similarity[rid] >= bar else choice for rid, choice in routed.items()}


def replay_reuse_choices(similarity: dict[str, float], replayed_hits: dict[str, Choice], bar: float,
                         threshold: float) -> dict[str, Choice]:
    """EchoLM with replay + reuse at one setting: repeats answered from the replayed cache, the rest sent
    to the small tier with the replayed examples at similarity >= ``threshold``, else to the large tier."""
    return reuse_choices(similarity, replayed_hits, bar,
                         threshold_choices(similarity, threshold, Choice(arm=REPLAYED_ARM), Choice(arm="large")))


def cache_size_points(scorer: WorkloadScorer) -> list[tuple[int, SystemPoint]]:
    """Stage 1 (small + nearest examples) at each generated cache size, with size 0 = the small model alone."""
    n_cache = len(scorer.run.workload.cache)
    points = []
    if scorer.available("small"):
        points.append((0, _fixed(scorer, ALWAYS_SMALL, "small", False)))
    from echolm.evaluation.harness import cache_sizes

    for size in sorted(cache_sizes(n_cache)):
        arm = f"small+nearest@{size}"
        if scorer.available(arm):
            points.append((size, _fixed(scorer, f"{SMALL_NEAREST} @ {size}", arm, True)))
    if scorer.available("small+nearest"):
        points.append((n_cache, _fixed(scorer, SMALL_NEAREST, "small+nearest", True)))
    return points


# What examples add to the small model, by which examples (the arm the lift is read from).
LIFT_ARMS = {"nearest examples": "small+nearest", "trained stage 2 examples": "small+learned",
             "the replayed cache's nearest examples": REPLAYED_ARM}


def small_model_lifts(scorer: WorkloadScorer) -> dict[str, dict[str, Lift]]:
    """Per example source: the small model's win-rate lift over the traffic (repeats counted, as the
    systems are scored) and over its distinct requests (each once: what popular requests cannot tilt).
    Both paired request by request against always-small (``paired_lift``); the distinct interval treats
    the distinct requests as a sample of tasks, so it says how far the lift reaches beyond the popular ones."""
    if not (scorer.available("small") and scorer.available("large")):
        return {}
    workload = scorer.run.workload
    scopes = {"traffic": workload.traffic, "distinct": workload.unique_traffic}

    def passed(arm_name: str, items: Sequence[TaskItem]) -> list[bool]:
        return [scorer.arm_result(item, arm_name).passed for item in items]

    baselines = {scope: (passed("small", items), passed("large", items)) for scope, items in scopes.items()}
    return {label: {scope: paired_lift(passed(arm, items), *baselines[scope]) for scope, items in scopes.items()}
            for label, arm in LIFT_ARMS.items() if scorer.available(arm)}


def small_model_headroom(scorer: WorkloadScorer) -> dict[str, float]:
    """Per scope (traffic, distinct requests): the lift the small model would get from tying the large
    model everywhere (``parity_headroom``), the most that examples carrying its answers can add."""
    if not (scorer.available("small") and scorer.available("large")):
        return {}
    workload = scorer.run.workload
    return {scope: parity_headroom([scorer.arm_result(item, "small").passed for item in items],
                                   [scorer.arm_result(item, "large").passed for item in items])
            for scope, items in (("traffic", workload.traffic), ("distinct", workload.unique_traffic))}


# The arms the popular-requests table shows, with their column titles.
POPULAR_ARMS = {"large": "large", "small": "small", "small+nearest": "small + nearest",
                REPLAYED_ARM: "small + replayed cache's nearest"}


@dataclass(frozen=True, slots=True)
class PopularRequest:
    """One of the most requested distinct requests: how much of the traffic it is and who answers it."""

    request_id: str
    count: int
    share: float
    nearest_entry: str  # the cache part's most similar entry, the example stage 1 gives it
    nearest_similarity: float
    passed: dict[str, bool]  # arm -> the verifier's verdict, for the arms generated


def popular_requests(scorer: WorkloadScorer, top: int = 8) -> list[PopularRequest]:
    """The ``top`` distinct requests by traffic count (ties: first arrival first). Under Zipf traffic a
    few of them carry much of every win rate; this says which, and whether examples help there."""
    workload = scorer.run.workload
    counts = Counter(item.id for item in workload.traffic)
    arms = [arm for arm in POPULAR_ARMS if scorer.available(arm)]
    ordered = sorted(workload.unique_traffic, key=lambda item: -counts[item.id])
    rows = []
    for item in ordered[:top]:
        index, similarity = scorer.run.table.best(item.id)
        rows.append(PopularRequest(item.id, counts[item.id], counts[item.id] / len(workload.traffic),
                                   workload.cache[index].id, similarity,
                                   {arm: scorer.arm_result(item, arm).passed for arm in arms}))
    return rows


def popular_requests_table(rows: Sequence[PopularRequest]) -> str:
    arms = list(rows[0].passed) if rows else []
    header = ["request", "requests", "share of traffic", "nearest cache entry (cosine)"]
    header += [POPULAR_ARMS[arm] for arm in arms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.request_id, str(row.count), _pct(row.share), f"{row.nearest_entry} ({row.nearest_similarity:.2f})"]
        cells += ["pass" if row.passed[arm] else "fail" for arm in arms]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class SmallModelFindings:
    """What examples do for the small model on one workload: its lift per example source, the lift that
    tying the large model everywhere would give, and the most requested requests (where the lift is won
    or lost under Zipf traffic)."""

    lifts: dict[str, dict[str, Lift]]
    headroom: dict[str, float]
    popular: list[PopularRequest]

    def as_dict(self) -> dict[str, object]:
        return {"small_model_lift": {label: {scope: asdict(lift) for scope, lift in by_scope.items()}
                                     for label, by_scope in self.lifts.items()},
                "small_model_parity_headroom_points": self.headroom,
                "popular_requests": [asdict(row) for row in self.popular]}

    def markdown(self) -> list[str]:
        lines: list[str] = []
        if self.lifts:
            lines += ["**The small model's win rate with examples** (points over always-small, paired request by "
                      "request; over the traffic, repeats counted as the systems are scored, and over its distinct "
                      "requests, each once, which a few popular requests cannot tilt):", "", lift_table(self.lifts), ""]
        if self.headroom:
            lines += [f"Tying the large model on every request would lift the small model by "
                      f"{self.headroom['traffic']:+.1f} points over the traffic ({self.headroom['distinct']:+.1f} over "
                      "the distinct requests): the most that examples carrying the large model's own answers can "
                      "add. A larger lift needs examples better than those answers (replay's verified samples).", ""]
        if self.popular:
            lines += ["**The most requested requests** (the verifier's verdict per arm; under Zipf traffic these "
                      "carry much of every win rate):", "", popular_requests_table(self.popular), ""]
        return lines


def small_model_findings(scorer: WorkloadScorer, top: int = 8) -> SmallModelFindings:
    if not (scorer.available("small") and scorer.available("large")):
        return SmallModelFindings({}, {}, [])
    return SmallModelFindings(small_model_lifts(scorer), small_model_headroom(scorer), popular_requests(scorer, top))


def lift_table(lifts: dict[str, dict[str, Lift]]) -> str:
    rows = ["| examples | lift over the traffic, points (95% CI) | requests | lift over distinct requests (95% CI) "
            "| distinct |", "|---|---|---|---|---|"]
    for label, by_scope in lifts.items():
        t, d = by_scope["traffic"], by_scope["distinct"]
        rows.append(f"| {label} | {t.points:+.1f} [{t.low:+.1f}, {t.high:+.1f}] | {t.requests} | "
                    f"{d.points:+.1f} [{d.low:+.1f}, {d.high:+.1f}] | {d.requests} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Reading curves


def frontier(points: Sequence[SystemPoint]) -> list[SystemPoint]:
    """The Pareto frontier (higher win rate, higher throughput), by increasing throughput."""
    ordered = sorted(points, key=lambda p: (-p.throughput_ratio, -p.win_rate))
    kept: list[SystemPoint] = []
    best = -math.inf
    for point in ordered:
        if point.win_rate > best + 1e-12:
            kept.append(point)
            best = point.win_rate
    return sorted(kept, key=lambda p: p.throughput_ratio)


def throughput_at_win_rate(points: Sequence[SystemPoint], win_rate: float) -> SystemPoint | None:
    """The fastest point with at least ``win_rate``."""
    eligible = [p for p in points if p.win_rate >= win_rate - 1e-12]
    return max(eligible, key=lambda p: (p.throughput_ratio, p.win_rate)) if eligible else None


def win_rate_at_throughput(points: Sequence[SystemPoint], ratio: float) -> float | None:
    """The best win rate among points at least ``ratio`` times as fast as always-large."""
    eligible = [p.win_rate for p in points if p.throughput_ratio >= ratio - 1e-12]
    return max(eligible) if eligible else None


def dominance(ours: Sequence[SystemPoint], theirs: Sequence[SystemPoint],
              min_win_rate: float | None = None) -> tuple[int, int]:
    """How many of ``theirs``' frontier points (other than pure always-large; with ``min_win_rate``, only
    those at least that good) ``ours`` matches or beats: a point of ours at least as fast with at least
    the win rate."""
    targets = [p for p in frontier(theirs) if p.throughput_ratio > 1.0 + 1e-9
               and (min_win_rate is None or p.win_rate >= min_win_rate - 1e-12)]
    met = 0
    for point in targets:
        best = win_rate_at_throughput(ours, point.throughput_ratio)
        met += best is not None and best >= point.win_rate - 1e-12
    return met, len(targets)


def operating_point(points: Sequence[SystemPoint]) -> SystemPoint:
    """The fastest point at win rate >= 0.5, else the one with the best win rate."""
    return throughput_at_win_rate(points, TARGET_WIN_RATE) or max(points, key=lambda p: p.win_rate)


# ---------------------------------------------------------------------------------------------
# Markdown


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(p: float, n: int) -> str:
    lo, hi = wilson_interval(p * n, n)
    return f"[{lo:.2f}, {hi:.2f}]"


def systems_table(systems: dict[str, list[SystemPoint]], n_unique: int) -> str:
    rows = ["| system | knob at operating point | accuracy | win rate vs large (95% CI) | W/T/L | throughput vs "
            "always-large (cost model / generation-run timings) | to small | cache hits | prefill reused |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, points in systems.items():
        p = operating_point(points)
        knob = f"{p.knob} {p.knob_value:.3f}" if p.knob_value is not None else "-"
        rows.append(f"| {name} | {knob} | {_pct(p.accuracy)} | {p.win_rate:.3f} {_ci(p.win_rate, p.requests)} | "
                    f"{p.wins}/{p.ties}/{p.losses} | {p.throughput_ratio:.2f}x / {p.measured_throughput_ratio:.2f}x | "
                    f"{_pct(p.small_share)} | {_pct(p.cache_hit_share)} | {_pct(p.prefill_reused_share)} |")
    return "\n".join(rows)


def tokens_table(scorer: WorkloadScorer, arms: Sequence[str]) -> str:
    rows = ["| arm | requests | examples / request | prefill tokens (mean) | decode tokens (mean) | measured s (median) "
            "| modelled s (mean) | accuracy |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        if not scorer.available(arm):
            continue
        results = [scorer.arm_result(item, arm) for item in scorer.items.values()]
        rows.append(f"| {arm} | {len(results)} | {statistics.mean(r.examples for r in results):.1f} | "
                    f"{statistics.mean(r.prompt_tokens for r in results):.0f} | "
                    f"{statistics.mean(r.completion_tokens for r in results):.0f} | "
                    f"{statistics.median(r.measured_s for r in results):.1f} | "
                    f"{statistics.mean(r.cost_s for r in results):.1f} | "
                    f"{_pct(sum(r.passed for r in results) / len(results))} |")
    return "\n".join(rows)


def latency_table(systems: dict[str, list[SystemPoint]], loads: Sequence[float], slowdown: float) -> str:
    large_rps = systems[ALWAYS_LARGE][0].throughput_rps
    header = "| system (operating point) | saturation req/s | " + " | ".join(
        f"p50 / p99 s at {load:.1f}x large's capacity ({load * large_rps:.3f} req/s)" for load in loads) + " |"
    rows = [header, "|---|---|" + "---|" * len(loads)]
    for name, points in systems.items():
        p = operating_point(points)
        cells = []
        for load in loads:
            lat = latency_percentiles(p.service_times, load * large_rps, slowdown=slowdown)
            cells.append("saturated" if math.isinf(lat["p50"]) else f"{lat['p50']:.1f} / {lat['p99']:.1f}")
        rows.append(f"| {name} | {p.throughput_rps:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
