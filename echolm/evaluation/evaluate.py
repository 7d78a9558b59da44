"""One evaluation run end to end: generate what is missing, score every system, write the report.

``EvalConfig`` holds the knobs of ``echolm eval``; ``run_evaluation`` does the work and returns the
figures (also written as JSON next to the plots, and as tables into ``docs/evaluation.md`` between the
``<!-- results:begin -->`` / ``<!-- results:end -->`` markers, so the prose around them stays).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from echolm.datasets import TaskItem
from echolm.evaluation.efficiency import (
    ONE_GENERATION_AT_A_TIME,
    CostModel,
    CostSample,
    LatencyPoint,
    ValidationPoint,
    fit_cost_model,
    fit_shared_cpu_slowdown,
)
from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR, GenerationCache, calibrate_costs, measure_shared_cpu
from echolm.evaluation.harness import PHASES, REPLAYED_ARM, WorkloadRun, calibration_jobs, default_embedder, run_phases
from echolm.evaluation.prefix_reuse import KvFootprint, PrefixCredit, TierPrefixCache
from echolm.evaluation.quality import VerdictCache
from echolm.evaluation.replay_phase import ReplayOutcome, stored_replayer
from echolm.evaluation.stage2 import learned_selections
from echolm.evaluation.report import (
    ALWAYS_LARGE,
    ECHOLM_COLD,
    ECHOLM_FULL,
    ECHOLM_LEARNED,
    ECHOLM_REPLAY,
    ECHOLM_REPLAY_CACHE_FRONT,
    ECHOLM_REPLAY_REUSE,
    ECHOLM_REUSE,
    ECHOLM_SIMILARITY,
    ROUTELLM,
    SEMANTIC_CACHE,
    SEMANTIC_CACHE_REPLAYED,
    SMALL_LEARNED,
    SMALL_NEAREST,
    SMALL_REPLAYED,
    TARGET_WIN_RATE,
    SmallModelFindings,
    SystemPoint,
    WorkloadScorer,
    cache_size_points,
    dominance,
    evaluate_workload,
    latency_table,
    operating_point,
    replay_reuse_choices,
    small_model_findings,
    systems_table,
    throughput_at_win_rate,
    tokens_table,
)
from echolm.evaluation.systems import Choice, sweep_thresholds
from echolm.evaluation.validation import PipelineRun, measure_latency, validate_system
from echolm.evaluation.workload import BUILT_IN_WORKLOADS, Workload, load_workload
from echolm.settings import Settings

log = logging.getLogger(__name__)

RESULTS_BEGIN = "<!-- results:begin -->"
RESULTS_END = "<!-- results:end -->"
LATENCY_LOADS = (0.5, 0.9, 1.2)
# Per tier. With 3 requests per arm (6 large-tier timings, two per request with the same answer length)
# the large tier's decode rate and intercept were not separable: the fit put all of it in the intercept.
MIN_CALIBRATION_SAMPLES = 12
TOKEN_ARMS = ("large", "small", "small+nearest", "small+random", "small+selected", "small+learned", REPLAYED_ARM)


# What ``--validate`` can serve through the real pipeline (``validated_systems``), in its order, by the
# short names ``--validate-systems`` takes (the report's names hold commas).
VALIDATED_SYSTEMS = {"always-large": ALWAYS_LARGE, "half-offload": ECHOLM_SIMILARITY, "small-replayed": SMALL_REPLAYED,
                     "replay-reuse": ECHOLM_REPLAY_REUSE, "cache-front": ECHOLM_REPLAY_CACHE_FRONT}


@dataclass
class EvalConfig:
    """What ``echolm eval`` runs (see its ``--help`` for each field)."""

    workloads: list[str] = field(default_factory=lambda: ["gsm8k", "mbpp"])
    jsonl: Path | None = None
    n_cache: int = 40
    n_traffic: int = 40
    k: int = 2
    seed: int = 0
    limit: int | None = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    generate: bool = True
    max_minutes: float | None = None
    generation_timeout_s: float = 900.0
    generation_threads: int | None = 1
    calibrate_per_arm: int = 8
    calibrate_repeats: int = 2
    validate: int = 0
    validate_loads: list[float] = field(default_factory=list)
    validate_systems: frozenset[str] | None = None  # keys of VALIDATED_SYSTEMS; None: all of them
    generate_workers: int = 1  # the real pipeline's generate processes (validation.serving_pipeline)
    prefix_credit: bool = True
    replay_samples: int = 10
    out_dir: Path = Path("out/eval")
    figures_dir: Path | None = Path("docs/figures")
    docs: Path | None = Path("docs/evaluation.md")
    progress: bool = True

    def __post_init__(self) -> None:
        if self.generate_workers < 1:
            raise ValueError("--generate-workers has to be at least 1")
        if self.validate_systems is None:
            return
        unknown = sorted(self.validate_systems - set(VALIDATED_SYSTEMS))
        if unknown:
            raise ValueError(f"--validate-systems: unknown {', '.join(unknown)}; use {', '.join(VALIDATED_SYSTEMS)}")
        if self.validate_loads and "always-large" not in self.validate_systems:
            raise ValueError("--validate-loads are multiples of always-large's measured capacity: "
                             "--validate-systems has to include always-large")


def eval_settings(base: Settings, timeout_s: float, threads: int | None = None, *,
                  prompt_reuse: bool = False) -> Settings:
    """The configured tiers with a generous per-call timeout (a generation slowed by a busy machine must
    finish: a timeout here is a lost answer, not a served request) and, if given, a thread count.

    Without ``prompt_reuse`` every prompt is prefilled in full (``prefix_cache_mb`` 0), so measured
    seconds are each request's own; what a prefix cache saves is credited by the cost model
    (``echolm.evaluation.prefix_reuse``). The real-pipeline check (``--validate``) runs with reuse on.

    Answers are generated with one thread by default: on a machine shared with other jobs, llama.cpp with
    as many threads as cores stalls at every synchronisation point (measured here: 6 s -> 127 s for one
    answer). Costs are then measured separately with the serving thread count (phase ``calibrate``)."""
    tiers = []
    for tier in base.tiers:
        update: dict[str, Any] = {"timeout_s": max(tier.timeout_s, timeout_s)}
        if not prompt_reuse:
            update["prefix_cache_mb"] = 0
        if threads is not None:
            update["n_threads"] = threads
        tiers.append(tier.model_copy(update=update))
    return base.model_copy(update={"tiers": tiers})


def _workloads(config: EvalConfig, settings: Settings) -> list[Workload]:
    loaded = []
    for name in config.workloads:
        workload = load_workload(name, settings.model_cache_dir, n_cache=config.n_cache, n_traffic=config.n_traffic,
                                 seed=config.seed, jsonl=config.jsonl if name not in BUILT_IN_WORKLOADS else None)
        loaded.append(workload.limited(config.limit))
    return loaded


def shared_cpu(cache: GenerationCache, serving: Settings) -> dict[str, Any] | None:
    """The calibrate phase's runs of the tiers alone and together at the serving thread count, and the
    slowdown the cost model takes from them (the median over runs); None before any run."""
    threads = {tier.n_threads for tier in serving.tiers}
    runs = cache.shared_cpu_runs(threads.pop()) if len(threads) == 1 else []
    if not runs:
        return None
    slowdowns = [fit_shared_cpu_slowdown(alone, together) for alone, together in runs]
    return {"runs": [{"alone_s": alone, "together_s": together, "slowdown": slowdown}
                     for (alone, together), slowdown in zip(runs, slowdowns)],
            "slowdown": float(np.median(slowdowns))}


def shared_cpu_sentence(costs: CostModel, measured: dict[str, Any] | None) -> str:
    if not measured:
        return (f"Tiers generating at once: not measured (no calibrate phase), so the model assumes the CPU does one "
                f"generation's worth of work at a time (slowdown {costs.shared_cpu_slowdown:.2f}).")
    runs = "; ".join(f"{' + '.join(f'{t} {s:.0f} s' for t, s in run['alone_s'].items())} alone vs "
                     f"{run['together_s']:.0f} s together" for run in measured["runs"])
    return (f"Tiers generating at once (phase `calibrate`, a spread of each tier's calibration requests): {runs}. While both "
            f"tiers generate, each runs {costs.shared_cpu_slowdown:.2f}x slower than alone (2.00 would be one "
            f"generation at a time, 1.00 no interference); saturation and latency use one queue per tier with that "
            f"slowdown.")


def measured_costs(cache: GenerationCache, serving: Settings, overhead_s: float,
                   slowdown: float = ONE_GENERATION_AT_A_TIME) -> tuple[CostModel, str]:
    """The per-tier cost model: fitted on the calibration timings (fastest of the repeats, serving thread
    count) when every tier has at least ``MIN_CALIBRATION_SAMPLES``, else on the generation runs' own
    timings; ``slowdown`` is how much tiers slow each other (``shared_cpu``). Returns the model and a
    sentence saying which timings it was fitted on."""
    threads = {tier.n_threads for tier in serving.tiers}
    calibrated = [CostSample(t, p, c, s) for th in threads for t, p, c, s, _ in cache.fastest_timings(th)]
    per_tier = {tier.name: sum(s.tier == tier.name for s in calibrated) for tier in serving.tiers}
    if calibrated and min(per_tier.values()) >= MIN_CALIBRATION_SAMPLES:
        return (fit_cost_model(calibrated, retrieval_overhead_s=overhead_s, shared_cpu_slowdown=slowdown),
                f"calibration timings: {len(calibrated)} requests, each the fastest of its repeated runs, with the "
                f"serving thread count ({threads.pop() or 'all cores'})")
    tier_of = {tier.model: tier.name for tier in serving.tiers}

    def generation_samples(imported: bool) -> list[CostSample]:
        return [CostSample(tier_of[model], p, c, s) for model, p, c, s, _ in cache.measured(imported)
                if model in tier_of]

    samples = generation_samples(imported=False)
    if {s.tier for s in samples} >= set(tier_of.values()):
        return (fit_cost_model(samples, retrieval_overhead_s=overhead_s, shared_cpu_slowdown=slowdown),
                f"the generation runs' own timings ({len(samples)} generations; no calibration yet)")
    # Only a snapshot's answers are here: score them, but say that the speed is another machine's.
    samples += generation_samples(imported=True)
    return (fit_cost_model(samples, retrieval_overhead_s=overhead_s, shared_cpu_slowdown=slowdown),
            f"generation timings that include another machine's ({len(samples)} generations, some imported from a "
            f"snapshot; run phase calibrate here before reading throughput)")


def prefix_credit(serving: Settings) -> PrefixCredit | None:
    """The serving tiers' prefix caches, replayed by the scorer (None when no tier has one)."""
    from echolm.assets import resolve_model
    from echolm.generation.llamacpp import LlamaCppPromptTokenizer

    tiers = {}
    for tier in serving.tiers:
        if tier.backend != "llamacpp" or tier.prefix_cache_mb == 0:
            continue
        tokenizer = LlamaCppPromptTokenizer(resolve_model(tier.model, serving.model_cache_dir))
        tiers[tier.name] = TierPrefixCache(tier.prefix_cache_mb << 20, KvFootprint.from_gguf_metadata(tokenizer.metadata),
                                           tokenizer.prompt_tokens)
    return PrefixCredit(tiers) if tiers else None


def _stage2_selector(settings: Settings, k: int) -> Any:
    """Stage 2 (``echolm.selection.ExampleSelector``) when the module is there, else None.

    Returns a callable (item, candidates [(cache index, similarity)], examples) -> kept cache indices.
    The selector runs with its cold-start rule (no trained helpfulness proxy exists for this traffic):
    keep candidates with similarity >= ``learning.selection_threshold``, at most ``k``, within the budget.
    """
    try:
        from echolm.selection import ExampleSelector, SelectionPolicy
    except ImportError:
        return None
    from echolm.domain import RetrievedExample

    def select(item: Any, candidates: list[tuple[int, float]], examples: list[Any]) -> tuple[int, ...]:
        policy = SelectionPolicy(settings.learning.selection_threshold, k, settings.max_examples_prompt_chars)
        retrieved = [RetrievedExample(example=examples[i], similarity=sim) for i, sim in candidates]
        kept = ExampleSelector(policy).select(None, retrieved)
        return tuple(sorted(r.example.id - 1 for r in kept))

    return select


def run_evaluation(config: EvalConfig, base: Settings | None = None) -> dict[str, Any]:
    """Generate (unless ``config.generate`` is off), score, plot and report; returns the figures."""
    base = base or Settings()
    settings = eval_settings(base, config.generation_timeout_s, config.generation_threads)
    serving = eval_settings(base, config.generation_timeout_s, prompt_reuse=True)
    cache = GenerationCache(config.cache_dir)
    verdicts = VerdictCache(config.cache_dir)
    embedder = default_embedder(settings)
    selector = _stage2_selector(settings, config.k)
    runs = []
    for workload in _workloads(config, settings):
        run = WorkloadRun.build(workload, settings, cache, embedder, k=config.k, seed=config.seed)
        run.selector = selector
        run.learned_selector = partial(learned_selections, verdicts=verdicts,
                                       threshold=settings.learning.selection_threshold, max_count=config.k,
                                       seed=config.seed)
        run.replayer = stored_replayer(config.cache_dir, settings, verdicts, samples=config.replay_samples,
                                       progress=config.progress)
        runs.append(run)
    started = time.monotonic()
    if config.generate:
        deadline = started + 60 * config.max_minutes if config.max_minutes else None
        done = run_phases(runs, settings, cache, phases=config.phases, deadline=deadline, progress=config.progress)
        if "calibrate" in config.phases and (deadline is None or time.monotonic() < deadline) \
                and len(done) == len([p for p in config.phases if p != "calibrate"]):
            timed = eval_settings(base, config.generation_timeout_s)
            jobs = calibration_jobs(runs, config.calibrate_per_arm)
            calibrate_costs(jobs, timed, cache, repeats=config.calibrate_repeats, progress=config.progress)
            if shared_cpu(cache, timed) is None:
                measure_shared_cpu(jobs, timed, cache)
    generation_wall_s = time.monotonic() - started

    overhead = sum(r.embed_seconds_per_request for r in runs) / len(runs)
    sharing = shared_cpu(cache, serving)
    costs, cost_source = measured_costs(cache, serving, overhead,
                                        sharing["slowdown"] if sharing else ONE_GENERATION_AT_A_TIME)
    results: dict[str, Any] = {"config": _config_dict(config), "machine": machine_description(),
                               "prompt_layout": settings.prompt_layout,
                               "cost_model": {t: vars_of(m) for t, m in costs.tiers.items()},
                               "retrieval_overhead_s": overhead, "shared_cpu": sharing, "cost_source": cost_source, "generation_wall_s_this_run": generation_wall_s,
                               "generations_cached": len(cache),
                               "generations_imported": cache.imported_count(), "workloads": {}}
    sections = []
    pareto: dict[str, dict[str, list[SystemPoint]]] = {}
    sizes: dict[str, list[tuple[int, SystemPoint]]] = {}
    credit = prefix_credit(serving) if config.prefix_credit else None
    results["prefix_credit"] = {name: {"capacity_mb": t.capacity_bytes >> 20, "kv_bytes_per_token": t.footprint.bytes_per_token}
                                for name, t in (credit.tiers.items() if credit else [])}
    scorers = []
    for run in runs:
        scorer = WorkloadScorer(run, verdicts, costs, credit)
        scorers.append(scorer)
        systems = evaluate_workload(scorer)
        pareto[run.workload.name] = systems
        sizes[run.workload.name] = cache_size_points(scorer)
        findings = small_model_findings(scorer)
        results["workloads"][run.workload.name] = workload_summary(run, systems, sizes[run.workload.name], findings)
        sections.append(workload_section(run, scorer, systems, sizes[run.workload.name], findings))
    if config.validate > 0:
        results["validation"], latency = [], []
        for run, scorer in zip(runs, scorers, strict=True):
            validation = _validate(config, serving, run, scorer, pareto)
            results["validation"] += [vars_of(v) for v in validation]
            if config.validate_loads:
                latency += [vars_of(p) for p in _pipeline_latency(config, serving, run, scorer, pareto, validation)]
        results["validation_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results["validation_generate_workers"] = config.generate_workers
        results["validation_generate_affinity"] = serving.generate_affinity
        if latency:
            results["pipeline_latency"] = latency
    # A report-only re-run keeps the last real-pipeline runs (they take many minutes); latency figures
    # only with the validation they were measured against.
    previous = config.out_dir / "results.json"
    earlier = json.loads(previous.read_text()) if previous.exists() else {}
    if "validation" not in results and earlier.get("validation"):
        results["validation"] = earlier["validation"]
        results["validation_at"] = earlier.get("validation_at", "an earlier run")
        if earlier.get("pipeline_latency"):
            results["pipeline_latency"] = earlier["pipeline_latency"]
    figures = _plots(config, pareto, sizes, runs, results.get("pipeline_latency", []))
    results["figures"] = [str(f) for f in figures]
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    markdown = render_results(results, sections, costs)
    (config.out_dir / "results.md").write_text(markdown)
    if config.docs is not None:
        write_results_section(config.docs, markdown)
    cache.close()
    verdicts.close()
    return results


def _validate(config: EvalConfig, settings: Settings, run: WorkloadRun, scorer: WorkloadScorer,
              pareto: dict[str, dict[str, list[SystemPoint]]]) -> list[ValidationPoint]:
    """The first ``config.validate`` traffic requests in arrival order (repeats included, so the tiers'
    prefix caches see what they would), through the real pipeline, for each of ``validated_systems``
    that ``config.validate_systems`` names (all of them by default)."""
    items = run.workload.traffic[:config.validate]
    work_dir = config.out_dir / "validation" / run.workload.name
    wanted = None if config.validate_systems is None else {VALIDATED_SYSTEMS[key] for key in config.validate_systems}
    return [validate_system(settings, scorer, spec, choices, items, work_dir,
                            generate_workers=config.generate_workers)
            for spec, choices in validated_systems(run, pareto, items) if wanted is None or spec.system in wanted]


def validated_systems(run: WorkloadRun, pareto: dict[str, dict[str, list[SystemPoint]]],
                      items: Sequence[TaskItem]) -> list[tuple[PipelineRun, dict[str, Choice]]]:
    """The systems ``--validate`` serves through the pipeline, each set up as the pipeline and with the
    choices the cost model made for ``items``: always-large, and those of EchoLM's the run evaluated."""
    runs = [(PipelineRun(ALWAYS_LARGE, "always-large", None), {i.id: Choice(arm="large") for i in items})]
    if run.workload.name in pareto and ECHOLM_SIMILARITY in pareto[run.workload.name]:
        # A threshold that offloads about half of these requests: the cost model has to predict a mix of
        # both tiers (the operating point may offload none of so few requests).
        sims = [run.table.best(i.id)[1] for i in items]
        median = sorted(sims)[len(sims) // 2]
        threshold = max(t for t in sweep_thresholds(sims) if t <= median)  # offloads those >= the median
        runs.append((PipelineRun(ECHOLM_SIMILARITY, "similarity", threshold),
                     {i.id: Choice(arm="small+nearest") if run.table.best(i.id)[1] >= threshold else Choice(arm="large")
                      for i in items}))
    if run.workload.name in pareto and SMALL_REPLAYED in pareto[run.workload.name]:
        # Every request offloaded to the replayed cache's nearest examples: the system behind the lift.
        runs.append((PipelineRun(SMALL_REPLAYED, "similarity", -1.0, replayed_cache=True),
                     {i.id: Choice(arm=REPLAYED_ARM) for i in items}))
    # EchoLM with replay + reuse at the report's operating point: repeats answered verbatim from the
    # replayed cache (the pipeline's reuse setting), the rest routed by similarity; then the same with the
    # reuse bar swept too (a semantic cache in front), at its own operating point.
    for system in (ECHOLM_REPLAY_REUSE, ECHOLM_REPLAY_CACHE_FRONT):
        reuse = _replay_reuse_run(run, pareto, items, system)
        if reuse is not None:
            runs.append(reuse)
    return runs


def _replay_reuse_run(run: WorkloadRun, pareto: dict[str, dict[str, list[SystemPoint]]],
                      items: Sequence[TaskItem], system: str = ECHOLM_REPLAY_REUSE,
                      ) -> tuple[PipelineRun, dict[str, Choice]] | None:
    """The pipeline set up as ``system`` (EchoLM with replay and verbatim reuse, at its operating point)
    and its choices for ``items``; None when the run has no such system."""
    points = pareto.get(run.workload.name, {}).get(system)
    if not points:
        return None
    point = operating_point(points)
    assert point.reuse_min_similarity is not None and point.knob_value is not None
    best = {i.id: run.table.best(i.id) for i in items}
    hits = {rid: Choice(cached_index=index, similarity=sim, replayed_cache=True) for rid, (index, sim) in best.items()}
    choices = replay_reuse_choices({rid: sim for rid, (_, sim) in best.items()}, hits, point.reuse_min_similarity,
                                   point.knob_value)
    spec = PipelineRun(system, "similarity", point.knob_value, replayed_cache=True,
                       reuse_min_similarity=point.reuse_min_similarity)
    return spec, choices


def _pipeline_latency(config: EvalConfig, settings: Settings, run: WorkloadRun, scorer: WorkloadScorer,
                      pareto: dict[str, dict[str, list[SystemPoint]]],
                      validation: list[ValidationPoint]) -> list[LatencyPoint]:
    """Latency through the real pipeline at each of ``config.validate_loads`` (multiples of always-large's
    capacity as the validation just measured it), for always-large and EchoLM's fastest validated
    configuration: the same requests, in the same order, as a Poisson stream."""
    capacity = next(v.measured_rps for v in validation if v.system == ALWAYS_LARGE)
    items = run.workload.traffic[:config.validate]
    systems = {spec.system: (spec, choices) for spec, choices in validated_systems(run, pareto, items)}
    echolm = systems.get(ECHOLM_REPLAY_REUSE) or systems.get(SMALL_REPLAYED)
    specs = [systems[ALWAYS_LARGE], *([echolm] if echolm else [])]
    return [measure_latency(settings, scorer, items, config.out_dir / "latency" / run.workload.name, spec=spec,
                            choices=choices,
                            rate_rps=load * capacity, load=load, seed=config.seed,
                            generate_workers=config.generate_workers)
            for load in config.validate_loads for spec, choices in specs]


def _plots(config: EvalConfig, pareto: dict[str, dict[str, list[SystemPoint]]],
           sizes: dict[str, list[tuple[int, SystemPoint]]], runs: list[WorkloadRun],
           latency: list[dict[str, Any]]) -> list[Path]:
    from echolm.evaluation.plots import cache_size_plot, latency_plot, pareto_plot

    directory = config.figures_dir or config.out_dir
    figures = []
    for name, systems in pareto.items():
        figures.append(pareto_plot(systems, directory / f"pareto_{name}.png",
                                   title=f"{name}: win rate vs throughput ({runs_by(runs, name)})"))
    n_cache = {run.workload.name: len(run.workload.cache) for run in runs}
    figures.append(cache_size_plot({k: v for k, v in sizes.items() if v}, n_cache, directory / "cache_size.png",
                                   title="small model + nearest examples: win rate vs cache size"))
    if latency:
        figures.append(latency_plot(latency, directory / "latency.png",
                                    title="latency through the real pipeline at fixed loads"))
    return figures


def runs_by(runs: list[WorkloadRun], name: str) -> str:
    run = next(r for r in runs if r.workload.name == name)
    return f"{len(run.workload.traffic)} requests, {len(run.workload.unique_traffic)} distinct"


def vars_of(value: Any) -> dict[str, Any]:
    return asdict(value) if is_dataclass(value) else dict(value)


def _config_dict(config: EvalConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()}


def machine_description() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def workload_summary(run: WorkloadRun, systems: dict[str, list[SystemPoint]],
                     sizes: list[tuple[int, SystemPoint]],
                     findings: SmallModelFindings | None = None) -> dict[str, Any]:
    """The figures the targets are read from, plus every point of every system."""
    summary: dict[str, Any] = {
        "description": run.workload.description, "traffic": len(run.workload.traffic),
        "distinct_requests": len(run.workload.unique_traffic), "cache": len(run.workload.cache),
        "systems": {name: [p.as_dict() for p in points] for name, points in systems.items()},
        "cache_size": [{"size": size, **p.as_dict()} for size, p in sizes],
        **(findings.as_dict() if findings else {}),
    }
    targets: dict[str, Any] = {}
    small = systems.get("always-small")
    nearest = systems.get(SMALL_NEAREST)
    if small and nearest:
        targets["small_win_rate_lift_points"] = 100 * (nearest[0].win_rate - small[0].win_rate)
    learned = systems.get(SMALL_LEARNED)
    if small and learned:
        targets["small_win_rate_lift_points (trained stage 2 examples)"] = 100 * (learned[0].win_rate - small[0].win_rate)
    replayed = systems.get(SMALL_REPLAYED)
    if small and replayed:
        targets["small_win_rate_lift_points (replayed cache)"] = 100 * (replayed[0].win_rate - small[0].win_rate)
    for name in (ECHOLM_SIMILARITY, ECHOLM_LEARNED, ECHOLM_COLD, ECHOLM_FULL, ECHOLM_REUSE, ECHOLM_REPLAY,
                 ECHOLM_REPLAY_REUSE, ECHOLM_REPLAY_CACHE_FRONT):
        if name in systems:
            best = throughput_at_win_rate(systems[name], TARGET_WIN_RATE)
            targets[f"{name}: throughput at win rate >= 0.5"] = best.throughput_ratio if best else None
            for other in (SEMANTIC_CACHE, SEMANTIC_CACHE_REPLAYED, ROUTELLM):
                if other in systems:
                    met, total = dominance(systems[name], systems[other])
                    targets[f"{name} matches or beats {other} frontier points"] = f"{met}/{total}"
                    met, total = dominance(systems[name], systems[other], TARGET_WIN_RATE)
                    targets[f"{name} matches or beats {other} frontier points at win rate >= 0.5"] = f"{met}/{total}"
    summary["targets"] = targets
    return summary


def workload_section(run: WorkloadRun, scorer: WorkloadScorer, systems: dict[str, list[SystemPoint]],
                     sizes: list[tuple[int, SystemPoint]], findings: SmallModelFindings | None = None) -> str:
    w = run.workload
    lines = [f"### {w.name}", "", f"{w.description}. {len(w.traffic)} requests ({len(w.unique_traffic)} distinct); "
             f"verifier: {w.verifier}; max_tokens {w.max_tokens}; examples per offloaded request k = {run.k}.", "",
             "**Systems** (each at its operating point: the fastest knob setting with win rate >= 0.5, else its "
             "best win rate; the 95% interval is Wilson's on the win rate over requests):", "",
             systems_table(systems, len(w.unique_traffic)), "",
             "**Tokens and seconds per arm** (distinct requests; measured = wall seconds of the generation call, "
             "modelled = the cost model on the same token counts):", "",
             tokens_table(scorer, TOKEN_ARMS), "",
             "**Latency at fixed loads** (derived: Poisson arrivals, one FIFO queue per tier, the busy tiers sharing "
             "the CPU as the cost model's slowdown says; service times = the system's modelled per-request costs):",
             "", latency_table(systems, LATENCY_LOADS, scorer.costs.shared_cpu_slowdown), ""]
    if findings:
        lines += findings.markdown()
    outcome = run.replay_outcome()
    if outcome is not None:
        lines += [replay_paragraph(run, outcome), ""]
    if sizes:
        lines += ["**Cache size** (stage 1, small model + nearest examples, always offloaded):", "",
                  "| cache entries | share of cache part | accuracy | win rate vs large |", "|---|---|---|---|"]
        for size, p in sizes:
            lines.append(f"| {size} | {100 * size / len(w.cache):.1f}% | {100 * p.accuracy:.1f}% | {p.win_rate:.3f} |")
        lines.append("")
    return "\n".join(lines)


def replay_paragraph(run: WorkloadRun, outcome: ReplayOutcome) -> str:
    """What the replay phase did to the cache (its answers are served by the ``small+replayed`` arm)."""
    summary = outcome.summary
    verifiable = sum(v is not None for v in outcome.right_before)
    using = sum(any(outcome.versions[i] > 1 for i in run.arms.nearest(item.id).examples) for item in run.workload.traffic)
    return (f"**Replay** (phase `replay`: the replay agent on the small tier's served answers with verifier feedback, "
            f"best of {outcome.samples} large-tier samples at temperature 0.7 per replayed entry, judged against each "
            f"cache entry's own reference): {summary.get('replayed', 0)} entries replayed, {len(outcome.replaced)} "
            f"replaced; cache answers right {sum(v is True for v in outcome.right_before)} -> "
            f"{sum(v is True for v in outcome.right_after)} of {verifiable} verifiable; {using} of "
            f"{len(run.workload.traffic)} requests have a replaced entry among their examples. The replay took "
            f"{outcome.seconds:.0f} s of the large tier, in idle time: not counted in any system's throughput.")


def _work_lines(validation: list[dict[str, Any]]) -> list[str]:
    """The validation runs' generated answers per tier: where the cost model's error comes from
    (``echolm.evaluation.validation.TierWork``); nothing for runs that did not record it."""
    rows = [(v, tier, w) for v in validation for tier, w in (v.get("work") or {}).items()]
    if not rows:
        return []
    lines = ["**Where the error comes from** (generated answers only, per tier). *Expected* is the work the cost "
             "model predicted for these requests (the evaluation's own answers, prefill after its replay of the "
             "prefix caches); *pipeline* is what the worker did (its answers can differ in length, and its prefix "
             "cache reuses what it reuses). Model seconds: the prediction / the cost model on the pipeline's "
             "tokens / measured. The first two differ by the work, the last two by the engine's speed in the "
             "worker. The worker's token rates come from llama.cpp's own split of each answer (until the first "
             "token, after it); in runs that mix tiers they include the tiers slowing each other.", "",
             "| workload | system | tier | answers | prefilled tokens, pipeline / expected | decoded tokens, "
             "pipeline / expected | model s: predicted / cost model on the pipeline's tokens / measured | "
             "worker's prefill / decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    for v, tier, w in rows:
        rates = (f"{w['split_prefilled'] / w['prefill_s']:.0f} / {w['split_decoded'] / w['decode_s']:.1f}"
                 if w["split_requests"] and w["prefill_s"] > 0 and w["decode_s"] > 0 else "-")
        lines.append(f"| {v.get('workload') or '-'} | {v['system']} | {tier} | {w['requests']} | "
                     f"{w['prefilled']:,} / {w['predicted_prefilled']:,} | {w['decoded']:,} / {w['predicted_decoded']:,} | "
                     f"{w['predicted_s']:.1f} / {w['modelled_s']:.1f} / {w['generate_s']:.1f} | {rates} |")
    return lines + [""]


def _calibrated_cell(v: dict[str, Any]) -> str:
    if not v.get("calibrated_requests"):
        return "-"
    return (f"{v['calibrated_pipeline_s']:.1f} / {v['calibrated_fastest_s']:.1f} / {v['calibrated_mean_s']:.1f} "
            f"({v['calibrated_requests']})")


def _imported_note(imported: int) -> str:
    return f", {imported} of them imported from a snapshot (their answers, not their speed)" if imported else ""


def render_results(results: dict[str, Any], sections: list[str], costs: CostModel) -> str:
    lines = [RESULTS_BEGIN, "", f"_Generated by `echolm eval` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"machine: {results['machine']}; prompt layout `{results.get('prompt_layout', 'hints-first')}` "
             f"(ECHOLM_PROMPT_LAYOUT); {results['generations_cached']} generations in the cache"
             f"{_imported_note(results.get('generations_imported', 0))}._", "",
             "#### Cost model", "", f"Fitted on {results['cost_source']}.", "",
             "| tier | prefill tok/s | decode tok/s | intercept s | samples (outliers dropped) | median abs. error |",
             "|---|---|---|---|---|---|"]
    for tier, model in costs.tiers.items():
        lines.append(f"| {tier} | {model.prefill_tokens_per_s:.0f} | {model.decode_tokens_per_s:.1f} | "
                     f"{model.intercept_s:.2f} | {model.samples} ({model.dropped}) | "
                     f"{100 * model.median_abs_rel_error:.0f}% |")
    lines += ["", f"Retrieval overhead (MiniLM embedding, measured here): {1000 * costs.retrieval_overhead_s:.0f} ms "
              "per request.", "", shared_cpu_sentence(costs, results.get("shared_cpu")), ""]
    credit = results.get("prefix_credit")
    if credit:
        tiers = ", ".join(f"{name} {c['capacity_mb']} MB ({c['kv_bytes_per_token']:,} B of KV state per token)"
                          for name, c in credit.items())
        lines += [f"Prefix caches credited (`prefix_cache_mb`; `--no-prefix-credit` turns this off): {tiers}. Each "
                  "system's requests are replayed in arrival order through each tier's cache (least recently used "
                  "states dropped beyond the budget); prompt tokens shared with a kept earlier prompt of the same "
                  "tier are not charged prefill. Always-large gets the same credit. Measured timings are taken with "
                  "reuse off, so the fitted prefill rate is the full one.", ""]
    else:
        lines += ["No prefix cache credited: every prompt token is charged prefill.", ""]
    if results.get("validation"):
        lines += ["#### Cost model vs the real pipeline at saturation", "",
                  f"Measured {results.get('validation_at', '')} with `--validate`: the first traffic requests in "
                  "arrival order (repeats included), all submitted at once, prefix caches on. The EchoLM run uses a "
                  "similarity threshold that offloads half of them, so both tiers are exercised; small + nearest "
                  "examples from the replayed cache (when the replay phase ran) offloads all of them to the cache as "
                  "the replay left it. *Model s* is the models' own time summed over the requests (the generate "
                  "stage's timing), next to the cost model's: where it matches, the rest of *measured s* is the "
                  "pipeline's own overhead. *Same prompts as calibration* sums the requests that phase calibrate "
                  "also timed (same prompt, same answer): their model time in the pipeline / calibration's fastest "
                  "run / its mean run, so a slower engine in the worker shows apart from the fit.", "",
                  "| workload | system | requests | measured s | predicted s | model s, measured / predicted | measured req/s | "
                  "predicted req/s | error | throughput vs always-large, measured / predicted | same answers | tiers | "
                  "same prompts as calibration: pipeline / fastest / mean s (n) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for v in results["validation"]:
            baseline = next((b for b in results["validation"] if b["system"] == ALWAYS_LARGE
                             and b.get("workload") == v.get("workload")), None)
            error = v["predicted_rps"] / v["measured_rps"] - 1
            ratio = (f"{baseline['measured_s'] / v['measured_s']:.2f}x / {baseline['predicted_s'] / v['predicted_s']:.2f}x"
                     if baseline else "-")
            model_s = (f"{v['generate_s']:.1f} / {v['predicted_generate_s']:.1f}" if v.get("generate_s")
                       else "-")  # runs before session 9 did not record it
            lines.append(f"| {v.get('workload') or '-'} | {v['system']} | {v['requests']} | {v['measured_s']:.1f} | "
                         f"{v['predicted_s']:.1f} | "
                         f"{model_s} | {v['measured_rps']:.4f} | {v['predicted_rps']:.4f} | {100 * error:+.0f}% | {ratio} | "
                         f"{v['same_answers']}/{v['requests']} | {v['by_tier']} | {_calibrated_cell(v)} |")
        lines.append("")
        lines += _work_lines(results["validation"])
    if results.get("pipeline_latency"):
        lines += ["#### Latency through the real pipeline at fixed loads", "",
                  "The same requests as above, in the same order, sent as a Poisson stream at a multiple of "
                  "always-large's capacity on the same workload as measured above; latency is each request's time from its send to its "
                  "answer. With 40 requests or fewer the p99 is about the slowest request. *Modelled* = the cost "
                  "model's per-tier queues fed the same arrivals and the same routing decisions.", "",
                  "| workload | system | load (x always-large's capacity) | req/s | requests | errors | p50 s | p99 s | "
                  "mean s | modelled p50 / p99 / mean s | tiers |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in results["pipeline_latency"]:
            modelled = " / ".join(f"{p.get(f'predicted_{k}_s', float('nan')):.1f}" for k in ("p50", "p99", "mean"))
            lines.append(f"| {p.get('workload') or '-'} | {p['system']} | {p['load']:.2f} | {p['rate_rps']:.3f} | "
                         f"{p['requests']} | {p['errors']} | "
                         f"{p['p50_s']:.1f} | {p['p99_s']:.1f} | {p['mean_s']:.1f} | {modelled} | {p['by_tier']} |")
        lines.append("")
    lines += ["#### Targets", ""]
    for name, summary in results["workloads"].items():
        for key, value in summary["targets"].items():
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            lines.append(f"- {name}: {key}: **{shown}**")
    lines.append("")
    lines += sections
    lines.append(RESULTS_END)
    return "\n".join(lines) + "\n"


def write_results_section(path: Path, markdown: str) -> None:
    """Replace the text between the results markers in ``path`` (appended if the markers are missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Evaluation\n\n"
    if RESULTS_BEGIN in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        _, tail = rest.split(RESULTS_END, 1)
        text = head + markdown.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + markdown
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
