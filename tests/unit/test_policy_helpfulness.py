"""Stage 2 helpfulness proxy (paper, "Stage 2: helpfulness proxy")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from echolm.policy.helpfulness import (
    HelpfulnessModel,
    HelpfulnessPair,
    holdout_aucs,
    pair_features,
    trained_beats_similarity,
)

DIM = 16


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _pairs(n: int, seed: int) -> tuple[list[HelpfulnessPair], np.ndarray]:
    """All candidates are fairly similar (as stage 1 returns them); an example helps iff its quality is high."""
    rng = np.random.default_rng(seed)
    pairs, labels = [], []
    for _ in range(n):
        request = _unit(rng.normal(size=DIM))
        example = _unit(request + rng.uniform(0.2, 0.9) * _unit(rng.normal(size=DIM)))
        quality = float(rng.uniform(0.0, 1.0))
        pairs.append(HelpfulnessPair(request, example, quality, int(rng.integers(50, 2000))))
        labels.append(quality > 0.5)
    return pairs, np.array(labels)


def test_learns_a_signal_that_similarity_misses():
    train, train_labels = _pairs(400, seed=1)
    test, test_labels = _pairs(300, seed=2)
    model = HelpfulnessModel(DIM)
    assert model.fit(train, train_labels)
    learned = roc_auc_score(test_labels, model.score(test))
    similarity = roc_auc_score(test_labels, [float(np.dot(p.request_vec, p.example_vec)) for p in test])
    assert learned > 0.9
    assert abs(similarity - 0.5) < 0.1  # similarity alone carries no signal here


def test_cold_start_falls_back_to_similarity():
    pairs, labels = _pairs(30, seed=3)
    model = HelpfulnessModel(DIM, min_samples=50)
    assert not model.fit(pairs, labels)  # too few labels
    expected = np.clip([float(np.dot(p.request_vec, p.example_vec)) for p in pairs], 0.0, 1.0)
    np.testing.assert_allclose(model.score(pairs), expected, rtol=1e-5)
    one_class = HelpfulnessModel(DIM, min_samples=5)
    assert not one_class.fit(pairs, [True] * len(pairs))  # a single class teaches nothing
    given = HelpfulnessPair(pairs[0].request_vec, pairs[0].example_vec, similarity=-0.2)
    assert model.score([given])[0] == 0.0
    assert model.score([]).shape == (0,)


def test_state_round_trip_gives_identical_scores():
    train, labels = _pairs(200, seed=4)
    model = HelpfulnessModel(DIM)
    model.fit(train, labels)
    restored = HelpfulnessModel.from_state_dict(json.loads(json.dumps(model.state_dict())))
    test, _ = _pairs(50, seed=5)
    assert restored.fitted and restored.n_train == 200
    np.testing.assert_array_equal(restored.score(test), model.score(test))
    cold = HelpfulnessModel.from_state_dict(json.loads(json.dumps(HelpfulnessModel(DIM).state_dict())))
    assert not cold.fitted


def test_feature_layout_and_validation():
    pairs, _ = _pairs(3, seed=6)
    features = pair_features(pairs)
    assert features.shape == (3, 4 * DIM + 4)
    r, e = pairs[0].request_vec, pairs[0].example_vec
    np.testing.assert_allclose(features[0, 2 * DIM : 3 * DIM], r * e, rtol=1e-6)
    np.testing.assert_allclose(features[0, 4 * DIM], float(np.dot(r, e)), rtol=1e-5)
    with pytest.raises(ValueError):
        HelpfulnessModel(DIM + 1).score(pairs)
    with pytest.raises(ValueError):
        HelpfulnessModel(DIM).fit(pairs, [True])


def test_holdout_comparison_prefers_the_proxy_only_where_it_ranks_outcomes_better():
    pairs, labels = _pairs(400, seed=4)
    groups = list(range(len(pairs)))
    trained, similarity = holdout_aucs(DIM, pairs, labels, groups)
    assert trained is not None and similarity is not None
    assert trained > 0.9 and abs(similarity - 0.5) < 0.15
    assert trained_beats_similarity(trained, similarity)

    # Where similarity carries the signal and labels are few, the proxy must at least match it to replace it.
    assert not trained_beats_similarity(0.70, 0.75)
    assert not trained_beats_similarity(None, 0.75)
    assert not trained_beats_similarity(0.9, None)


def test_holdout_comparison_needs_both_outcomes_held_out():
    pairs, _ = _pairs(40, seed=5)
    assert holdout_aucs(DIM, pairs, [True] * len(pairs), list(range(len(pairs)))) == (None, None)
