"""Snapshots of the evaluation's answers, so that another machine scores them without regenerating.

Generating a workload's answers takes most of an evaluation on CPU (about an hour for mbpp-camel on two
cores), and the cache lives in ``~/.cache/echolm/eval``, which goes with the machine. A snapshot is one
gzip'd JSON file with the generation cache's successful answers and the replay phase's outcomes. Importing
it gives a fresh cache the same answers (greedy decoding: the same weights give the same text), so the
report's quality figures come out as where the snapshot was made. What a snapshot does *not* carry is
speed: calibration timings and the tiers' shared-CPU measurement are machine facts, and imported
generations' own seconds are kept out of the cost model (``GenerationCache.measured``). Run phase
``calibrate`` on the importing machine before reading throughput or latency.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echolm.evaluation.generation_cache import GenerationCache
from echolm.evaluation.replay_phase import ReplayStore

FORMAT = "echolm-eval-snapshot"
VERSION = 1


class SnapshotError(ValueError):
    """The file is not an evaluation snapshot this version can read."""


@dataclass(frozen=True, slots=True)
class SnapshotCounts:
    generations: int
    replays: int


def export_snapshot(cache_dir: Path, path: Path, models: list[str] | None = None) -> SnapshotCounts:
    """Writes the answers under ``cache_dir`` (only ``models``' generations when given) to ``path``."""
    cache = GenerationCache(cache_dir)
    try:
        generations = cache.export_rows(models)
    finally:
        cache.close()
    replays = ReplayStore(cache_dir).raw()
    document = {"format": FORMAT, "version": VERSION, "created_at": time.time(), "generations": generations,
                "replays": replays}
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as out:
        json.dump(document, out, ensure_ascii=False)
    return SnapshotCounts(len(generations), len(replays))


def read_snapshot(path: Path) -> dict[str, Any]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as source:
            document = json.load(source)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path}: not a gzip'd JSON snapshot ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not an {FORMAT} file")
    if document.get("version") != VERSION:
        raise SnapshotError(f"{path}: snapshot version {document.get('version')}, this EchoLM reads {VERSION}")
    return document


def import_snapshot(path: Path, cache_dir: Path) -> SnapshotCounts:
    """Adds the snapshot's answers to the cache under ``cache_dir``; what is there already is kept.
    Returns how many generations and replay outcomes were new."""
    document = read_snapshot(path)
    cache = GenerationCache(cache_dir)
    try:
        generations = cache.import_rows(document["generations"], source=path.name)
    finally:
        cache.close()
    store = ReplayStore(cache_dir)
    present = store.keys()
    replays = 0
    for key, outcome in document["replays"].items():
        if key not in present:
            store.put_raw(key, outcome)
            replays += 1
    return SnapshotCounts(generations, replays)
