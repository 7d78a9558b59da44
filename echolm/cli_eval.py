"""``echolm eval``: the evaluation harness (docs/evaluation.md) as a command.

Registered in ``echolm/cli.py``; everything heavy is imported inside the command.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer


def eval_command(
    workloads: Annotated[str, typer.Option(help="comma-separated: gsm8k, gsm8k-numbers (GSM8K asked again with other numbers), gsm8k-numbers-program (the same, answered by a program that prints the answer), mbpp, mbpp-camel (MBPP asking for camelCase names), or a name for --jsonl")] = "gsm8k,mbpp",
    jsonl: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                               help="JSONL of {prompt, reference[, answer, tests, group]} "
                                                    "used for workload names other than gsm8k/mbpp")] = None,
    n_cache: Annotated[int, typer.Option(help="requests in the example-cache part (answered by the large model)")] = 40,
    n_traffic: Annotated[int, typer.Option(help="traffic requests (Zipf draws, repeats included)")] = 40,
    examples: Annotated[int, typer.Option("--examples", "-k", help="examples prepended per offloaded request")] = 2,
    seed: Annotated[int, typer.Option(help="seed of the split, the Zipf draws and random examples")] = 0,
    limit: Annotated[int | None, typer.Option(help="quick run: at most this many cache and traffic requests")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="generation and verdict cache "
                                                   "(default ~/.cache/echolm/eval)")] = None,
    phases: Annotated[str, typer.Option(help="generation phases to run, in priority order")] =
        "cache,large,small,nearest,random,cache-size,selected,replay,calibrate",
    generate: Annotated[bool, typer.Option(help="generate what is missing (--no-generate: report from the cache)")] = True,
    max_minutes: Annotated[float | None, typer.Option(help="stop starting new phases after this many minutes")] = None,
    threads: Annotated[int, typer.Option(help="llama.cpp threads for the answer generations (0: the tiers' own; "
                                         "costs are calibrated with the tiers' own either way)")] = 1,
    calibrate_per_arm: Annotated[int, typer.Option(help="phase calibrate: requests timed per main arm and workload "
                                                   "(each twice, with the serving thread count)")] = 8,
    validate: Annotated[int, typer.Option(help="also serve this many requests through the real pipeline to check "
                                          "the cost model (0: skip)")] = 0,
    validate_loads: Annotated[str, typer.Option(help="with --validate: also measure latency through the real "
                                                "pipeline at these loads (comma-separated multiples of always-large's "
                                                "measured capacity, e.g. 0.8), for always-large and EchoLM")] = "",
    validate_systems: Annotated[str, typer.Option(help="with --validate: only these systems, comma-separated, of "
                                                  "always-large, half-offload (EchoLM, stage 1, half the requests "
                                                  "offloaded), small-replayed (small + the replayed cache's "
                                                  "examples), replay-reuse (EchoLM with replay + reuse), cache-front "
                                                  "(the same behind a semantic cache); default all. Runs joined by "
                                                  "bench/join_eval_results.py can share one always-large run")] = "",
    generate_workers: Annotated[int, typer.Option(help="with --validate: run the pipeline's generate stage in this "
                                                  "many worker processes, each with both tiers on its share of the "
                                                  "cores (1: one worker runs every stage)")] = 1,
    generate_affinity: Annotated[str | None, typer.Option(help="with --generate-workers: how offloaded requests "
                                                          "spread over the generate workers, request (by request id) "
                                                          "or first-example (with their first example's worker, whose "
                                                          "prefix cache holds it); default ECHOLM_GENERATE_AFFINITY")] = None,
    replay_samples: Annotated[int, typer.Option(help="phase replay: answers the large tier samples per replayed "
                                                "cache entry (the task verifier keeps the best)")] = 10,
    prefix_credit: Annotated[bool, typer.Option(help="credit the llama.cpp tiers' prefix caches (TierSettings."
                                                "prefix_cache_mb) in the cost model: prompt tokens shared with an "
                                                "earlier request of the same tier are not prefilled again")] = True,
    out_dir: Annotated[Path, typer.Option(help="results.json and results.md")] = Path("out/eval"),
    figures_dir: Annotated[Path, typer.Option(help="PNG figures")] = Path("docs/figures"),
    docs: Annotated[Path | None, typer.Option(help="markdown file whose results section is rewritten "
                                              "(--docs '' to skip)")] = Path("docs/evaluation.md"),
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
) -> None:
    """Evaluate EchoLM against always-large, always-small, random/nearest examples, a semantic cache and a
    RouteLLM-style router on the same traffic; write tables and plots.

    Resumable: every generation is cached on disk (keyed by model, prompt and sampling settings), so an
    interrupted run continues where it stopped and sweeps never regenerate.
    """
    from echolm.evaluation.evaluate import EvalConfig, run_evaluation
    from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR
    from echolm.settings import Settings

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("sentence_transformers", "httpx", "faiss", "aiokafka", "faust", "mode", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        base = Settings()
        if generate_affinity is not None:
            base = Settings.model_validate({**base.model_dump(), "generate_affinity": generate_affinity})
    except Exception as exc:  # pydantic names the bad variable
        raise typer.BadParameter(str(exc)) from exc
    chosen = [name.strip() for name in validate_systems.split(",") if name.strip()]
    try:
        config = EvalConfig(
            workloads=[w.strip() for w in workloads.split(",") if w.strip()], jsonl=jsonl, n_cache=n_cache,
            n_traffic=n_traffic, k=examples, seed=seed, limit=limit, cache_dir=cache_dir or DEFAULT_CACHE_DIR,
            phases=[p.strip() for p in phases.split(",") if p.strip()], generate=generate, max_minutes=max_minutes,
            generation_threads=threads or None, validate=validate,
            validate_loads=[float(x) for x in validate_loads.split(",") if x.strip()], calibrate_per_arm=calibrate_per_arm,
            validate_systems=frozenset(chosen) if chosen else None, generate_workers=generate_workers,
            prefix_credit=prefix_credit,
            replay_samples=replay_samples, out_dir=out_dir,
            figures_dir=figures_dir,
            docs=None if docs is None or str(docs) in ("", ".") else docs, progress=progress,  # Path("") is "."
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    results = run_evaluation(config, base)
    for name, summary in results["workloads"].items():
        typer.echo(f"\n{name}: {summary['traffic']} requests ({summary['distinct_requests']} distinct), "
                   f"cache {summary['cache']}")
        for key, value in summary["targets"].items():
            typer.echo(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    typer.echo(json.dumps({"results": str(out_dir / "results.json"), "figures": results["figures"]}))


eval_cache_app = typer.Typer(help="The evaluation's answers as a file: score them on another machine without "
                                  "regenerating (calibrate there for speed).", no_args_is_help=True)
_CacheDir = Annotated[Path | None, typer.Option(help="generation cache (default ~/.cache/echolm/eval)")]


@eval_cache_app.command("export")
def export_command(
    path: Annotated[Path, typer.Argument(help="snapshot to write (gzip'd JSON, e.g. answers.json.gz)")],
    cache_dir: _CacheDir = None,
    model: Annotated[list[str] | None, typer.Option(help="only this model's generations (repeatable)")] = None,
) -> None:
    """Write the cached answers and replay outcomes to one file (timings stay: they are this machine's)."""
    from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR
    from echolm.evaluation.snapshot import export_snapshot

    counts = export_snapshot(cache_dir or DEFAULT_CACHE_DIR, path, model or None)
    typer.echo(f"{path}: {counts.generations} generations, {counts.replays} replay outcomes")


@eval_cache_app.command("import")
def import_command(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="snapshot written by export")],
    cache_dir: _CacheDir = None,
) -> None:
    """Add a snapshot's answers to the cache; answers already there are kept."""
    from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR
    from echolm.evaluation.snapshot import SnapshotError, import_snapshot

    try:
        counts = import_snapshot(path, cache_dir or DEFAULT_CACHE_DIR)
    except SnapshotError as exc:
        raise typer.BadParameter(str(exc), param_hint="PATH") from exc
    typer.echo(f"{path}: {counts.generations} new generations, {counts.replays} new replay outcomes "
               "(run phase calibrate here before reading throughput)")
