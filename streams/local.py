"""Batch jobs with batteries: an embedded broker and supervised local workers when none are given."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from echolm.settings import Settings
from streams.batch import BatchIncomplete, BatchSummary, run_batch
from streams.broker import EmbeddedBroker
from streams.worker import WorkerProcess

log = logging.getLogger(__name__)


@contextlib.contextmanager
def local_infrastructure(settings: Settings) -> Iterator[Settings]:
    """Yields settings pointing at a broker: the configured one, or an embedded one started here."""
    if settings.kafka_bootstrap:
        yield settings
        return
    with EmbeddedBroker(settings.data_dir) as broker:
        yield settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})


async def _supervise(workers: list[WorkerProcess], max_restarts: int, failed: asyncio.Event) -> None:
    """Restarts a worker that died; redelivery makes the restart lose nothing."""
    while True:
        for worker in workers:
            if not worker.alive:
                if worker.restarts >= max_restarts:
                    log.error("worker died %d times; giving up. Last log lines:\n%s", worker.restarts + 1,
                              worker.tail())
                    failed.set()
                    return
                code = worker.process.returncode if worker.process else None
                log.warning("worker exited (code %s); restarting it. Log: %s", code, worker.log_path)
                worker.start()
        await asyncio.sleep(1.0)


async def _batch_with_workers(settings: Settings, input_path: Path, output_path: Path, n_workers: int,
                              stall_timeout_s: float, progress: bool, max_restarts: int) -> BatchSummary:
    from echolm.history.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await upgrade(settings.resolved_database_url, directory=settings.migrations_dir)
    workers = [WorkerProcess(settings, log_path=settings.data_dir / f"worker-{i}.log") for i in range(n_workers)]
    for worker in workers:
        worker.start()
    failed = asyncio.Event()
    supervisor = asyncio.create_task(_supervise(workers, max_restarts, failed))
    job = asyncio.create_task(run_batch(settings, input_path, output_path, stall_timeout_s=stall_timeout_s,
                                        progress=progress))
    try:
        gave_up = asyncio.create_task(failed.wait())
        done, _ = await asyncio.wait({job, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        if job not in done:
            job.cancel()
            raise BatchIncomplete("the local worker keeps crashing (see its log above); output so far is kept, "
                                  "re-run the same command to resume")
        gave_up.cancel()
        return job.result()
    finally:
        supervisor.cancel()
        for worker in workers:
            await asyncio.to_thread(worker.stop)


def run_local_batch(settings: Settings, input_path: Path, output_path: Path, *, workers: int | None = None,
                    stall_timeout_s: float = 600.0, progress: bool = True, max_restarts: int = 3) -> BatchSummary:
    embedded = settings.uses_embedded_broker
    n_workers = workers if workers is not None else (1 if embedded else 0)
    with local_infrastructure(settings) as live:
        return asyncio.run(_batch_with_workers(live, input_path, output_path, n_workers, stall_timeout_s,
                                               progress, max_restarts))
