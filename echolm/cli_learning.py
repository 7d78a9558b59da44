"""``echolm feedback``, ``echolm selector fit``, ``echolm router fit|calibrate|show``.

* ``feedback FILE|-``: validates JSONL feedback (``echolm.feedback``) line by line and produces the
  valid lines to the feedback topic (the ``feedback`` stage stores them); ``--direct`` stores them in
  the history instead, for setups without a running broker. Rejected lines are reported with their
  number and the exit code is 1.
* ``selector fit``: trains the helpfulness proxy and re-chooses the stage-2 threshold; retrieve
  workers pick the stored model up without a restart.
* ``router fit``: bootstraps the bandit router from logged outcomes, on the route context logged with
  each answer (rebuilt for rows logged before it was stored; the summary counts ``logged_contexts``);
  ``router calibrate`` picks the load threshold for ``--target-offload`` or ``--target-win-rate`` on
  logged traffic, at the logged loads; route workers reload the stored state without a restart.
  ``router show`` prints what is stored.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from echolm.settings import Settings

T = TypeVar("T")

selector_app = typer.Typer(help="Stage 2 of retrieval: the helpfulness proxy and its threshold.", no_args_is_help=True)
router_app = typer.Typer(help="The load-aware bandit router (router_policy=bandit).", no_args_is_help=True)

DbOpt = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy async URL; default: $ECHOLM_DATABASE_URL, "
                                           "else SQLite in the data dir")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="embedded database (default: $ECHOLM_DATA_DIR or .echolm)")]
LimitOpt = Annotated[int, typer.Option(help="newest feedback rows (or logged requests) to learn from")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="report without storing a new model version")]


def register(app: typer.Typer) -> None:
    """Adds the commands to the ``echolm`` app."""
    app.command("feedback")(feedback)
    app.add_typer(selector_app, name="selector")
    app.add_typer(router_app, name="router")


def _cli() -> Any:
    from echolm import cli  # the CLI's shared helpers; imported late: cli imports this module

    return cli


def _prepared(**overrides: Any) -> Settings:
    cli = _cli()
    settings = cli._settings(**overrides)  # noqa: SLF001
    cli._setup_logging(settings.log_level)  # noqa: SLF001
    asyncio.run(cli._migrate(settings))  # noqa: SLF001
    return settings


def _embedder(settings: Settings) -> Any:
    from echolm.retrieval.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(settings.embedder_model, batch_size=settings.embed_batch_size,
                                       num_threads=settings.embedder_threads, dtype=settings.embedder_dtype)


async def _with_stores(settings: Settings, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    from echolm.history.feedback_store import FeedbackStore
    from echolm.history.store import SqlHistoryStore
    from echolm.model_store import ModelStore

    history = SqlHistoryStore(settings.resolved_database_url)
    await history.start()
    try:
        return await work(FeedbackStore(history), ModelStore(history))
    finally:
        await history.aclose()


def _run_learner(learner: Callable[..., Awaitable[T]], database_url: str | None, data_dir: Path | None,
                 **options: Any) -> T:
    """Runs ``learner(feedback_store, model_store, embedder, settings, **options)`` (``echolm.learning``)
    on the configured, migrated history."""
    settings = _prepared(database_url=database_url, data_dir=data_dir)

    async def work(store: Any, models: Any) -> T:
        return await learner(store, models, _embedder(settings), settings, **options)

    return asyncio.run(_with_stores(settings, work))


def _print(result: dict[str, Any]) -> None:
    typer.echo(json.dumps(result, indent=2, default=str))


# ----------------------------------------------------------------------------------------- feedback


async def send_feedback(settings: Settings, items: list[Any], timeout_s: float = 30.0) -> int:
    """Produce validated feedback to the feedback topic, keyed by request id; waits for the acks."""
    from aiokafka import AIOKafkaProducer

    from echolm.feedback import wire_record

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, client_id=f"{settings.kafka_client_id}-feedback",
                                acks="all", enable_idempotence=settings.kafka_idempotence, linger_ms=5)
    await asyncio.wait_for(producer.start(), timeout_s)
    try:
        futures = [await producer.send(settings.topics.feedback, key=(i.request_id or i.request_id_b or "").encode(),
                                       value=wire_record(i)) for i in items]
        await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
    finally:
        await producer.stop()
    return len(items)


def feedback(
    input_path: Annotated[str, typer.Argument(help="JSONL feedback (thumbs, pairwise preference or score), or - for stdin")] = "-",
    kafka_bootstrap: Annotated[str | None, typer.Option("--kafka-bootstrap", help="host:port of Kafka (default: "
                                                       "$ECHOLM_KAFKA_BOOTSTRAP)")] = None,
    direct: Annotated[bool, typer.Option("--direct", help="store in the history database instead of producing to the topic")] = False,
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Send quality feedback on responses: {"request_id", "rating": "up"|"down"}, {"request_id", "score"[,
    "score_min", "score_max"]}, or a pairwise preference {"request_id_a", "request_id_b" | "request_id",
    "tier_a", "tier_b", "preferred": "a"|"b"|"tie" | "score": -3..3}."""
    from echolm.feedback import parse_feedback_lines

    handle = sys.stdin if input_path == "-" else open(input_path, encoding="utf-8", errors="replace")
    with handle:
        accepted, rejected = parse_feedback_lines(handle)
    for line_no, message in rejected:
        typer.echo(f"rejected line {line_no}: {message}", err=True)
    if direct:
        settings = _prepared(database_url=database_url, data_dir=data_dir)

        async def store(feedback_store: Any, _models: Any) -> int:
            return int(await feedback_store.record_feedback([a.to_feedback() for a in accepted]))

        new = asyncio.run(_with_stores(settings, store)) if accepted else 0
        typer.echo(json.dumps({"accepted": len(accepted), "stored_new": new, "rejected": len(rejected)}))
    else:
        cli = _cli()
        settings = cli._settings(kafka_bootstrap=kafka_bootstrap)  # noqa: SLF001
        cli._setup_logging(settings.log_level)  # noqa: SLF001
        if not settings.kafka_bootstrap:
            raise typer.BadParameter("feedback needs a broker (--kafka-bootstrap or ECHOLM_KAFKA_BOOTSTRAP), "
                                     "or --direct to store it in the database")
        sent = asyncio.run(send_feedback(settings, accepted)) if accepted else 0
        typer.echo(json.dumps({"sent": sent, "rejected": len(rejected), "topic": settings.topics.feedback}))
    if rejected:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------- selector


@selector_app.command("fit")
def selector_fit(
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = 50_000,
    min_samples: Annotated[int, typer.Option(help="labelled pairs needed before the proxy replaces similarity")] = 20,
    tolerance: Annotated[float, typer.Option(help="quality given up at most when choosing the threshold")] = 0.02,
    dry_run: DryRunOpt = False,
) -> None:
    """Train the helpfulness proxy from feedback on answers served with examples; re-choose the threshold."""
    from echolm.learning import fit_selector

    result = _run_learner(fit_selector, database_url, data_dir, limit=limit, min_samples=min_samples,
                          tolerance=tolerance, save=not dry_run)
    _print({**result.summary(), "thresholds": result.thresholds})
    if not result.fitted:
        typer.echo(f"not deployed: {result.not_deployed}; stage 2 keeps using similarity", err=True)


# ----------------------------------------------------------------------------------------- router


@router_app.command("fit")
def router_fit(
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = 50_000,
    epochs: Annotated[int, typer.Option(help="training epochs (Adam)")] = 150,
    seed: Annotated[int, typer.Option(help="initialisation and shuffling seed")] = 0,
    dry_run: DryRunOpt = False,
) -> None:
    """Bootstrap the bandit router from logged outcomes (feedback and judge verdicts) and measured token costs."""
    from echolm.learning import fit_router

    result = _run_learner(fit_router, database_url, data_dir, limit=limit, epochs=epochs, seed=seed, save=not dry_run)
    _print(result.summary())
    if not result.samples:
        typer.echo("no labelled answers yet: send feedback or run the judge stage first", err=True)
        raise typer.Exit(1)


@router_app.command("calibrate")
def router_calibrate(
    target_offload: Annotated[float | None, typer.Option(help="wanted share of requests off the reference tier (0..1)")] = None,
    target_win_rate: Annotated[float | None, typer.Option(help="wanted win rate vs the reference tier (0.5 = parity)")] = None,
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
    limit: Annotated[int, typer.Option(help="newest logged requests to replay")] = 5000,
    dry_run: DryRunOpt = False,
) -> None:
    """Pick the load threshold (the quality/throughput knob) for a target on logged traffic."""
    from echolm.learning import calibrate_router

    if (target_offload is None) == (target_win_rate is None):
        raise typer.BadParameter("give exactly one of --target-offload or --target-win-rate")
    try:
        result = _run_learner(calibrate_router, database_url, data_dir, target_offload=target_offload,
                              target_win_rate=target_win_rate, limit=limit, save=not dry_run)
    except LookupError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{'threshold':>10} {'offload':>8} {'win rate':>9} {'judged':>7}")
    for p in result.points:
        mark = "  <- chosen" if p is result.chosen else ""
        rate = "-" if p.win_rate is None else f"{p.win_rate:.3f}"
        typer.echo(f"{p.threshold:>10.3f} {p.offload:>8.3f} {rate:>9} {p.judged:>7}{mark}")
    _print({"requests": result.requests, "logged_contexts": result.logged_contexts,
            "mean_load": round(result.mean_load, 4), "threshold": result.chosen.threshold,
            "offload_share": round(result.chosen.offload, 4),
            "win_rate": None if result.chosen.win_rate is None else round(result.chosen.win_rate, 4),
            "target_reached": result.reached, "stored_version": result.version})
    if not result.reached:
        typer.echo("target not reachable with this router and traffic: the closest threshold was chosen. The bias "
                   "is bounded by bandit.lambda0 per unit of relative cost; a larger lambda0 reaches further.", err=True)


@router_app.command("show")
def router_show(database_url: DbOpt = None, data_dir: DataDirOpt = None) -> None:
    """The stored router and selector versions and their training metrics."""
    from echolm.model_store import HELPFULNESS_MODEL, ROUTER_MODEL

    settings = _prepared(database_url=database_url, data_dir=data_dir)

    async def work(_store: Any, models: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in (ROUTER_MODEL, HELPFULNESS_MODEL):
            stored = await models.load(name)
            out[name] = None if stored is None else {
                "version": stored.version, "created_at": stored.created_at, "metrics": stored.metrics,
                **({"load_threshold": stored.state.get("load_threshold")} if name == ROUTER_MODEL else
                   {"threshold": stored.state.get("threshold")})}
        return out

    _print(asyncio.run(_with_stores(settings, work)))
