"""``echolm eval``'s configuration checks: a mistyped validated system or an impossible combination
fails before any model loads, with a message naming the choices."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from echolm.cli import app
from echolm.evaluation.evaluate import VALIDATED_SYSTEMS, EvalConfig
from echolm.evaluation.report import ALWAYS_LARGE, ECHOLM_REPLAY_CACHE_FRONT


def test_validate_systems_takes_the_short_names_of_the_validated_systems() -> None:
    config = EvalConfig(validate=40, validate_systems=frozenset({"cache-front"}))
    assert config.validate_systems == {"cache-front"}
    assert VALIDATED_SYSTEMS["cache-front"] == ECHOLM_REPLAY_CACHE_FRONT
    assert VALIDATED_SYSTEMS["always-large"] == ALWAYS_LARGE
    assert EvalConfig(validate=40).validate_systems is None  # every system


def test_an_unknown_system_is_refused_with_the_names_to_use() -> None:
    with pytest.raises(ValueError, match="unknown cache-fornt; use always-large, half-offload, small-replayed, "
                                         "replay-reuse, cache-front"):
        EvalConfig(validate=40, validate_systems=frozenset({"cache-fornt", "always-large"}))


def test_latency_needs_the_always_large_run_its_loads_are_multiples_of() -> None:
    with pytest.raises(ValueError, match="has to include always-large"):
        EvalConfig(validate=40, validate_loads=[0.5], validate_systems=frozenset({"replay-reuse"}))
    EvalConfig(validate=40, validate_loads=[0.5], validate_systems=frozenset({"always-large", "replay-reuse"}))


def test_the_cli_reports_a_bad_choice_as_a_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(app, ["eval", "--validate", "4", "--validate-systems", "always-large,nope",
                                      "--cache-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--docs", ""])
    assert result.exit_code == 2
    assert "unknown nope" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_generate_workers_split_the_cores_and_share_a_thread_per_process() -> None:
    from echolm.evaluation.validation import generate_worker_settings
    from echolm.generation.factory import llamacpp_tiers_share_a_thread
    from echolm.settings import Settings

    with pytest.raises(ValueError, match="at least 1"):
        EvalConfig(validate=40, generate_workers=0)
    live = Settings()
    per_core = generate_worker_settings(live, workers=2, cores=2)
    assert [t.n_threads for t in per_core.tiers] == [1, 1]
    # one request at a time per process, though 1 + 1 threads would fit 2 cores
    assert llamacpp_tiers_share_a_thread(per_core, cpu_count=2)
    assert [t.n_threads for t in generate_worker_settings(live, workers=2, cores=16).tiers] == [8, 8]
    assert [t.n_threads for t in generate_worker_settings(live, workers=4, cores=2).tiers] == [1, 1]
    assert per_core.log_level == "INFO"  # the readiness lines the pipeline waits for
    assert live.tiers[0].n_threads is None  # the caller's settings are not changed
