"""Stage 2 of retrieval: a learned helpfulness proxy (paper, "Stage 2: helpfulness proxy").

The paper's proxy is a TinyBERT-sized model over (request, example) text. Ours reads the embeddings that
stage 1 already computed, so scoring costs microseconds: for request vector ``r`` and the example's
request vector ``e`` the features are ``[r, e, r * e, |r - e|, cos(r, e), quality, has_quality,
log1p(response_chars) / 10]``, standardised and fed to a scikit-learn ``LogisticRegression``. The
embedding block is down-weighted to the weight of one feature (a stronger prior), so that with few
labels the proxy leans on the scalar features and learns finer interactions only as labels
accumulate. The label is whether the example helped (a like, a won pairwise comparison, an autorater
verdict) on a request that was served with it. Output: the probability that the example helps, in [0, 1].

Cold start (too few labels, or one class only): the score is the similarity clipped to [0, 1], the
paper's stage 1 signal. The state persists as plain lists (``state_dict``), never pickle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class HelpfulnessPair:
    """A (request, candidate example) pair. Vectors are L2-normalised embeddings of the two requests."""

    request_vec: np.ndarray
    example_vec: np.ndarray
    example_quality: float | None = None
    response_chars: int = 0
    similarity: float | None = None


def pair_features(pairs: Sequence[HelpfulnessPair]) -> np.ndarray:
    """Feature matrix, shape (len(pairs), 4 * dim + 4) (module docstring lists the columns)."""
    if not pairs:
        raise ValueError("no pairs to featurise")
    r = np.stack([np.asarray(p.request_vec, np.float32) for p in pairs])
    e = np.stack([np.asarray(p.example_vec, np.float32) for p in pairs])
    sim = np.array(
        [p.similarity if p.similarity is not None else float(np.dot(r[i], e[i])) for i, p in enumerate(pairs)],
        dtype=np.float32,
    )
    quality = np.array([p.example_quality if p.example_quality is not None else 0.5 for p in pairs], np.float32)
    has_quality = np.array([p.example_quality is not None for p in pairs], np.float32)
    length = np.array([math.log1p(max(0, p.response_chars)) / 10.0 for p in pairs], np.float32)
    scalars = np.stack([sim, quality, has_quality, length], axis=1)
    return np.concatenate([r, e, r * e, np.abs(r - e), scalars], axis=1)


class HelpfulnessModel:
    """Scores (request, example) pairs for helpfulness; falls back to similarity until trained."""

    def __init__(self, dim: int, *, min_samples: int = 20, regularisation: float = 1.0, seed: int = 0) -> None:
        self.dim = dim
        self.min_samples = min_samples
        self.regularisation = regularisation
        self.seed = seed
        self.n_train = 0
        self._scaler: StandardScaler | None = None
        self._classifier: LogisticRegression | None = None

    @property
    def fitted(self) -> bool:
        return self._classifier is not None

    def fit(self, pairs: Sequence[HelpfulnessPair], labels: Sequence[bool | int | float]) -> bool:
        """Train from scratch on labelled pairs (labels >= 0.5 count as helpful). Returns whether the model
        is now learned; with fewer than ``min_samples`` labels or a single class it stays at cold start."""
        if len(pairs) != len(labels):
            raise ValueError(f"{len(pairs)} pairs but {len(labels)} labels")
        y = (np.asarray(labels, dtype=np.float64) >= 0.5).astype(int)
        if len(y) < self.min_samples or len(np.unique(y)) < 2:
            return self.fitted
        x = self._checked_features(pairs)
        scaler = StandardScaler().fit(x)
        # Why: standardised, the 4 * dim embedding columns drown the four scalar ones (similarity, quality,
        # length) and a fit on a few hundred labels memorises example identities. Shrinking the embedding
        # block to the weight of one feature is a stronger prior on it; the data term grows with the
        # labels and outweighs that prior as they accumulate. Stored in the scaler: states stay compatible.
        scaler.scale_[: 4 * self.dim] *= math.sqrt(4 * self.dim)
        classifier = LogisticRegression(
            C=self.regularisation, max_iter=2000, class_weight="balanced", random_state=self.seed
        ).fit(scaler.transform(x), y)
        self._scaler, self._classifier, self.n_train = scaler, classifier, len(y)
        return True

    def score(self, pairs: Sequence[HelpfulnessPair]) -> np.ndarray:
        """Helpfulness in [0, 1] for each pair (similarity clipped to [0, 1] at cold start)."""
        if not pairs:
            return np.zeros(0)
        x = self._checked_features(pairs)
        if self._classifier is None or self._scaler is None:
            return np.clip(x[:, 4 * self.dim], 0.0, 1.0)
        return self._classifier.predict_proba(self._scaler.transform(x))[:, 1]

    def _checked_features(self, pairs: Sequence[HelpfulnessPair]) -> np.ndarray:
        x = pair_features(pairs).astype(np.float64)
        if x.shape[1] != 4 * self.dim + 4:
            raise ValueError(f"pairs have {(x.shape[1] - 4) // 4}-d vectors, model expects {self.dim}")
        return x

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "dim": self.dim,
            "min_samples": self.min_samples,
            "regularisation": self.regularisation,
            "seed": self.seed,
            "n_train": self.n_train,
            "fitted": self.fitted,
        }
        if self._classifier is not None and self._scaler is not None:
            state["scaler_mean"] = self._scaler.mean_.tolist()
            state["scaler_scale"] = self._scaler.scale_.tolist()
            state["coef"] = self._classifier.coef_.ravel().tolist()
            state["intercept"] = float(self._classifier.intercept_[0])
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> HelpfulnessModel:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported helpfulness state version {state.get('version')}")
        model = cls(
            state["dim"], min_samples=state["min_samples"], regularisation=state["regularisation"], seed=state["seed"]
        )
        model.n_train = int(state["n_train"])
        if state["fitted"]:
            width = 4 * model.dim + 4
            scaler = StandardScaler()
            scaler.mean_ = np.asarray(state["scaler_mean"], np.float64)
            scaler.scale_ = np.asarray(state["scaler_scale"], np.float64)
            scaler.var_ = scaler.scale_**2
            scaler.n_features_in_ = width
            classifier = LogisticRegression(C=model.regularisation)
            classifier.coef_ = np.asarray(state["coef"], np.float64)[None, :]
            classifier.intercept_ = np.array([state["intercept"]], np.float64)
            classifier.classes_ = np.array([0, 1])
            classifier.n_features_in_ = width
            model._scaler, model._classifier = scaler, classifier
        return model


def holdout_aucs(dim: int, pairs: Sequence[HelpfulnessPair], labels: Sequence[int | bool], groups: Sequence[int], *,
                 min_samples: int = 20, regularisation: float = 1.0) -> tuple[float | None, float | None]:
    """(trained proxy, similarity) ROC AUC on the same held-out 20% of requests.

    Held out by ``groups`` (one per served request), so the pairs of one request stay together; the
    split is a fixed hash of the group, so repeated fits agree. ``(None, None)`` when the held-out part
    is too small (under 5 pairs, or one outcome only) or the training part cannot be fitted.
    """
    from sklearn.metrics import roc_auc_score

    held = {g for g in set(groups) if (g * 2654435761) % 5 == 0}
    train = [i for i, g in enumerate(groups) if g not in held]
    test = [i for i, g in enumerate(groups) if g in held]
    test_labels = [int(bool(labels[i])) for i in test]
    if len(test) < 5 or len(set(test_labels)) < 2:
        return None, None
    model = HelpfulnessModel(dim, min_samples=min_samples, regularisation=regularisation)
    if not model.fit([pairs[i] for i in train], [labels[i] for i in train]):
        return None, None
    held_pairs = [pairs[i] for i in test]
    similarity = pair_features(held_pairs)[:, 4 * dim]
    return (float(roc_auc_score(test_labels, model.score(held_pairs))),
            float(roc_auc_score(test_labels, similarity)))


def trained_beats_similarity(trained_auc: float | None, similarity_auc: float | None) -> bool:
    """Whether a trained proxy should replace similarity: only when it ranked held-out outcomes better.

    Why: with few labels a proxy can be worse than the cold-start rule, and stage 2 must never make
    selection worse than stage 1 alone."""
    return trained_auc is not None and similarity_auc is not None and trained_auc > similarity_auc
