"""Replay planning (paper, "Replay and cache management"): potential gain, cut-off, round cap, load."""

from __future__ import annotations

import json

import pytest

from echolm.policy.replay import ExampleGain, GainTracker, ReplayPlanner, best_of, best_of_async


def test_gain_is_a_decaying_average_of_quality_shortfall_times_cost():
    tracker = GainTracker(smoothing=0.25)
    first = tracker.observe_use(7, quality=0.2, cost=0.5)
    assert first == ExampleGain(7, pytest.approx(0.4), 1.0, 0)
    second = tracker.observe_use(7, quality=1.0, cost=0.5)  # a perfect answer adds a zero sample
    assert second.gain == pytest.approx(0.4 + 0.25 * (0.0 - 0.4))
    assert second.uses == 2.0
    # inputs are clipped to [0, 1]
    assert tracker.observe_use(8, quality=-1.0, cost=5.0).gain == 1.0


def test_replay_resets_gain_and_counts_rounds():
    tracker = GainTracker()
    tracker.observe_use(1, 0.0, 1.0)
    after = tracker.on_replayed(1)
    assert after == ExampleGain(1, 0.0, 0.0, 1)
    assert tracker.observe_use(1, 0.5, 1.0) == ExampleGain(1, 0.5, 1.0, 1)  # new version starts fresh
    restored = GainTracker.from_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.gains == tracker.gains and restored.smoothing == tracker.smoothing


def _candidates() -> list[ExampleGain]:
    return [
        ExampleGain(1, gain=0.10, uses=3, replay_rounds=0),
        ExampleGain(2, gain=0.90, uses=3, replay_rounds=0),
        ExampleGain(3, gain=0.50, uses=3, replay_rounds=0),
        ExampleGain(4, gain=0.95, uses=3, replay_rounds=5),  # already replayed 5 times
        ExampleGain(5, gain=0.02, uses=3, replay_rounds=0),  # below the cut-off
    ]


def test_picks_highest_gain_first():
    planner = ReplayPlanner(samples_per_replay=3, cost_per_sample=0.05)
    chosen = planner.select(_candidates(), budget=1, large_load=0.0, idle_threshold=0.5)
    assert [c.example_id for c in chosen] == [2]
    chosen = planner.select(_candidates(), budget=10, large_load=0.0, idle_threshold=0.5)
    assert [c.example_id for c in chosen] == [2, 3, 1]


def test_respects_the_round_cap():
    planner = ReplayPlanner(max_rounds=5)
    chosen = planner.select(_candidates(), budget=10, large_load=0.0, idle_threshold=0.5)
    assert 4 not in {c.example_id for c in chosen}
    assert 4 in {c.example_id for c in ReplayPlanner(max_rounds=6).select(_candidates(), 10, 0.0, 0.5)}


def test_respects_the_cutoff():
    planner = ReplayPlanner(samples_per_replay=3, cost_per_sample=0.05)  # replay cost 0.15
    assert planner.replay_cost == pytest.approx(0.15)
    # example 5: 0.02 * 3 uses = 0.06 < 0.15, does not pay; example 1: 0.1 * 3 = 0.3 pays
    assert not planner.pays(_candidates()[4]) and planner.pays(_candidates()[0])
    chosen = {c.example_id for c in planner.select(_candidates(), 10, 0.0, 0.5)}
    assert 5 not in chosen and 1 in chosen
    # a costlier replay moves the cut-off up: only examples with G * uses >= 0.6 remain
    expensive = ReplayPlanner(samples_per_replay=4, cost_per_sample=0.15)
    assert [c.example_id for c in expensive.select(_candidates(), 10, 0.0, 0.5)] == [2, 3]


def test_stop_at_cutoff_versus_skip():
    candidates = [ExampleGain(1, 0.8, 1, 0), ExampleGain(2, 0.5, 0.1, 0), ExampleGain(3, 0.3, 10, 0)]
    stopping = ReplayPlanner(samples_per_replay=1, cost_per_sample=0.2, stop_at_cutoff=True)
    skipping = ReplayPlanner(samples_per_replay=1, cost_per_sample=0.2, stop_at_cutoff=False)
    assert [c.example_id for c in stopping.select(candidates, 10, 0.0, 1.0)] == [1]
    assert [c.example_id for c in skipping.select(candidates, 10, 0.0, 1.0)] == [1, 3]


def test_yields_nothing_under_load_or_without_budget():
    planner = ReplayPlanner()
    assert planner.select(_candidates(), budget=10, large_load=0.5, idle_threshold=0.5) == []
    assert planner.select(_candidates(), budget=10, large_load=3.0, idle_threshold=0.5) == []
    assert planner.select(_candidates(), budget=0, large_load=0.0, idle_threshold=0.5) == []
    assert planner.select(_candidates(), budget=10, large_load=0.49, idle_threshold=0.5) != []


def test_best_of_keeps_the_best_sample_and_first_on_ties():
    assert best_of(["a", "bbb", "cc"], len) == ("bbb", 3)
    assert best_of(["xx", "yy"], len) == ("xx", 2)
    with pytest.raises(ValueError):
        best_of([], len)


async def test_best_of_async():
    async def scorer(text: str) -> float:
        return -abs(len(text) - 2)

    assert await best_of_async(["a", "bbbb", "cc", "dd"], scorer) == ("cc", 0)
    with pytest.raises(ValueError):
        await best_of_async([], scorer)
