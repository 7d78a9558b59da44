"""The contextual bandit router core (paper, "Router: contextual bandit with load bias")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from echolm.domain import Example, RetrievedExample
from echolm.policy.bandit import (
    CONTEXT_FEATURES,
    BanditConfig,
    BanditRouter,
    ExampleFeatures,
    RewardWeights,
    TierUtilityModel,
    context_vector,
    reward,
)

TIERS = ("small", "medium", "large")
COSTS = {"small": 1.0, "medium": 1.5, "large": 3.0}
DIM = 16


def test_reward_formula_known_values():
    w = RewardWeights(quality=1.0, cost=0.2, gap=1.0, gap_tolerance=0.1, gap_amplification=4.0)
    assert reward(0.8, 0.5, None, w) == pytest.approx(0.8 - 0.1)
    # gap 0.1 is within tolerance: linear penalty
    assert reward(0.8, 0.5, 0.9, w) == pytest.approx(0.8 - 0.1 - 0.1)
    # gap 0.3: 0.1 at slope 1, then 0.2 at slope 4
    assert reward(0.6, 0.5, 0.9, w) == pytest.approx(0.6 - 0.1 - (0.1 + 4 * 0.2))
    # the best tier itself has no gap
    assert reward(0.9, 1.0, 0.9, w) == pytest.approx(0.9 - 0.2)


def test_context_vector_layout():
    examples = [
        RetrievedExample(Example(1, "t", "p", "r", "m", "large", quality=0.9), similarity=0.8, helpfulness=0.7),
        RetrievedExample(Example(2, "t", "p", "r", "m", "large", quality=None), similarity=0.6, helpfulness=None),
    ]
    features = ExampleFeatures.from_retrieved(examples)
    assert features == ExampleFeatures(2, 0.8, pytest.approx(0.7), pytest.approx(0.65), pytest.approx(0.7))
    embedding = np.arange(DIM, dtype=np.float32) / DIM
    vector = context_vector(embedding, features, DIM, max_count=4)
    assert vector.shape == (DIM + len(CONTEXT_FEATURES),)
    np.testing.assert_array_equal(vector[:DIM], embedding)
    np.testing.assert_allclose(vector[DIM:], [0.5, 0.8, 0.7, 0.65, 0.7], rtol=1e-6)
    assert ExampleFeatures.from_retrieved([]) == ExampleFeatures()
    np.testing.assert_array_equal(context_vector(None, ExampleFeatures(), DIM)[:DIM], np.zeros(DIM))
    with pytest.raises(ValueError):
        context_vector(np.zeros(3), features, DIM)


def _planted_world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Contexts where the small tier (with examples) is good iff the examples are similar and helpful."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    easy = rng.random(n) < 0.5
    sims = np.where(easy, rng.uniform(0.8, 0.95, n), rng.uniform(0.3, 0.6, n))
    helpful = np.where(easy, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
    contexts = np.stack(
        [context_vector(emb[i], ExampleFeatures(5, sims[i], sims[i] - 0.05, helpful[i], 0.9), DIM) for i in range(n)]
    )
    return contexts, easy


def _true_reward(tier: str, easy: bool, rng: np.random.Generator) -> float:
    quality = {"small": 0.95 if easy else 0.2, "medium": 0.9 if easy else 0.5, "large": 0.95}[tier]
    return reward(quality, COSTS[tier] / 3.0, best_quality=0.95) + rng.normal(0, 0.05)


def _best_tier(easy: bool) -> str:
    return "small" if easy else "large"


@pytest.fixture(scope="module")
def trained_router() -> BanditRouter:
    contexts, easy = _planted_world(1500, seed=1)
    rng = np.random.default_rng(2)
    logged = [TIERS[i] for i in rng.integers(0, 3, len(easy))]  # uniform logging policy
    rewards = [_true_reward(t, e, rng) for t, e in zip(logged, easy, strict=True)]
    model = TierUtilityModel(TIERS, contexts.shape[1], hidden=(64, 32), seed=0, learning_rate=1e-2)
    threads = torch.get_num_threads()
    model.fit(contexts, logged, rewards, epochs=60)
    assert torch.get_num_threads() == threads  # fit runs single-threaded, then restores the setting
    config = BanditConfig(TIERS, COSTS, epsilon=0.0, policy="argmax", uniform_std=0.0)
    return BanditRouter(config, model)


def test_learns_planted_signal_well_above_chance(trained_router):
    contexts, easy = _planted_world(400, seed=3)
    rng = np.random.default_rng(4)
    chosen = [trained_router.choose(c, load=0.0, rng=rng).tier for c in contexts]
    accuracy = np.mean([c == _best_tier(e) for c, e in zip(chosen, easy, strict=True)])
    assert accuracy > 0.9  # chance is 1/3
    small_share_easy = np.mean([c == "small" for c, e in zip(chosen, easy, strict=True) if e])
    small_share_hard = np.mean([c == "small" for c, e in zip(chosen, easy, strict=True) if not e])
    assert small_share_easy > 0.9 and small_share_hard < 0.1


def test_high_load_shifts_hard_requests_to_cheaper_tiers(trained_router):
    contexts, easy = _planted_world(200, seed=5)
    hard = contexts[~easy]
    # lambda0 large enough that the bias outweighs the learned quality gap of hard requests
    config = BanditConfig(TIERS, COSTS, epsilon=0.0, policy="argmax", uniform_std=0.0, lambda0=3.0)
    router = BanditRouter(config, trained_router.model)
    rng = np.random.default_rng(6)
    idle = [router.choose(c, load=0.5, rng=rng) for c in hard]
    busy = [router.choose(c, load=5.0, rng=rng) for c in hard]
    assert all(c.bias == 0.0 for c in idle) and all(c.bias > 2.9 for c in busy)
    assert np.mean([c.tier == "large" for c in idle]) > 0.9
    mean_cost = lambda choices: np.mean([COSTS[c.tier] for c in choices])  # noqa: E731
    assert mean_cost(busy) < mean_cost(idle)
    for before, after in zip(idle, busy, strict=True):
        assert after.probabilities["large"] <= before.probabilities["large"]


def test_exploration_rate_is_respected(trained_router):
    config = BanditConfig(TIERS, COSTS, epsilon=0.2, policy="argmax", uniform_std=0.0)
    router = BanditRouter(config, trained_router.model)
    context = _planted_world(1, seed=7)[0][0]
    rng = np.random.default_rng(8)
    choices = [router.choose(context, load=0.0, rng=rng) for _ in range(4000)]
    explored = [c for c in choices if c.explore]
    assert abs(len(explored) / len(choices) - 0.2) < 0.025
    counts = {t: sum(c.tier == t for c in explored) for t in TIERS}
    assert min(counts.values()) > 0.25 * len(explored)  # exploration covers every arm
    # by default, no exploration while the load bias is active
    under_load = [router.choose(context, load=5.0, rng=rng) for _ in range(500)]
    assert not any(c.explore for c in under_load)


def test_selective_feedback_uses_thompson_sampling_for_second_arm(trained_router):
    config = BanditConfig(TIERS, COSTS, epsilon=0.0, uniform_std=10.0)  # every request looks uniform
    router = BanditRouter(config, trained_router.model)
    for _ in range(30):
        router.record_comparison("medium", "large", 1.0)
        router.record_comparison("small", "medium", 0.0)
    context = _planted_world(1, seed=9)[0][0]
    rng = np.random.default_rng(10)
    choices = [router.choose(context, load=0.0, rng=rng) for _ in range(200)]
    tops = {c.tier for c in choices}
    assert len(tops) == 1  # the top arm is served, never sampled
    assert all(c.compare_with is not None and c.compare_with != c.tier for c in choices)
    if tops != {"medium"}:
        share_medium = np.mean([c.compare_with == "medium" for c in choices])
        assert share_medium > 0.9  # medium won its comparisons: its Beta dominates
    with pytest.raises(ValueError):
        router.record_comparison("small", "large", 1.5)


def test_online_updates_move_the_served_tier_utility():
    model = TierUtilityModel(TIERS, DIM + 5, hidden=(32,), seed=1, online_learning_rate=0.05)
    context = _planted_world(1, seed=11)[0]
    before = model.utilities(context[0])
    for _ in range(200):
        model.partial_fit(context, ["small"], [1.0])
    after = model.utilities(context[0])
    assert abs(after["small"] - 1.0) < 0.05
    assert abs(after["small"] - 1.0) < abs(before["small"] - 1.0)
    with pytest.raises(ValueError):
        model.partial_fit(context, ["huge"], [1.0])


def test_state_round_trip_is_json_safe_and_exact(trained_router):
    config = BanditConfig(TIERS, COSTS, epsilon=0.1, uniform_std=0.05)
    router = BanditRouter(config, TierUtilityModel.from_state_dict(trained_router.model.state_dict()))
    router.record_comparison("small", "large", 0.5)
    restored = BanditRouter.from_state_dict(json.loads(json.dumps(router.state_dict())))
    contexts, easy = _planted_world(50, seed=12)
    np.testing.assert_array_equal(router.model.predict(contexts), restored.model.predict(contexts))
    rng_a, rng_b = np.random.default_rng(13), np.random.default_rng(13)
    for c in contexts:
        assert router.choose(c, 1.5, rng_a) == restored.choose(c, 1.5, rng_b)
    # online learning continues identically after a restore (SGD keeps no optimizer state)
    router.observe(contexts[:10], ["small"] * 10, [0.3] * 10)
    restored.observe(contexts[:10], ["small"] * 10, [0.3] * 10)
    np.testing.assert_array_equal(router.model.predict(contexts), restored.model.predict(contexts))


def test_default_model_size_matches_the_paper_scale():
    model = TierUtilityModel(TIERS, 384 + len(CONTEXT_FEATURES))
    assert 50_000 < model.n_parameters <= 500_000


def test_config_validation():
    with pytest.raises(ValueError):
        BanditConfig(("a", "b"), {"a": 1.0})
    with pytest.raises(ValueError):
        BanditConfig(("a",), {"a": 1.0}, epsilon=1.5)
    with pytest.raises(ValueError):
        BanditRouter(BanditConfig(("a", "b"), {"a": 1.0, "b": 2.0}), TierUtilityModel(("b", "a"), 4))
