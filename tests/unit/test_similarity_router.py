import pytest

from echolm.domain import Example, RetrievedExample
from echolm.protocols import RoutingContext
from echolm.routing import FixedTierRouter, SimilarityRouter, make_router
from echolm.settings import Settings, TierSettings

SMALL = TierSettings(name="small", model="s", relative_cost=1.0, use_examples=True)
MEDIUM = TierSettings(name="medium", model="m", relative_cost=2.0, use_examples=True)
LARGE = TierSettings(name="large", model="l", relative_cost=5.0, use_examples=False)


def context(*similarities: float) -> RoutingContext:
    examples = [RetrievedExample(Example(id=i, tenant="t", prompt="p", response="r", model="m", tier="large"), s)
                for i, s in enumerate(similarities)]
    return RoutingContext(request_id="req", tenant="t", prompt_chars=10, examples=examples)


def router(min_examples: int = 1, min_similarity: float = 0.8, tiers=(LARGE, SMALL)) -> SimilarityRouter:
    return SimilarityRouter(list(tiers), min_examples=min_examples, min_similarity=min_similarity)


def test_an_example_exactly_at_the_threshold_offloads_with_examples():
    decision = router().route(context(0.8, 0.3))
    assert (decision.tier, decision.use_examples) == ("small", True)
    assert decision.score == pytest.approx(0.8)
    assert decision.scores == {"small": pytest.approx(0.8), "large": pytest.approx(0.8)}
    assert "offload" in decision.reason


def test_just_below_the_threshold_goes_to_the_large_tier_without_examples():
    decision = router().route(context(0.7999, 0.5))
    assert (decision.tier, decision.use_examples) == ("large", False)
    assert decision.score == pytest.approx(0.7999)
    assert decision.scores["small"] < decision.scores["large"]


def test_no_examples_goes_large():
    decision = router().route(context())
    assert (decision.tier, decision.use_examples, decision.score) == ("large", False, 0.0)
    assert decision.scores["small"] == -1.0


def test_the_number_of_close_examples_must_reach_the_minimum():
    two_needed = router(min_examples=2)
    assert two_needed.route(context(0.95, 0.79)).tier == "large"
    decision = two_needed.route(context(0.95, 0.85, 0.2))
    assert decision.tier == "small" and decision.scores["small"] == pytest.approx(0.85)
    assert decision.score == pytest.approx(0.95)


def test_zero_examples_needed_always_offloads():
    decision = router(min_examples=0).route(context())
    assert (decision.tier, decision.use_examples) == ("small", True)


def test_offloads_to_the_cheapest_tier_that_takes_examples():
    no_examples_small = TierSettings(name="tiny", model="t", relative_cost=0.5, use_examples=False)
    decision = router(tiers=(MEDIUM, LARGE, no_examples_small, SMALL)).route(context(0.9))
    assert decision.tier == "small"
    only_large_takes_none = router(tiers=(no_examples_small, LARGE))
    decision = only_large_takes_none.route(context(0.99))
    assert (decision.tier, decision.use_examples) == ("large", False)


def test_fixed_tier_router_ignores_examples():
    decision = FixedTierRouter("small", use_examples=True).route(context(0.1))
    assert (decision.tier, decision.use_examples) == ("small", True)
    assert decision.score == pytest.approx(0.1) and "fixed" in decision.reason


@pytest.mark.parametrize(("policy", "tier", "use_examples"), [
    ("always-large", "large", False),
    ("always-small", "small", True),
])
def test_make_router_builds_the_fixed_baselines(policy, tier, use_examples):
    settings = Settings(router_policy=policy, tiers=[SMALL, MEDIUM, LARGE], admit_from_tiers=["large"])
    decision = make_router(settings).route(context(0.99))
    assert (decision.tier, decision.use_examples) == (tier, use_examples)


def test_make_router_builds_the_similarity_policy_from_settings():
    settings = Settings(router_policy="similarity", offload_min_examples=2, offload_min_similarity=0.6,
                        tiers=[SMALL, LARGE], admit_from_tiers=["large"])
    built = make_router(settings)
    assert isinstance(built, SimilarityRouter)
    assert built.route(context(0.7, 0.65)).tier == "small"
    assert built.route(context(0.7, 0.55)).tier == "large"
