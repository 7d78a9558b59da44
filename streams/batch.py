"""``echolm batch``: an OpenAI-format batch file through the whole pipeline, resumable.

Every input line gets exactly one output line. Lines that cannot be requests get their error line
at once; the rest are produced to the requests topic and their responses collected from the
responses topic. Re-running the same command skips every id already in the output file.
With no broker configured, the job brings its own: an embedded Tansu broker, SQLite, and a
supervised worker process that it restarts if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from echolm.settings import Settings
from streams.batch_format import (
    ParsedLine,
    RejectedLine,
    done_ids,
    output_id,
    parse_line,
    rejected_output,
    response_output,
    undecodable_line,
)
from streams.kafka_io import RequestProducer, ResponseCollector, create_topics
from streams.records import ResponseRecord

log = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    input_lines: int = 0
    skipped_done: int = 0
    rejected: int = 0
    answered: int = 0
    errors: int = 0
    by_tier: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    offloaded_with_examples: int = 0
    pending: int = 0
    logged: int | None = None
    wall_s: float = 0.0
    output: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "input_lines": self.input_lines, "skipped_already_done": self.skipped_done,
            "rejected_lines": self.rejected, "answered": self.answered, "errors": self.errors,
            "by_tier": dict(self.by_tier), "error_codes": dict(self.error_codes),
            "offloaded_with_examples": self.offloaded_with_examples,
            "offload_share": round(self.offloaded_with_examples / self.answered, 3) if self.answered else 0.0,
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
            "throughput_rps": round(self.answered / self.wall_s, 3) if self.wall_s else None,
            "pending": self.pending, "history_rows_logged": self.logged, "wall_s": round(self.wall_s, 1),
            "output": str(self.output) if self.output else None,
        }


class BatchIncomplete(RuntimeError):
    """The pipeline stopped making progress; the output so far is valid and a re-run resumes."""


def _prepare_output(path: Path) -> set[str]:
    """Ids already done; drops a torn last line left by a crash mid-write."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return done_ids(data.decode("utf-8", "replace").splitlines())


def read_requests(input_path: Path, settings: Settings, already_done: set[str],
                  summary: BatchSummary) -> tuple[list[ParsedLine], list[RejectedLine]]:
    parsed: list[ParsedLine] = []
    rejected: list[RejectedLine] = []
    seen: set[str] = set()
    with input_path.open("rb") as handle:
        for line_no, raw_bytes in enumerate(handle, start=1):
            if not raw_bytes.strip():
                continue
            summary.input_lines += 1
            try:
                raw = raw_bytes.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                item: ParsedLine | RejectedLine = undecodable_line(line_no, raw_bytes, exc)
            else:
                item = parse_line(line_no, raw, settings.default_tenant, seen)
            request_id = item.request.request_id if isinstance(item, ParsedLine) else item.request_id
            if output_id(request_id) in already_done:
                summary.skipped_done += 1
                continue
            (parsed if isinstance(item, ParsedLine) else rejected).append(item)
    return parsed, rejected


def _write(out: IO[str], record: dict[str, Any]) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


async def run_batch(settings: Settings, input_path: Path, output_path: Path, *,
                    stall_timeout_s: float = 600.0, wait_for_history_s: float = 60.0,
                    progress: bool = True) -> BatchSummary:
    """Produce, collect and write; the broker and workers must already be reachable."""
    started = time.monotonic()
    summary = BatchSummary(output=output_path)
    already_done = _prepare_output(output_path)
    parsed, rejected = read_requests(input_path, settings, already_done, summary)
    summary.rejected = len(rejected)
    pending = {p.request.request_id: p for p in parsed}
    with output_path.open("a", encoding="utf-8") as out:
        for item in rejected:
            _write(out, rejected_output(item))
            summary.error_codes[item.code.value] += 1
        if pending:
            await create_topics(settings)
            await _stream(settings, pending, out, summary, stall_timeout_s, progress)
    summary.wall_s = time.monotonic() - started
    summary.logged = await _wait_for_history(settings, [p.request.request_id for p in parsed], wait_for_history_s)
    return summary


async def _stream(settings: Settings, pending: dict[str, ParsedLine], out: IO[str], summary: BatchSummary,
                  stall_timeout_s: float, progress: bool) -> None:
    bar = tqdm(total=len(pending), unit="req", desc="batch", disable=not progress, dynamic_ncols=True)
    async with ResponseCollector(settings) as collector:
        async with RequestProducer(settings) as producer:
            await producer.send_all(p.request for p in pending.values())
        last_progress = time.monotonic()
        async for batch in collector.batches():
            for item in batch:
                if not isinstance(item, ResponseRecord) or item.request_id not in pending:
                    continue  # another job's response, or a redelivered duplicate already written
                del pending[item.request_id]
                _write(out, response_output(item))
                _account(summary, item)
                bar.update(1)
                last_progress = time.monotonic()
            if summary.answered:
                bar.set_postfix(offload=f"{summary.offloaded_with_examples / summary.answered:.0%}",
                                errors=summary.errors)
            if not pending:
                break
            if time.monotonic() - last_progress > stall_timeout_s:
                summary.pending = len(pending)
                bar.close()
                raise BatchIncomplete(
                    f"no response for {stall_timeout_s:.0f}s; {len(pending)} request(s) still pending. "
                    f"The output so far is kept; re-run the same command to resume.")
    bar.close()


def _account(summary: BatchSummary, response: ResponseRecord) -> None:
    if response.ok:
        summary.answered += 1
        summary.by_tier[response.tier or "?"] += 1
        summary.latencies_s.append(response.finished_at - response.submitted_at)
        if response.examples:
            summary.offloaded_with_examples += 1
    else:
        summary.errors += 1
        summary.error_codes[response.error.code.value if response.error else "?"] += 1


async def _wait_for_history(settings: Settings, request_ids: list[str], timeout_s: float) -> int | None:
    """The log stage writes asynchronously; wait until every answered request is in the history."""
    if not request_ids:
        return 0
    from echolm.history.store import SqlHistoryStore

    store = SqlHistoryStore(settings.resolved_database_url)
    await store.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            logged = await store.logged_request_ids(request_ids)
            if len(logged) == len(request_ids) or time.monotonic() > deadline:
                return len(logged)
            await asyncio.sleep(0.25)
    finally:
        with contextlib.suppress(Exception):
            await store.aclose()
