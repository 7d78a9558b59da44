"""Which stages and tiers a worker process runs, and which consumer group it joins."""

from __future__ import annotations

import pytest

from echolm.settings import Settings
from streams.app import STAGES, WorkerPlan


def test_all_runs_every_stage_and_tier() -> None:
    plan = WorkerPlan.for_stage("all", Settings())
    assert set(STAGES) <= set(plan.stages)
    assert plan.tiers == ("small", "large")
    assert plan.name == "all"


def test_one_stage_and_generate_tiers() -> None:
    settings = Settings()
    assert WorkerPlan.for_stage("embed", settings) == WorkerPlan(("embed",), (), "embed")
    assert WorkerPlan.for_stage("generate", settings, ["large"]) == WorkerPlan(("generate",), ("large",), "generate-large")


def test_a_comma_list_runs_those_stages_in_one_process() -> None:
    settings = Settings()
    front = WorkerPlan.for_stage("embed, retrieve,route,log,embed", settings)
    assert front.stages == ("embed", "retrieve", "route", "log")
    assert front.tiers == ()  # no generate stage: no models
    assert front.name == "embed-retrieve-route-log"
    # Two workers with the same list join the same consumer group, so they split the partitions.
    both = WorkerPlan.for_stage("route,generate", settings, ["small"])
    assert both.name == "route-generate-small" and both.tiers == ("small",)


@pytest.mark.parametrize("stage", ["embed,nope", "", " , "])
def test_unknown_or_empty_stages_are_refused(stage: str) -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        WorkerPlan.for_stage(stage, Settings())
