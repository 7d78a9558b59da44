"""The bandit router adapter with a fake load source: cold start, learned choices, load bias, measured
costs, selective feedback; the load board, token-cost fitting, historical loads, calibration choice."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from echolm.domain import Example, RetrievedExample
from echolm.history.feedback_store import GenerationTiming, LoggedRequest
from echolm.learning import CalibrationPoint, _choose, historical_loads, win_rate_of
from echolm.policy.bandit import ExampleFeatures, context_vector
from echolm.protocols import RoutingContext
from echolm.routing.bandit_router import LoadAwareBanditRouter, RouterState, new_state
from echolm.routing.comparison import comparison_request_id, split_comparison_id
from echolm.routing.costs import cost_model_from_rates, fit_token_rates, request_prompt_tokens
from echolm.routing.load import LoadBoard, LoadReport, partition_backlog
from echolm.settings import Settings, TierSettings
from echolm.testing import StaticRouter
from streams.records import InFlightRequest, Message, RequestRecord, encode_vector
from streams.stages import RouteStage

DIM = 8
TIERS = [TierSettings(name="small", backend="echo", model="s", relative_cost=1.0, use_examples=True),
         TierSettings(name="large", backend="echo", model="l", relative_cost=3.0, use_examples=False)]


def settings(**bandit) -> Settings:
    values = {"epsilon": 0.0, "policy": "argmax", "compare_rate": 0.0, "seed": 1, **bandit}
    return Settings(tiers=TIERS, bandit=values, kafka_bootstrap="unused:1")


def unit(index: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[index]


def example(similarity: float, quality: float = 0.9) -> RetrievedExample:
    return RetrievedExample(Example(1, "t", "a question", "an answer", "m", "large", quality), similarity, similarity)


def trained_state(config: Settings) -> RouterState:
    """Small is worth it for requests along axis 0 (reward 0.8 vs 0.5), not along axis 1 (0.1 vs 0.5)."""
    state = new_state(config, DIM, seed=0)
    contexts, tiers, rewards = [], [], []
    rng = np.random.default_rng(0)
    for axis, small_reward in ((0, 0.8), (1, 0.1)):
        for _ in range(40):
            v = unit(axis) + 0.05 * rng.normal(size=DIM).astype(np.float32)
            x = context_vector(v / np.linalg.norm(v), ExampleFeatures.from_retrieved([example(0.9)]), DIM)
            contexts += [x, x]
            tiers += ["small", "large"]
            rewards += [small_reward, 0.5]
    state.bandit.model.fit(np.stack(contexts), tiers, rewards, epochs=200)
    return state


@pytest.fixture(scope="module")
def state() -> RouterState:
    return trained_state(settings())


def context(axis: int, request_id: str = "r", load: dict[str, float] | None = None,
            examples: list[RetrievedExample] | None = None) -> RoutingContext:
    return RoutingContext(request_id, "t", 40, examples if examples is not None else [example(0.9)], unit(axis),
                          load or {})


def test_cold_start_routes_by_the_similarity_rule():
    router = LoadAwareBanditRouter(settings())
    assert not router.trained
    decision = router.route(context(0, examples=[example(0.95)]))
    assert decision.tier == "small" and decision.use_examples and decision.reason.startswith("bandit cold start")
    assert router.route(context(0, examples=[])).tier == "large"


def test_learned_utilities_route_each_kind_of_request_to_its_tier(state):
    router = LoadAwareBanditRouter(settings(), state)
    good, bad = router.route(context(0)), router.route(context(1))
    assert (good.tier, good.use_examples) == ("small", True)
    assert (bad.tier, bad.use_examples) == ("large", False)
    assert set(good.scores) == {"small", "large"} and "load 0.00" in good.reason


def test_rising_load_on_the_costly_tier_moves_requests_to_the_cheap_one(state):
    router = LoadAwareBanditRouter(settings(load_threshold=1.0, lambda0=1.0, gamma=2.0), state)
    scores = [router.route(context(1, load={"large": load})).scores for load in (0.0, 0.9, 1.5, 3.0, 6.0)]
    gaps = [s["small"] - s["large"] for s in scores]
    assert gaps[0] == pytest.approx(gaps[1]), "no bias below the threshold"
    assert all(b > a for a, b in zip(gaps[1:], gaps[2:])), "the cheap tier gains as load rises"
    assert router.route(context(1, load={"large": 0.5})).tier == "large"
    assert router.route(context(1, load={"large": 6.0})).tier == "small"


def test_load_comes_from_the_load_source_when_the_context_has_none(state):
    loads = {"large": 0.0}
    router = LoadAwareBanditRouter(settings(), state, loads=lambda: loads)
    assert router.route(context(1)).tier == "large"
    loads["large"] = 8.0
    assert router.route(context(1)).tier == "small"


def test_measured_token_costs_make_examples_cost_prefill_on_tiers_that_take_them(state):
    config = settings()
    state = RouterState.from_dict(json.loads(json.dumps(state.to_dict())))
    rates = {"small": fit_token_rates([GenerationTiming("small", p, c, 0.001 * p + 0.02 * c)
                                       for p, c in [(50, 20), (400, 20), (100, 80), (900, 60), (30, 10)]]),
             "large": fit_token_rates([GenerationTiming("large", p, c, 0.003 * p + 0.06 * c)
                                       for p, c in [(50, 20), (400, 20), (100, 80), (900, 60), (30, 10)]])}
    state.costs = cost_model_from_rates({"small": 1.0, "large": 3.0}, rates)
    router = LoadAwareBanditRouter(config, state)
    without = router.costs_for(context(0, examples=[]))
    with_examples = router.costs_for(context(0, examples=[example(0.9)] * 4))
    assert without["small"] == 1.0 and without["large"] == pytest.approx(3.0, rel=0.01)
    assert with_examples["large"] < without["large"], "examples lengthen only the small tier's prompt"


def test_selective_feedback_names_a_second_tier_only_when_allowed(state):
    uniform = settings(uniform_std=10.0, compare_rate=1.0)
    decision = LoadAwareBanditRouter(uniform, state).route(context(0))
    assert decision.compare_with == "large" and "compare with large" in decision.reason
    assert LoadAwareBanditRouter(settings(uniform_std=10.0, compare_rate=0.0), state).route(context(0)).compare_with is None
    loaded = LoadAwareBanditRouter(settings(uniform_std=10.0, compare_rate=1.0, load_threshold=0.5), state)
    assert loaded.route(context(0, load={"large": 2.0})).compare_with is None, "no extra work under load"


def test_state_survives_json_and_refuses_other_tiers(state):
    restored = RouterState.from_dict(json.loads(json.dumps(state.to_dict())))
    a = LoadAwareBanditRouter(settings(), state).route(context(0)).scores
    b = LoadAwareBanditRouter(settings(), restored).route(context(0)).scores
    assert a == pytest.approx(b)
    three = Settings(tiers=[*TIERS, TierSettings(name="xl", backend="echo", model="x", relative_cost=9.0)])
    with pytest.raises(ValueError, match="router fit"):
        LoadAwareBanditRouter(three, restored)


def test_calibrated_threshold_applies_unless_the_setting_pins_one(state):
    calibrated = RouterState.from_dict(state.to_dict())
    calibrated.load_threshold = -2.0  # a permanent bias: the knob turned towards throughput
    assert LoadAwareBanditRouter(settings(), calibrated).route(context(1)).tier == "small"
    assert LoadAwareBanditRouter(settings(load_threshold=1.0), calibrated).route(context(1)).tier == "large"


async def test_route_stage_sends_a_comparison_twin_under_its_own_id():
    class Comparing(StaticRouter):
        def route(self, context):
            from dataclasses import replace
            return replace(super().route(context), compare_with="large")

    config = settings()
    record = InFlightRequest(request=RequestRecord(request_id="r1", custom_id="c1",
                                                   messages=[Message(role="user", content="hi")]),
                             embedding_b64=encode_vector(unit(0)), examples=[])
    out = await RouteStage(config, Comparing("small")).process([record])
    assert [(o.topic, o.key) for o in out] == [(config.topics.generate("small"), "r1"),
                                              (config.topics.generate("large"), "r1~vs~large")]
    twin = InFlightRequest.model_validate_json(out[1].value)
    assert twin.request.custom_id is None and twin.route.tier == "large" and "selective feedback" in twin.route.reason
    assert split_comparison_id("r1~vs~large") == ("r1", "large") and split_comparison_id("r1") is None
    assert comparison_request_id("x" * 199, "large") is None


def test_load_board_sums_fresh_worker_reports_into_an_ema():
    board = LoadBoard(half_life_s=1.0, stale_after_s=5.0)
    board.observe(LoadReport(tier="large", worker="w1", queue=2, in_flight=1, capacity=1, at=100.0), now=100.0)
    assert board.loads()["large"] == pytest.approx(3.0)
    board.observe(LoadReport(tier="large", worker="w2", queue=0, in_flight=1, capacity=1, at=100.0), now=100.0)
    assert board.sample("large", 100.0) == pytest.approx(2.0)  # (2 + 0 + 1 + 1) / 2
    board.observe(LoadReport(tier="large", worker="w2", queue=0, in_flight=0, capacity=1, at=107.0), now=107.0)
    assert board.sample("large", 107.0) == pytest.approx(0.0), "w1's report went stale"
    assert board.loads()["large"] < 0.1  # 7 half-lives later the EMA follows the new sample
    assert partition_backlog({"p0": 10, "p1": 5, "p2": None}, {"p0": 4, "p1": 5, "p2": 0}, in_flight=2) == 4


def test_token_rates_are_recovered_by_non_negative_least_squares():
    shapes = [(50, 20), (400, 20), (100, 80), (900, 60), (30, 10), (200, 200)]
    rates = fit_token_rates([GenerationTiming("t", p, c, 0.002 * p + 0.05 * c) for p, c in shapes])
    assert rates is not None and rates.samples == 6
    assert rates.prefill_s_per_token == pytest.approx(0.002, rel=1e-6)
    assert rates.decode_s_per_token == pytest.approx(0.05, rel=1e-6)
    assert fit_token_rates([GenerationTiming("t", 10, 10, 1.0)] * 3) is None  # too few
    assert request_prompt_tokens(400, 800, {"small": True, "large": False}) == {"small": 300, "large": 100}


def test_token_rates_come_from_the_logged_split_where_a_regression_cannot_separate_them():
    # Every answer stopped at max_tokens, so decode time looks like a constant and the regression puts
    # all of it on the prompt (what a small tier with examples and a short max_tokens logs).
    prompts = [120, 260, 180, 400, 90, 330]
    whole = [GenerationTiming("small", p, 16, 0.005 * p) for p in prompts]
    assert fit_token_rates(whole) is None
    split = [GenerationTiming("small", p, 16, 0.004 * p + 0.2, prefill_seconds=0.004 * p, decode_seconds=0.2)
             for p in prompts]
    rates = fit_token_rates(split)
    assert rates is not None and rates.samples == 6
    assert rates.prefill_s_per_token == pytest.approx(0.004)
    assert rates.decode_s_per_token == pytest.approx(0.2 / 16)
    # A few split answers among many without: the regression, on all of them.
    mixed = split[:2] + [GenerationTiming("t", p, c, 0.002 * p + 0.05 * c)
                         for p, c in [(50, 20), (400, 20), (100, 80), (900, 60), (30, 10)]]
    assert fit_token_rates(mixed) is not None and fit_token_rates(mixed).samples == 7


def test_the_cost_model_expects_a_tiers_prefix_cache_to_supply_what_it_has_been_supplying():
    # The small tier's prefix cache supplied 3 of every 4 prompt tokens (shared examples); the large one none.
    small = [GenerationTiming("small", p, 16, 0.004 * p + 0.2, 0.004 * p, 0.2, cached_prompt_tokens=3 * p)
             for p in (100, 200, 150, 120, 180)]
    large = [GenerationTiming("large", p, 16, 0.01 * p + 0.8, 0.01 * p, 0.8) for p in (100, 200, 150, 120, 180)]
    rates = {"small": fit_token_rates(small), "large": fit_token_rates(large)}
    assert rates["small"].reused_share == pytest.approx(0.75) and rates["large"].reused_share == 0.0
    assert rates["small"].prefill_s_per_token == pytest.approx(0.004)  # per prefilled token
    costs = cost_model_from_rates({"small": 1.0, "large": 3.0}, rates)
    # 800 prompt tokens sent to the small tier: a quarter of them prefilled.
    assert costs.request_cost("small", 800, 16) == pytest.approx(0.004 * 200 + 0.2)
    assert costs.request_cost("large", 200, 16) == pytest.approx(0.01 * 200 + 0.8)


def logged(request_id: str, tier: str, start: float, end: float) -> LoggedRequest:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return LoggedRequest(request_id, "t", "p", tier, (), (), {"embed": 0.0}, None, None, None,
                         t0 + timedelta(seconds=start), t0 + timedelta(seconds=end))


def test_historical_load_counts_the_tiers_answers_in_generation():
    requests = [logged("a", "large", 0, 10), logged("b", "large", 2, 4), logged("c", "small", 3, 5),
                logged("d", "small", 11, 12)]
    assert historical_loads(requests, "large", capacity=2.0) == [0.5, 1.0, 1.0, 0.0]


def test_calibration_picks_the_least_bias_meeting_an_offload_target_and_the_most_offload_keeping_quality():
    points = [CalibrationPoint(-2.0, 0.9, 0.40, 10), CalibrationPoint(-1.0, 0.7, 0.47, 10),
              CalibrationPoint(0.0, 0.5, 0.50, 10), CalibrationPoint(1.0, 0.5, 0.50, 10)]
    assert _choose(points, 0.6, None) == (points[1], True)
    assert _choose(points, 0.95, None) == (points[0], False)
    assert _choose(points, None, 0.45) == (points[1], True)
    assert _choose(points, None, 0.6)[1] is False
    rate, judged = win_rate_of(["small", "large", "small"], ["a", "b", "c"], {("a", "small"): 0.75}, "large")
    assert (rate, judged) == (0.75, 2)  # a win (score 1.5) and the reference tier's tie; c has no outcome


async def test_generate_workers_measure_backlog_per_assigned_tier_topic():
    from collections import namedtuple

    from streams import metrics
    from streams.load_stage import measure

    TP = namedtuple("TP", "topic partition")
    config = settings()
    large_topic = config.topics.generate("large")

    class FakeConsumer:
        _committed_offset = {TP(large_topic, 0): 7, TP(large_topic, 1): None}

        def assignment(self):
            return {TP(large_topic, 0), TP(large_topic, 1), TP("other", 0)}

        async def highwaters(self, *partitions):
            return {tp: {0: 10, 1: 2}[tp.partition] for tp in partitions}

    metrics.TIER_IN_FLIGHT.labels("large").set(1)
    try:
        reports = await measure(FakeConsumer(), config, "w1")
    finally:
        metrics.TIER_IN_FLIGHT.labels("large").set(0)
    # (10 - 7) + (2 - 0) waiting or running, one of them running; the small tier has no partitions here.
    assert [(r.tier, r.worker, r.queue, r.in_flight, r.capacity) for r in reports] == [("large", "w1", 4, 1, 1)]
