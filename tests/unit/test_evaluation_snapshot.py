"""Snapshots: another machine gets the same answers, never the timings."""

from __future__ import annotations

import gzip
import json
import sqlite3

import pytest
from typer.testing import CliRunner

from echolm.cli import app
from echolm.domain import ChatMessage, GenerationParams
from echolm.evaluation.generation_cache import CachedGeneration, GenerationCache, GenerationJob, missing_jobs
from echolm.evaluation.replay_phase import ReplayStore
from echolm.evaluation.snapshot import SnapshotError, export_snapshot, import_snapshot

PARAMS = GenerationParams(max_tokens=16, temperature=0.0)


def _job(model: str, prompt: str) -> GenerationJob:
    return GenerationJob("large" if model == "big" else "small", model, (ChatMessage("user", prompt),), PARAMS)


def _store(cache: GenerationCache, job: GenerationJob, text: str, seconds: float, error: str | None = None) -> None:
    cache.put(job, CachedGeneration(job.key, job.model, text, 7, 3, "stop", seconds, 0.5, error))


def test_imported_answers_are_reused_but_their_seconds_never_enter_the_cost_model(tmp_path) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    source = GenerationCache(there)
    jobs = [_job("big", "q1"), _job("small", "q2"), _job("big", "failed")]
    _store(source, jobs[0], "answer one", 9.0)
    _store(source, jobs[1], "answer two", 2.0)
    _store(source, jobs[2], "", 1.0, error="timeout")
    source.close()
    ReplayStore(there).put_raw("abc", {"answers": ["replayed"], "samples": 10})

    counts = export_snapshot(there, tmp_path / "snap.json.gz")
    assert (counts.generations, counts.replays) == (2, 1)  # the failed generation is not an answer

    local = GenerationCache(here)
    _store(local, jobs[1], "my own answer two", 1.5)
    local.close()
    assert import_snapshot(tmp_path / "snap.json.gz", here) == type(counts)(1, 1)

    cache = GenerationCache(here)
    assert cache.get(jobs[0].key).text == "answer one"
    assert cache.get(jobs[1].key).text == "my own answer two"  # what was here is kept
    assert missing_jobs(jobs, cache) == [jobs[2]]  # a failure elsewhere is retried here
    assert cache.measured() == [("small", 7, 3, 1.5, 0.5)]  # only this machine's timing
    assert (len(cache), cache.imported_count()) == (2, 1)
    cache.close()
    assert ReplayStore(here).raw() == {"abc": {"answers": ["replayed"], "samples": 10}}
    assert import_snapshot(tmp_path / "snap.json.gz", here) == type(counts)(0, 0)  # idempotent


def test_export_can_keep_only_some_models(tmp_path) -> None:
    cache = GenerationCache(tmp_path)
    _store(cache, _job("big", "q1"), "a", 1.0)
    _store(cache, _job("small", "q1"), "b", 1.0)
    cache.close()
    assert export_snapshot(tmp_path, tmp_path / "s.json.gz", ["small"]).generations == 1
    with gzip.open(tmp_path / "s.json.gz", "rt") as f:
        assert [row["model"] for row in json.load(f)["generations"]] == ["small"]


def test_a_cache_from_before_snapshots_is_upgraded_in_place(tmp_path) -> None:
    db = sqlite3.connect(tmp_path / "generations.sqlite")
    db.execute("CREATE TABLE generations (key TEXT PRIMARY KEY, model TEXT NOT NULL, messages TEXT NOT NULL, "
               "params TEXT NOT NULL, text TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
               "completion_tokens INTEGER NOT NULL, finish_reason TEXT NOT NULL, latency_s REAL NOT NULL, "
               "load_avg REAL, error TEXT, created_at REAL NOT NULL)")
    db.execute("INSERT INTO generations VALUES ('k', 'm', '[]', '{}', 'old', 1, 1, 'stop', 2.0, NULL, NULL, 0)")
    db.commit()
    db.close()
    cache = GenerationCache(tmp_path)
    assert cache.get("k").text == "old"
    assert cache.measured() == [("m", 1, 1, 2.0, None)]  # made here
    _store(cache, _job("big", "new"), "fresh", 1.0)
    assert len(cache) == 2
    cache.close()


@pytest.mark.parametrize("content", [b"not gzip", gzip.compress(b'{"format": "other"}'),
                                     gzip.compress(b'{"format": "echolm-eval-snapshot", "version": 99}')])
def test_a_file_that_is_not_a_snapshot_is_refused_by_name(tmp_path, content) -> None:
    (tmp_path / "bad.json.gz").write_bytes(content)
    with pytest.raises(SnapshotError, match="bad.json.gz"):
        import_snapshot(tmp_path / "bad.json.gz", tmp_path / "cache")


def test_the_commands_round_trip_and_explain_a_bad_file(tmp_path) -> None:
    cache = GenerationCache(tmp_path / "a")
    _store(cache, _job("big", "q1"), "a", 1.0)
    cache.close()
    runner = CliRunner()
    exported = runner.invoke(app, ["eval-cache", "export", str(tmp_path / "s.json.gz"), "--cache-dir", str(tmp_path / "a")])
    assert exported.exit_code == 0, exported.output
    assert "1 generations, 0 replay outcomes" in exported.output
    imported = runner.invoke(app, ["eval-cache", "import", str(tmp_path / "s.json.gz"), "--cache-dir", str(tmp_path / "b")])
    assert imported.exit_code == 0, imported.output
    assert "1 new generations" in imported.output
    (tmp_path / "bad.json.gz").write_bytes(b"nope")
    refused = runner.invoke(app, ["eval-cache", "import", str(tmp_path / "bad.json.gz"), "--cache-dir", str(tmp_path / "b")])
    assert refused.exit_code != 0
    assert "not a gzip'd JSON snapshot" in refused.output
