"""Load reports of generate workers (``echolm.routing.load`` explains the design and the topic).

Every worker that runs a generate stage publishes, every ``bandit.load_report_interval_s``, one
``LoadReport`` per tier with partitions of its generate topic assigned to it: the backlog (fresh high
watermarks from the broker minus the group's committed offsets, less what is being generated), the
requests in flight (the worker's ``echolm_tier_in_flight`` gauge) and the capacity (the tier's
concurrency). Committed offsets trail processing by at most the commit interval (1 s), so the backlog
can read high by that much. Reports are best effort: a failed measurement or send is logged and the
next interval tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from prometheus_client import REGISTRY

from echolm.routing.load import LoadReport, partition_backlog
from echolm.settings import Settings

log = logging.getLogger(__name__)


def in_flight(tier: str) -> int:
    """Requests this process is generating on ``tier`` now (the generate stage's gauge)."""
    value = REGISTRY.get_sample_value("echolm_tier_in_flight", {"tier": tier})
    return int(value or 0)


async def measure(consumer: Any, settings: Settings, worker: str, timeout_s: float = 5.0) -> list[LoadReport]:
    """Load reports for the tiers whose generate topic has partitions assigned to ``consumer`` (faust's)."""
    assigned = consumer.assignment()
    reports = []
    for tier in settings.tiers:
        topic = settings.topics.generate(tier.name)
        partitions = [tp for tp in assigned if tp.topic == topic]
        if not partitions:
            continue
        highwaters = await asyncio.wait_for(consumer.highwaters(*partitions), timeout_s)
        # faust's committed position per partition (the next offset to process); None before the
        # group's first commit, when every retained event still waits.
        committed = getattr(consumer, "_committed_offset", {})
        positions = {tp: committed.get(tp) or 0 for tp in partitions}
        running = in_flight(tier.name)
        reports.append(LoadReport(tier=tier.name, worker=worker, queue=partition_backlog(highwaters, positions, running),
                                  in_flight=running, capacity=tier.concurrency))
    return reports


def wire_load_reports(w: Any) -> None:
    """Adds the reporting timer to a worker app (``streams.app`` calls this for generate workers)."""
    settings: Settings = w.settings
    worker = f"{socket.gethostname()}-{os.getpid()}"

    @w.timer(settings.bandit.load_report_interval_s)
    async def report_load() -> None:
        try:
            reports = await measure(w.app.consumer, settings, worker)
            for report in reports:
                await w.app.send(settings.topics.load, key=report.tier.encode(), value=report.model_dump_json().encode())
        except Exception as exc:  # best effort: the router keeps the last load it saw
            log.debug("load report skipped (%s: %s)", type(exc).__name__, exc)
