"""The route decision's context, logged at routing time: what the bandit router puts in it, how it travels
(route stage -> generate -> log, wire records old and new), its JSON mapping for the history, and how
the learners prefer it to a rebuilt context (and fall back for rows logged without one)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from echolm.domain import (
    ROUTE_CONTEXT_VERSION,
    Example,
    ExampleFeatures,
    RetrievedExample,
    RouteContext,
    RoutedExample,
)
from echolm.generation.echo import EchoGenerator
from echolm.history.feedback_store import GenerationTiming, LoggedRequest
from echolm.learning import RoutingInputs, relative_costs, routing_inputs
from echolm.policy.bandit import context_vector
from echolm.protocols import RoutingContext
from echolm.routing.bandit_router import LoadAwareBanditRouter, RouterState, new_state
from echolm.routing.costs import cost_model_from_rates, fit_token_rates
from echolm.routing.route_context import describe_route, route_context_from_json, route_context_to_json
from echolm.routing.similarity import SimilarityRouter
from echolm.selection import hint_chars
from echolm.settings import Settings, TierSettings
from echolm.testing import InMemoryHistoryStore
from streams.records import ExampleRef, InFlightRequest, Message, RequestRecord, ResponseRecord, encode_vector
from streams.stages import GenerateStage, LogStage, RouteStage, to_response_log

DIM = 8
TIERS = [TierSettings(name="small", backend="echo", model="s", relative_cost=1.0, use_examples=True),
         TierSettings(name="large", backend="echo", model="l", relative_cost=3.0, use_examples=False)]
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def settings(**bandit) -> Settings:
    values = {"epsilon": 0.0, "policy": "argmax", "compare_rate": 0.0, "seed": 1, **bandit}
    return Settings(tiers=TIERS, bandit=values, kafka_bootstrap="unused:1", router_policy="bandit")


def unit(index: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[index]


def hit(example_id: int, similarity: float, helpfulness: float | None, quality: float | None) -> RetrievedExample:
    return RetrievedExample(Example(example_id, "t", f"question {example_id}", "an answer", "m", "large", quality),
                            similarity, helpfulness)


EXAMPLES = [hit(3, 0.92, 0.8, 0.9), hit(5, 0.81, None, None)]


@pytest.fixture(scope="module")
def state() -> RouterState:
    """Small is worth it along axis 0, not along axis 1."""
    config = settings()
    state = new_state(config, DIM, seed=0)
    features = ExampleFeatures.from_retrieved(EXAMPLES)
    contexts, tiers, rewards = [], [], []
    for axis, small_reward in ((0, 0.8), (1, 0.1)):
        x = context_vector(unit(axis), features, DIM)
        contexts += [x] * 20 + [x] * 20
        tiers += ["small"] * 20 + ["large"] * 20
        rewards += [small_reward] * 20 + [0.5] * 20
    state.bandit.model.fit(np.stack(contexts), tiers, rewards, epochs=60)
    return state


def routing_context(axis: int, load: dict[str, float] | None = None) -> RoutingContext:
    return RoutingContext("r1", "t", 40, EXAMPLES, unit(axis), load or {})


# ------------------------------------------------------------------ what the router logs


def test_a_bandit_decision_carries_the_scores_load_and_features_it_was_made_from(state):
    router = LoadAwareBanditRouter(settings(load_threshold=1.0), state)
    router.apply_state(state, version=7)
    decision = router.route(routing_context(1, load={"large": 3.0, "small": 0.2}))
    logged = decision.context
    assert logged is not None and logged.version == ROUTE_CONTEXT_VERSION
    assert (logged.policy, logged.policy_version, logged.tier, logged.explore) == ("bandit", 7, decision.tier, False)
    assert logged.scores == decision.scores and set(logged.utilities) == set(logged.costs) == {"small", "large"}
    # S_i = mu_i - bias * C_i, with the bias of the load read for the load tier.
    assert (logged.load_tier, logged.load, logged.load_threshold) == ("large", 3.0, 1.0)
    assert logged.loads == {"large": 3.0, "small": 0.2} and logged.bias > 0
    for tier in ("small", "large"):
        assert logged.scores[tier] == pytest.approx(logged.utilities[tier] - logged.bias * logged.costs[tier])
    assert logged.costs == router.costs_for(routing_context(1))
    assert logged.features == ExampleFeatures.from_retrieved(EXAMPLES)
    assert logged.examples == (RoutedExample(3, 0.92, 0.8, 0.9), RoutedExample(5, 0.81, None, None))
    assert logged.prompt_chars == 40 and logged.example_chars == sum(hint_chars(e) for e in EXAMPLES)


def test_exploration_and_the_load_source_are_logged(state):
    loads = {"large": 0.4}
    router = LoadAwareBanditRouter(settings(epsilon=1.0), state, loads=lambda: loads)
    logged = router.route(routing_context(0)).context
    assert logged is not None and logged.explore and logged.policy_version is None
    assert logged.loads == {"large": 0.4} and logged.load == 0.4 and logged.bias == 0.0


def test_cold_start_logs_what_the_similarity_rule_saw(state):
    router = LoadAwareBanditRouter(settings(), loads=lambda: {"large": 1.5})
    decision = router.route(routing_context(0))
    logged = decision.context
    assert logged is not None and logged.policy == "bandit-cold-start" and logged.tier == decision.tier
    assert logged.utilities == {} and logged.scores == decision.scores and logged.loads == {"large": 1.5}
    assert logged.features.count == 2


def test_routers_without_a_context_get_the_inputs_every_router_sees():
    decision = SimilarityRouter.from_settings(settings()).route(routing_context(0))
    logged = describe_route(routing_context(0), decision, "similarity")
    assert decision.context is None and logged.policy == "similarity" and logged.tier == decision.tier
    assert logged.scores == decision.scores and logged.features == ExampleFeatures.from_retrieved(EXAMPLES)
    assert logged.utilities == {} and logged.load is None and logged.policy_version is None


# ------------------------------------------------------------------ on the wire and into the history


def in_flight(axis: int) -> InFlightRequest:
    refs = [ExampleRef(id=e.example.id, similarity=e.similarity, prompt=e.example.prompt, response=e.example.response,
                       model="m", helpfulness=e.helpfulness, quality=e.example.quality) for e in EXAMPLES]
    return InFlightRequest(request=RequestRecord(request_id=f"r{axis}", messages=[Message(role="user", content="hi")]),
                           embedding_b64=encode_vector(unit(axis)), examples=refs)


async def test_the_context_travels_from_the_route_stage_to_the_history(state):
    config = settings()
    router = LoadAwareBanditRouter(config, state)
    router.apply_state(state, version=3)
    [routed] = await RouteStage(config, router).process([in_flight(0)])
    record = InFlightRequest.model_validate_json(routed.value)
    assert record.route is not None and record.route.context is not None
    assert record.route.context.policy_version == 3 and record.route.context.features.count == 2
    # The source quality crossed the wire with the examples: the router saw 0.9 and a neutral 0.5.
    assert record.route.context.features.mean_source_quality == pytest.approx(0.7)

    tier = config.tier(record.route.tier)
    [answered] = await GenerateStage(config, tier, EchoGenerator(tier.model)).process([record])
    response = ResponseRecord.model_validate_json(answered.value)
    history = InMemoryHistoryStore()
    await LogStage(config, history).process([response])
    [row] = await history.responses_for([response.request_id])
    assert row.route_context == record.route.context


async def test_the_similarity_policy_logs_a_context_too():
    config = Settings(tiers=TIERS, kafka_bootstrap="unused:1", offload_min_similarity=0.8)
    [routed] = await RouteStage(config, SimilarityRouter.from_settings(config)).process([in_flight(0)])
    context = InFlightRequest.model_validate_json(routed.value).route.context
    assert context is not None and context.policy == "similarity" and context.examples[0].id == 3


def test_records_written_before_the_context_existed_still_decode():
    old_in_flight = {"v": 1, "request": {"v": 1, "request_id": "old", "messages": [{"role": "user", "content": "hi"}]},
                     "examples": [{"id": 1, "similarity": 0.9, "prompt": "p", "response": "r", "model": "m"}],
                     "route": {"tier": "small", "score": 0.9, "reason": "old", "use_examples": True}, "timings": {}}
    record = InFlightRequest.model_validate_json(json.dumps(old_in_flight))
    assert record.route.context is None and record.examples[0].quality is None
    old_response = {"v": 1, "request_id": "old", "tenant": "default", "custom_id": None, "messages": [],
                    "route": old_in_flight["route"], "submitted_at": 1.0}
    assert to_response_log(ResponseRecord.model_validate_json(json.dumps(old_response))).route_context is None


def test_history_json_round_trips_and_unreadable_contexts_read_as_absent():
    logged = RouteContext(policy="bandit", tier="small", policy_version=2, explore=True,
                          utilities={"small": np.float32(0.25), "large": 0.5}, scores={"small": 0.25, "large": 0.1},
                          costs={"small": 1.0, "large": 3.0}, loads={"large": 2.0}, load_tier="large", load=2.0,
                          load_threshold=1.0, bias=0.13, prompt_chars=40, example_chars=120,
                          examples=(RoutedExample(3, 0.9, None, 0.8),), features=ExampleFeatures(1, 0.9, 0.9, 0.9, 0.8))
    stored = route_context_to_json(logged)
    assert json.loads(json.dumps(stored)) == stored  # plain JSON types only
    assert route_context_from_json(json.loads(json.dumps(stored))) == logged
    assert route_context_to_json(None) is None and route_context_from_json(None) is None
    assert route_context_from_json({**stored, "version": ROUTE_CONTEXT_VERSION + 1}) is None, "a newer meaning"
    assert route_context_from_json({**stored, "features": "garbled"}) is None


# ------------------------------------------------------------------ the learners prefer it


def logged_request(request_id: str, context: RouteContext | None, prompt: str = "a question") -> LoggedRequest:
    return LoggedRequest(request_id, "t", prompt, "small", (), (), {}, 10, 5, "r", T0, T0 + timedelta(seconds=1),
                         route_context=context)


def test_logged_inputs_are_used_as_logged_and_older_rows_are_rebuilt():
    context = RouteContext(policy="bandit", tier="small", loads={"large": 4.0, "small": 0.1}, load_tier="large",
                           load=2.5, prompt_chars=300, example_chars=900, features=ExampleFeatures(3, 0.9, 0.8, 0.7, 0.6))
    logged = RoutingInputs.from_logged(logged_request("new", context), "large")
    assert logged == RoutingInputs(ExampleFeatures(3, 0.9, 0.8, 0.7, 0.6), 300, 900, 2.5, logged=True)
    # A context without L (a similarity decision) still names the loads it read.
    assert RoutingInputs.from_logged(logged_request("sim", replace(context, load=None)), "large").load == 4.0
    old = logged_request("old", None, prompt="x" * 50)
    assert RoutingInputs.from_logged(old, "large") is None
    rebuilt = RoutingInputs.rebuilt(old, EXAMPLES)
    assert rebuilt == RoutingInputs(ExampleFeatures.from_retrieved(EXAMPLES), 50,
                                    sum(hint_chars(e) for e in EXAMPLES), None, logged=False)


async def test_routing_inputs_read_logged_contexts_without_rebuilding_anything():
    config = settings()
    contexts = [RouteContext(policy="bandit", tier="small", prompt_chars=10 * i, features=ExampleFeatures(i))
                for i in range(1, 4)]
    requests = [logged_request(f"r{i}", c) for i, c in enumerate(contexts)]
    # No store and no model store: nothing needs rebuilding, so neither is touched.
    inputs = await routing_inputs(None, None, config, requests, np.zeros((3, DIM), np.float32))  # type: ignore[arg-type]
    assert [i.features.count for i in inputs] == [1, 2, 3] and all(i.logged for i in inputs)


def test_reward_costs_use_the_sizes_the_router_costed(state):
    config = settings()
    state = RouterState.from_dict(state.to_dict())
    timings = [(50, 20), (400, 20), (100, 80), (900, 60), (30, 10)]
    state.costs = cost_model_from_rates({"small": 1.0, "large": 3.0}, {
        tier: fit_token_rates([GenerationTiming(tier, p, c, scale * (0.001 * p + 0.02 * c)) for p, c in timings])
        for tier, scale in (("small", 1.0), ("large", 3.0))})
    small_prompt = RoutingInputs(ExampleFeatures(), 40, 0)
    with_examples = RoutingInputs(ExampleFeatures(), 40, 4000)
    plain, hinted = relative_costs(state, config, small_prompt), relative_costs(state, config, with_examples)
    assert hinted["large"] < plain["large"], "examples add prefill only on the tier that takes them"
    assert plain == LoadAwareBanditRouter(config, state).costs_for(RoutingContext("r", "t", 40, []))
