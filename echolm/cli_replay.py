"""``echolm replay`` and ``echolm evict``: the replay agent's and eviction's logic as batch jobs.

``echolm replay --from-history`` is the paper's "replay on historical logs": usages are rebuilt from
the logged responses (idempotent per request id, so running it twice, or next to the live
``example-stats`` stage, counts nothing twice), settled into G(e), and the same planner and service
as the streaming ``replay`` stage upgrade the top entries on the replay tier.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from echolm.settings import Settings


def register(app: typer.Typer) -> None:
    """Adds the commands to the ``echolm`` app."""
    app.command("replay")(replay)
    app.command("evict")(evict)


def _cli() -> Any:
    from echolm import cli  # the CLI's shared helpers; imported late: cli imports this module

    return cli


async def backfill_usages(settings: Settings, history: Any, stats: Any) -> tuple[int, int]:
    """Record a usage for every logged response served with examples; returns (seen, newly recorded)."""
    from echolm.history.example_stats_store import usages_from_history

    cursor, seen, new = "", 0, 0
    while True:
        usages, cursor = await usages_from_history(history, settings.largest_tier.name, after=cursor)
        seen += len(usages)
        new += await stats.record_usages(usages)
        if not cursor:
            return seen, new


def summarise(reports: list[Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The printed summary of a replay run: counts, then mean judge scores per judge kind."""
    outcomes = [o for r in reports for o in r.outcomes]
    count = {s: sum(1 for o in outcomes if o.status == s)
             for s in ("planned", "upgraded", "kept", "yielded", "failed", "stale")}
    summary: dict[str, Any] = {
        **extra,
        "examples_considered": max((r.considered for r in reports), default=0),
        "replayed": count["upgraded"] + count["kept"],
        **count,
        "skipped_by_cap": max((r.skipped_cap for r in reports), default=0),
        "skipped_by_cutoff": max((r.skipped_cutoff for r in reports), default=0),
        "rounds_busy": sum(1 for r in reports if not r.idle),
        "load": round(reports[-1].load, 3) if reports else None,
    }
    for judge in sorted({o.judge for o in outcomes if o.judge}):
        judged = [o for o in outcomes if o.judge == judge and o.score_after is not None]
        if judged:
            summary[f"judge_{judge}_mean_before"] = round(statistics.fmean(o.score_before for o in judged), 4)
            summary[f"judge_{judge}_mean_after"] = round(statistics.fmean(o.score_after for o in judged), 4)
    summary["upgraded_entries"] = [f"{o.example_id}->{o.new_example_id}" for o in outcomes if o.status == "upgraded"]
    return summary


async def run_replay(settings: Settings, *, from_history: bool, limit: int | None, rounds: int, dry_run: bool,
                     ignore_load: bool, progress: bool) -> dict[str, Any]:
    """The batch replay (module docstring); returns the summary."""
    from tqdm import tqdm

    from echolm.generation.factory import make_generator
    from echolm.history.example_stats_store import FeedbackQualityLookup, SqlExampleStatsStore
    from echolm.history.store import SqlHistoryStore
    from echolm.replay import replay_service_from_settings, usage_policy_from_settings

    history = SqlHistoryStore(settings.resolved_database_url)
    await history.start()
    config = settings.replay
    tier = settings.tier(config.tier) if config.tier else settings.largest_tier
    generators: list[Any] = []
    try:
        stats = SqlExampleStatsStore(history)
        extra: dict[str, Any] = {"tier": tier.name}
        if from_history:
            seen, new = await backfill_usages(settings, history, stats)
            extra.update(history_usages=seen, new_usages=new)
        settled = await stats.settle_usages(usage_policy_from_settings(settings), FeedbackQualityLookup(history),
                                            settle_after=timedelta(0))
        extra["settled_usages"] = settled.usages

        generator = make_generator(tier, settings)
        generators.append(generator)
        judge = None
        if config.judge_tier and config.judge_tier != tier.name:
            judge = make_generator(settings.tier(config.judge_tier), settings)
            generators.append(judge)
        elif config.judge_tier:
            judge = generator

        async def no_load() -> float:
            return 0.0

        service = replay_service_from_settings(settings, history, generator, judge_generator=judge,
                                               load=no_load if ignore_load else None)
        remaining = limit if limit is not None else config.examples_per_round * rounds
        reports = []
        bar = tqdm(total=remaining, desc="replay", unit="example", disable=not progress)
        try:
            for _ in range(rounds):
                if remaining <= 0:
                    break
                report = await service.run_round(remaining, dry_run=dry_run, on_outcome=lambda _o: bar.update(1))
                reports.append(report)
                remaining -= len(report.outcomes)
                if not report.outcomes or report.count("yielded"):
                    break  # nothing left that pays, or the tier got busy
        finally:
            bar.close()
        return summarise(reports, extra)
    finally:
        for generator in generators:
            await generator.aclose()
        await history.aclose()


def replay(
    from_history: Annotated[bool, typer.Option("--from-history/--live-stats", help="rebuild usages from the "
                                               "logged responses first (default), or use only the stats the "
                                               "live example-stats stage recorded")] = True,
    limit: Annotated[int | None, typer.Option(help="replay at most this many examples in all (default: "
                                              "replay.examples_per_round x rounds)")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="planning rounds; each replays the top-G examples that pay")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be replayed; generate nothing")] = False,
    ignore_load: Annotated[bool, typer.Option("--ignore-load", help="replay even if the tier looks busy "
                                              "(offline maintenance)")] = False,
    database_url: Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy async URL")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="embedded database directory")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    summary_json: Annotated[Path | None, typer.Option(help="also write the summary here as JSON")] = None,
) -> None:
    """Replay weak, much-used cache entries on the large tier (the paper's "replay on historical logs")."""
    cli = _cli()
    settings = cli._settings(database_url=database_url, data_dir=data_dir)
    cli._setup_logging(settings.log_level)
    asyncio.run(cli._migrate(settings))
    summary = asyncio.run(run_replay(settings, from_history=from_history, limit=limit, rounds=rounds,
                                     dry_run=dry_run, ignore_load=ignore_load, progress=progress))
    if summary_json:
        summary_json.write_text(json.dumps(summary, indent=2))
    typer.echo("\nreplay summary" + (" (dry run)" if dry_run else ""))
    for key, value in summary.items():
        typer.echo(f"  {key:<28} {value}")


async def run_evict(settings: Settings, *, dry_run: bool) -> list[dict[str, Any]]:
    """One eviction pass over every tenant; returns each tenant's decision."""
    from echolm.eviction_service import EvictionBudget, EvictionService
    from echolm.history.example_stats_store import SqlExampleStatsStore
    from echolm.history.store import SqlHistoryStore

    config = settings.eviction
    budget = EvictionBudget(max_bytes=config.max_bytes, max_examples=config.max_examples,
                            decay_per_hour=config.decay_per_hour, protect_new=timedelta(seconds=config.protect_new_s))
    history = SqlHistoryStore(settings.resolved_database_url)
    await history.start()
    try:
        decisions = await EvictionService(history, SqlExampleStatsStore(history), budget).run(dry_run=dry_run)
        return [{**asdict(d), "bytes_after": d.bytes_after} for d in decisions]
    finally:
        await history.aclose()


def evict(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan; mark nothing")] = False,
    max_bytes: Annotated[int | None, typer.Option(help="per-tenant byte budget (default: eviction.max_bytes)")] = None,
    max_examples: Annotated[int | None, typer.Option(help="per-tenant row budget (default: eviction.max_examples)")] = None,
    protect_new_s: Annotated[float | None, typer.Option(help="never evict examples younger than this")] = None,
    database_url: Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy async URL")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="embedded database directory")] = None,
) -> None:
    """Evict the least useful examples of each tenant over the cache budget (0/1 knapsack)."""
    cli = _cli()
    settings = cli._settings(database_url=database_url, data_dir=data_dir)
    overrides = {k: v for k, v in {"max_bytes": max_bytes, "max_examples": max_examples,
                                   "protect_new_s": protect_new_s}.items() if v is not None}
    if overrides:
        settings = settings.model_copy(update={"eviction": settings.eviction.model_copy(update=overrides)})
    cli._setup_logging(settings.log_level)
    if settings.eviction.max_bytes is None and settings.eviction.max_examples is None:
        raise typer.BadParameter("no budget: set --max-bytes/--max-examples or ECHOLM_EVICTION__MAX_BYTES/__MAX_EXAMPLES")
    asyncio.run(cli._migrate(settings))
    decisions = asyncio.run(run_evict(settings, dry_run=dry_run))
    verb = "would evict" if dry_run else "evicted"
    for d in decisions:
        count = len(d["evict"]) if dry_run else len(d["evicted"])
        typer.echo(f"tenant {d['tenant']}: {d['examples']} examples, {d['bytes']} bytes, {d['protected']} protected; "
                   f"{verb} {count} ({d['evicted_bytes']} bytes); kept value {d['kept_value']:.3f} "
                   f"[{', '.join(d['methods'])}]")
    if not decisions:
        typer.echo("no tenant has active examples")
