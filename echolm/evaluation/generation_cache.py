"""Generations on disk, so that sweeps and re-runs never regenerate (issue: "generation results are cached").

A generation is keyed by the model, the exact prompt messages and the sampling settings; the value is
the text with what it cost (prompt and completion tokens, seconds, the machine's load average while it
ran). The store is one SQLite file (``generations.sqlite`` in the cache directory): safe to share
between processes, and a killed run loses at most the generation in flight.

``generate_missing`` runs the jobs that are not cached yet, one at a time through the project's
``Generator`` adapters (``echolm.generation.factory.make_generator``: the same code path as the
pipeline's generate stage), with a progress bar.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.settings import Settings, TierSettings

if TYPE_CHECKING:
    from echolm.protocols import Generator

log = logging.getLogger(__name__)

# A short request that loads a model before a timed run.
WARMUP_PROMPT = "Say OK."
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "echolm" / "eval"
# ``source`` is NULL for a generation made here and names the snapshot for one imported from another machine
# (``echolm eval-cache import``): imported answers are reused, their timings never enter the cost model.
_GENERATION_COLUMNS = ("key", "model", "messages", "params", "text", "prompt_tokens", "completion_tokens",
                       "finish_reason", "latency_s", "load_avg", "error", "created_at", "source")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,
    params TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    latency_s REAL NOT NULL,
    load_avg REAL,
    error TEXT,
    created_at REAL NOT NULL,
    source TEXT
);
CREATE TABLE IF NOT EXISTS timings (
    key TEXT NOT NULL,
    tier TEXT NOT NULL,
    threads INTEGER,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    seconds REAL NOT NULL,
    load_avg REAL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shared_cpu (
    threads INTEGER,
    alone TEXT NOT NULL,
    together_s REAL NOT NULL,
    created_at REAL NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """One generation to have: which tier answers which messages with which sampling settings."""

    tier: str
    model: str
    messages: tuple[ChatMessage, ...]
    params: GenerationParams

    @property
    def key(self) -> str:
        return generation_key(self.model, self.messages, self.params)


@dataclass(frozen=True, slots=True)
class CachedGeneration:
    """A stored generation. ``error`` is set (and ``text`` empty) when the model call failed for good."""

    key: str
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_s: float
    load_avg: float | None
    error: str | None


def generation_key(model: str, messages: Sequence[ChatMessage], params: GenerationParams) -> str:
    """sha256 over the model name, the messages and every sampling setting (canonical JSON)."""
    payload = {
        "model": model,
        "messages": [[m.role, m.content] for m in messages],
        "params": {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                   "stop": list(params.stop), "seed": params.seed},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class GenerationCache:
    """The on-disk store of generations (SQLite, WAL mode, one row per key)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "generations.sqlite"
        self._db = sqlite3.connect(self.path, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(generations)")}
        if "source" not in columns:  # a cache written before snapshots existed
            self._db.execute("ALTER TABLE generations ADD COLUMN source TEXT")
        self._db.commit()

    def get(self, key: str) -> CachedGeneration | None:
        row = self._db.execute(
            "SELECT key, model, text, prompt_tokens, completion_tokens, finish_reason, latency_s, load_avg, error "
            "FROM generations WHERE key = ?", (key,)).fetchone()
        return CachedGeneration(*row) if row else None

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedGeneration]:
        found = {}
        for key in dict.fromkeys(keys):
            hit = self.get(key)
            if hit is not None:
                found[key] = hit
        return found

    def put(self, job: GenerationJob, result: CachedGeneration) -> None:
        self._insert("INSERT OR REPLACE", (
            job.key, job.model, json.dumps([[m.role, m.content] for m in job.messages], ensure_ascii=False),
            json.dumps({"max_tokens": job.params.max_tokens, "temperature": job.params.temperature}),
            result.text, result.prompt_tokens, result.completion_tokens, result.finish_reason, result.latency_s,
            result.load_avg, result.error, time.time(), None))
        self._db.commit()

    def _insert(self, verb: str, row: Sequence[object]) -> bool:
        cursor = self._db.execute(
            f"{verb} INTO generations ({', '.join(_GENERATION_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in _GENERATION_COLUMNS)})", tuple(row))
        return cursor.rowcount > 0

    def export_rows(self, models: Iterable[str] | None = None) -> list[dict[str, object]]:
        """Every successful generation (of ``models`` when given) as a plain dict, for a snapshot file."""
        rows = self._db.execute(f"SELECT {', '.join(_GENERATION_COLUMNS)} FROM generations WHERE error IS NULL "
                                "ORDER BY created_at").fetchall()
        wanted = None if models is None else set(models)
        return [dict(zip(_GENERATION_COLUMNS, row, strict=True)) for row in rows if wanted is None or row[1] in wanted]

    def import_rows(self, rows: Iterable[dict[str, object]], source: str) -> int:
        """Adds the snapshot's generations under ``source``; a key already here is kept. Returns how many were new."""
        added = 0
        for row in rows:
            values = {**row, "source": row.get("source") or source}
            added += self._insert("INSERT OR IGNORE", [values[column] for column in _GENERATION_COLUMNS])
        self._db.commit()
        return added

    def measured(self, imported: bool = False) -> list[tuple[str, int, int, float, float | None]]:
        """(model, prompt tokens, completion tokens, seconds, load average) of every successful generation made
        on this machine, or (``imported``) of those imported from a snapshot, which ran elsewhere."""
        rows = self._db.execute("SELECT model, prompt_tokens, completion_tokens, latency_s, load_avg FROM generations "
                                f"WHERE error IS NULL AND source IS {'NOT ' if imported else ''}NULL "
                                "ORDER BY created_at").fetchall()
        return [(str(m), int(p), int(c), float(s), None if la is None else float(la)) for m, p, c, s, la in rows]

    def add_timing(self, job: GenerationJob, threads: int | None, result: CachedGeneration) -> None:
        """One calibration measurement (several per job are kept: the cost model takes the fastest)."""
        self._db.execute("INSERT INTO timings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (job.key, job.tier, threads, result.prompt_tokens, result.completion_tokens, result.latency_s,
                          result.load_avg, time.time()))
        self._db.commit()

    def timing_counts(self, keys: Iterable[str], threads: int | None) -> dict[str, int]:
        counts = {}
        for key in dict.fromkeys(keys):
            counts[key] = int(self._db.execute(
                "SELECT COUNT(*) FROM timings WHERE key = ? AND threads IS ?", (key, threads)).fetchone()[0])
        return counts

    def timing_seconds(self, key: str) -> list[float]:
        """Every calibration run of one generation, in seconds."""
        return [float(s) for (s,) in self._db.execute("SELECT seconds FROM timings WHERE key = ?", (key,))]

    def fastest_timings(self, threads: int | None) -> list[tuple[str, int, int, float, int]]:
        """(tier, prompt tokens, completion tokens, fastest seconds, measurements) per calibrated job."""
        rows = self._db.execute(
            "SELECT tier, prompt_tokens, completion_tokens, MIN(seconds), COUNT(*) FROM timings WHERE threads IS ? "
            "GROUP BY key, tier", (threads,)).fetchall()
        return [(str(t), int(p), int(c), float(s), int(n)) for t, p, c, s, n in rows]

    def add_shared_cpu(self, threads: int | None, alone_s: dict[str, float], together_s: float) -> None:
        """One ``measure_shared_cpu`` result: each tier's seconds alone, and the wall seconds of all at once."""
        self._db.execute("INSERT INTO shared_cpu VALUES (?, ?, ?, ?)",
                         (threads, json.dumps(alone_s, sort_keys=True), together_s, time.time()))
        self._db.commit()

    def shared_cpu_runs(self, threads: int | None) -> list[tuple[dict[str, float], float]]:
        rows = self._db.execute("SELECT alone, together_s FROM shared_cpu WHERE threads IS ? ORDER BY created_at",
                                (threads,)).fetchall()
        return [(json.loads(alone), float(together)) for alone, together in rows]

    def imported_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM generations WHERE source IS NOT NULL").fetchone()[0])

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM generations").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def missing_jobs(jobs: Iterable[GenerationJob], cache: GenerationCache) -> list[GenerationJob]:
    """Jobs (deduplicated, order kept) whose key is not in the cache."""
    unique = {job.key: job for job in jobs}
    return [job for key, job in unique.items() if cache.get(key) is None]


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


async def _generate_all(jobs: Sequence[GenerationJob], tiers: dict[str, TierSettings], settings: Settings,
                        cache: GenerationCache, on_done: Callable[[GenerationJob, CachedGeneration], None],
                        timing_only: bool = False) -> None:
    from echolm.generation.factory import make_generator

    generators = {}
    try:
        for job in jobs:
            if job.tier not in generators:
                generators[job.tier] = make_generator(tiers[job.tier], settings)
            generator = generators[job.tier]
            load = _load_average()
            try:
                result = await generator.generate(list(job.messages), job.params, request_id=job.key[:16])
            except EchoLMError as error:
                if error.code is ErrorCode.GENERATION_TIMEOUT:
                    # Usually a busy machine, not the request: not stored, so the next run retries it.
                    log.warning("generation timed out (%s); not cached: %s", job.tier, error.message)
                    continue
                # Kept as a failed answer (it scores as wrong), so a hopeless request is not retried forever.
                stored = CachedGeneration(job.key, job.model, "", 0, 0, "error", tiers[job.tier].timeout_s,
                                          load, f"{error.code.value}: {error.message}"[:500])
            else:
                stored = CachedGeneration(job.key, job.model, result.text, result.prompt_tokens,
                                          result.completion_tokens, result.finish_reason, result.latency_s, load,
                                          None)
            if timing_only:
                if stored.error is None:
                    cache.add_timing(job, tiers[job.tier].n_threads, stored)
            else:
                cache.put(job, stored)
            on_done(job, stored)
    finally:
        for generator in generators.values():
            await generator.aclose()


def generate_missing(jobs: Sequence[GenerationJob], settings: Settings, cache: GenerationCache, *,
                     progress: bool = True, description: str = "generating") -> int:
    """Generate every job not yet cached, one at a time (clean per-request costs); returns how many ran."""
    todo = missing_jobs(jobs, cache)
    if not todo:
        return 0
    tiers = {tier.name: tier for tier in settings.tiers}
    unknown = {job.tier for job in todo} - set(tiers)
    if unknown:
        raise ValueError(f"jobs name unknown tiers {sorted(unknown)}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=description, unit="gen", dynamic_ncols=True)

    def on_done(job: GenerationJob, stored: CachedGeneration) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{job.tier} {stored.completion_tokens} tok {stored.latency_s:.1f}s")
            bar.update(1)
        if stored.error:
            log.warning("generation failed (%s): %s", job.tier, stored.error)

    try:
        asyncio.run(_generate_all(todo, tiers, settings, cache, on_done))
    finally:
        if bar is not None:
            bar.close()
    return len(todo)


def calibrate_costs(jobs: Sequence[GenerationJob], settings: Settings, cache: GenerationCache, *, repeats: int = 2,
                    progress: bool = True) -> int:
    """Time ``jobs`` ``repeats`` times each with the tiers as configured (threads included), for the cost
    model. Rounds go through the whole list, so a job never directly follows itself (llama.cpp would reuse
    its whole prompt from the KV cache). Measurements already stored count; returns how many ran now."""
    tiers = {tier.name: tier for tier in settings.tiers}
    unique = list({job.key: job for job in jobs}.values())
    done = {tier: cache.timing_counts([j.key for j in unique if j.tier == tier], tiers[tier].n_threads)
            for tier in {j.tier for j in unique}}
    rounds = [[job for job in unique if done[job.tier][job.key] <= r] for r in range(repeats)]
    todo = [job for jobs_of_round in rounds for job in jobs_of_round]
    if not todo:
        return 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="calibrating costs", unit="gen", dynamic_ncols=True)

    def on_done(job: GenerationJob, stored: CachedGeneration) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{job.tier} {stored.prompt_tokens}+{stored.completion_tokens} tok "
                                f"{stored.latency_s:.1f}s")
            bar.update(1)

    try:
        asyncio.run(_generate_all(todo, tiers, settings, cache, on_done, timing_only=True))
    finally:
        if bar is not None:
            bar.close()
    return len(todo)


async def _run_in_turn(generator: Generator, jobs: Sequence[GenerationJob]) -> float:
    started = time.perf_counter()
    for job in jobs:
        await generator.generate(list(job.messages), job.params, request_id=job.key[:16])
    return time.perf_counter() - started


async def _alone_and_together(jobs_by_tier: dict[str, list[GenerationJob]], tiers: dict[str, TierSettings],
                              settings: Settings) -> tuple[dict[str, float], float]:
    from echolm.generation.factory import make_generator

    generators = {tier: make_generator(tiers[tier], settings) for tier in jobs_by_tier}
    try:
        for tier, jobs in jobs_by_tier.items():  # loads the model, outside the timed runs
            await generators[tier].generate([ChatMessage("user", WARMUP_PROMPT)], replace(jobs[0].params, max_tokens=2),
                                            request_id=f"warm-{tier}")
        alone = {tier: await _run_in_turn(generators[tier], jobs) for tier, jobs in jobs_by_tier.items()}
        started = time.perf_counter()
        await asyncio.gather(*(_run_in_turn(generators[tier], jobs) for tier, jobs in jobs_by_tier.items()))
        return alone, time.perf_counter() - started
    finally:
        for generator in generators.values():
            await generator.aclose()


def measure_shared_cpu(jobs: Sequence[GenerationJob], settings: Settings, cache: GenerationCache, *,
                       per_tier: int = 6) -> tuple[dict[str, float], float] | None:
    """How much tiers slow each other when they generate at the same time, as the pipeline's worker lets
    them (``echolm.evaluation.efficiency``, ``shared_cpu_slowdown``): ``per_tier`` of each tier's ``jobs``
    (spread over its list) run one tier after the other, then every tier's at once. Stored in ``cache`` under the
    tiers' thread count; returns (seconds alone per tier, seconds together), or None with fewer than two
    tiers. The slowdown is fitted against these alone times, measured in the same minute as the run
    together, not against the cost model's predictions, so the machine's state at the time cancels out."""
    tiers = {tier.name: tier for tier in settings.tiers}
    by_tier: dict[str, list[GenerationJob]] = {}
    for job in {job.key: job for job in jobs}.values():
        by_tier.setdefault(job.tier, []).append(job)
    # Spread over each tier's list, so every arm and workload the calibration covers is represented.
    by_tier = {tier: listed[::max(1, len(listed) // per_tier)][:per_tier] for tier, listed in by_tier.items()}
    if len(by_tier) < 2:
        return None
    log.info("timing %s alone, then together", " and ".join(f"{len(j)} {t} requests" for t, j in by_tier.items()))
    alone, together = asyncio.run(_alone_and_together(by_tier, tiers, settings))
    threads = {tiers[tier].n_threads for tier in by_tier}
    cache.add_shared_cpu(threads.pop() if len(threads) == 1 else None, alone, together)
    log.info("shared CPU: %s alone (%.1f s in turn), %.1f s together",
             ", ".join(f"{t} {s:.1f} s" for t, s in alone.items()), sum(alone.values()), together)
    return alone, together
