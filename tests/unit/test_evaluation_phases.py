"""Phase ordering of ``echolm eval``: a phase never runs before a requested phase it is built from."""

from __future__ import annotations

import logging

import pytest

from echolm.evaluation import harness
from echolm.evaluation.harness import MissingGenerations, ordered_phases, run_phases


def test_prerequisites_move_before_the_phase_that_needs_them() -> None:
    # Session 7 asked for learned before random; the run died 30 minutes in, at the learned phase.
    assert ordered_phases(["large", "small", "learned", "random", "cache", "nearest"]) == [
        "large", "small", "cache", "nearest", "random", "learned"]


def test_priority_order_is_kept_where_nothing_depends() -> None:
    phases = ["cache", "large", "small", "nearest", "random", "cache-size", "selected", "learned", "calibrate"]
    assert ordered_phases(phases) == phases
    assert ordered_phases(["small", "large"]) == ["small", "large"]


def test_unrequested_prerequisites_are_not_added() -> None:
    assert ordered_phases(["learned"]) == ["learned"]  # its inputs may be in the generation cache already


class _Run:
    """A workload run whose ``learned`` phase lacks its inputs and whose other phases have no jobs."""

    class workload:  # noqa: N801 - stands in for the Workload attribute
        name = "w"

    def phase_jobs(self, phase: str) -> list[object]:
        if phase == "learned":
            raise MissingGenerations("w: r1 on small+random is not generated yet")
        return []


def test_a_phase_without_its_inputs_is_skipped_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(harness, "generate_missing", lambda jobs, *args, **kwargs: len(jobs))
    with caplog.at_level(logging.WARNING, logger="echolm.evaluation.harness"):
        done = run_phases([_Run()], settings=None, cache=None, phases=["learned", "small"],  # type: ignore[arg-type, list-item]
                          progress=False)
    assert done == ["small"]  # learned was not completed
    assert "skipping phase learned of w" in caplog.text and "cache, nearest, random" in caplog.text
