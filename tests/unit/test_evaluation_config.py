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
