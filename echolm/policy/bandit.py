"""The router's core: a contextual bandit over N model tiers (paper, "Router: contextual bandit with load bias").

* Context (``context_vector``): the request embedding followed by features of its selected examples:
  count, max and mean similarity, mean helpfulness and mean source quality.
* ``TierUtilityModel``: a small torch MLP (~0.13M parameters at 384-d embeddings; the paper says about
  0.5M) mapping a context to one utility ``mu_i`` per tier. Only the served tier's reward is observed, so
  the loss is the squared error of that tier's output alone. ``fit`` bootstraps it offline (Adam);
  ``partial_fit`` adapts it online with plain SGD, which keeps no optimizer state, so a restored model
  continues exactly as the original would.
* ``reward``: the training target (formula in its docstring).
* ``BanditRouter.choose``: utilities -> load-biased scores ``S_i`` -> ``P = softmax(S / T)``; epsilon-greedy
  exploration; selective feedback (paper: when the scores are nearly uniform, std < 0.1, serve the top arm
  and pick a second by Thompson sampling from a Beta per arm, to collect a pairwise preference).

Everything persists as JSON-safe dicts (``state_dict``), never pickle.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from echolm.domain import ExampleFeatures  # re-exported: defined with the other domain values
from echolm.policy.load_bias import biased_scores, load_bias, softmax

CONTEXT_FEATURES = ("count", "max_similarity", "mean_similarity", "mean_helpfulness", "mean_source_quality")
STATE_VERSION = 1


def context_vector(
    embedding: np.ndarray | None, features: ExampleFeatures, embedding_dim: int, max_count: int = 5
) -> np.ndarray:
    """``[embedding (zeros if None), count / max_count, max_sim, mean_sim, mean_helpfulness, mean_quality]``."""
    emb = np.zeros(embedding_dim, dtype=np.float32) if embedding is None else np.asarray(embedding, np.float32)
    if emb.shape != (embedding_dim,):
        raise ValueError(f"embedding has shape {emb.shape}, expected ({embedding_dim},)")
    tail = np.array(
        [
            min(features.count, max_count) / max_count,
            features.max_similarity,
            features.mean_similarity,
            features.mean_helpfulness,
            features.mean_source_quality,
        ],
        dtype=np.float32,
    )
    return np.concatenate([emb, tail])


@dataclass(frozen=True, slots=True)
class RewardWeights:
    quality: float = 1.0
    cost: float = 0.2
    gap: float = 1.0
    gap_tolerance: float = 0.1
    gap_amplification: float = 4.0


def reward(
    quality: float, relative_cost: float, best_quality: float | None = None, weights: RewardWeights = RewardWeights()
) -> float:
    """The bandit's reward for serving one request on one tier (paper: "reward = weighted quality minus
    weighted relative cost, with an amplified penalty when the quality gap is large").

    ``r = w_q * q - w_c * c - w_g * penalty(gap)``, with

    * ``q`` the response quality normalised to [0, 1] (judge score (s + 3) / 6, a verifier's pass, a like);
    * ``c = C_i / max_j C_j`` in (0, 1], the tier's cost relative to the costliest tier;
    * ``gap = max(0, q_best - q)``, where ``q_best`` is the best quality any tier reached on this request
      (for example the large tier's reference answer); 0 when unknown;
    * ``penalty(gap) = gap`` up to ``gap_tolerance`` and ``tolerance + amplification * (gap - tolerance)``
      beyond it: continuous, with the slope multiplied by ``gap_amplification`` once the gap is large, so a
      cheap but clearly worse answer is not worth its savings.
    """
    gap = 0.0 if best_quality is None else max(0.0, best_quality - quality)
    tol = weights.gap_tolerance
    penalty = gap if gap <= tol else tol + weights.gap_amplification * (gap - tol)
    return weights.quality * quality - weights.cost * relative_cost - weights.gap * penalty


class TierUtilityModel:
    """MLP context -> per-tier utility ``mu_i``, trained on (context, served tier, reward) triples."""

    def __init__(
        self,
        tiers: Sequence[str],
        input_dim: int,
        hidden: Sequence[int] = (256, 128),
        *,
        seed: int = 0,
        learning_rate: float = 3e-3,
        online_learning_rate: float = 0.02,
        weight_decay: float = 1e-4,
    ) -> None:
        if len(set(tiers)) != len(tiers) or not tiers:
            raise ValueError(f"tiers must be unique and non-empty, got {list(tiers)}")
        self.tiers = tuple(tiers)
        self.input_dim = int(input_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.seed = seed
        self.learning_rate = learning_rate
        self.online_learning_rate = online_learning_rate
        self.weight_decay = weight_decay
        self.updates = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._net = _mlp(self.input_dim, self.hidden, len(self.tiers))
        self._index = {t: i for i, t in enumerate(self.tiers)}

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self._net.parameters())

    def predict(self, contexts: np.ndarray) -> np.ndarray:
        """Utilities, shape (n, len(tiers))."""
        x = torch.as_tensor(np.atleast_2d(np.asarray(contexts, np.float32)))
        with torch.no_grad():
            return self._net(x).numpy().astype(np.float64)

    def utilities(self, context: np.ndarray) -> dict[str, float]:
        row = self.predict(context[None, :])[0]
        return {t: float(row[i]) for i, t in enumerate(self.tiers)}

    def fit(
        self,
        contexts: np.ndarray,
        tiers: Sequence[str],
        rewards: Sequence[float],
        *,
        epochs: int = 100,
        batch_size: int = 128,
        torch_threads: int | None = 1,
    ) -> float:
        """Offline bootstrap from logged outcomes (Adam, minibatches). Returns the last epoch's mean loss.

        ``torch_threads``: torch's intra-op thread count while fitting, restored afterwards (None: leave it).
        For a network this small extra threads only add synchronisation; on a busy 2-core machine one
        thread was 5x faster than two.
        """
        x, arm, y = self._tensors(contexts, tiers, rewards)
        optimizer = torch.optim.Adam(self._net.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        order_rng = np.random.default_rng(self.seed)
        epoch_loss = math.nan
        with _torch_threads(torch_threads):
            for _ in range(epochs):
                order = torch.as_tensor(order_rng.permutation(len(y)))
                losses = []
                for start in range(0, len(y), batch_size):
                    batch = order[start : start + batch_size]
                    losses.append(self._step(optimizer, x[batch], arm[batch], y[batch]))
                epoch_loss = float(np.mean(losses))
        return epoch_loss

    def partial_fit(
        self, contexts: np.ndarray, tiers: Sequence[str], rewards: Sequence[float], steps: int = 1
    ) -> float:
        """Online update: ``steps`` plain-SGD steps on this batch. Returns the last step's loss."""
        x, arm, y = self._tensors(contexts, tiers, rewards)
        optimizer = torch.optim.SGD(self._net.parameters(), lr=self.online_learning_rate)
        loss = math.nan
        for _ in range(steps):
            loss = self._step(optimizer, x, arm, y)
        return loss

    def _tensors(
        self, contexts: np.ndarray, tiers: Sequence[str], rewards: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.atleast_2d(np.asarray(contexts, np.float32)))
        if x.shape[1] != self.input_dim or x.shape[0] != len(tiers) or len(tiers) != len(rewards):
            raise ValueError(f"got contexts {tuple(x.shape)}, {len(tiers)} tiers, {len(rewards)} rewards")
        unknown = set(tiers) - set(self._index)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}; model has {list(self.tiers)}")
        arm = torch.as_tensor([self._index[t] for t in tiers], dtype=torch.long)
        y = torch.as_tensor(np.asarray(rewards, np.float32))
        return x, arm, y

    def _step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, arm: torch.Tensor, y: torch.Tensor) -> float:
        self._net.train()
        optimizer.zero_grad()
        served = self._net(x).gather(1, arm[:, None]).squeeze(1)
        loss = torch.mean((served - y) ** 2)
        loss.backward()
        optimizer.step()
        self._net.eval()
        self.updates += 1
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "tiers": list(self.tiers),
            "input_dim": self.input_dim,
            "hidden": list(self.hidden),
            "seed": self.seed,
            "learning_rate": self.learning_rate,
            "online_learning_rate": self.online_learning_rate,
            "weight_decay": self.weight_decay,
            "updates": self.updates,
            "weights": {k: v.tolist() for k, v in self._net.state_dict().items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> TierUtilityModel:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported utility model state version {state.get('version')}")
        model = cls(
            state["tiers"],
            state["input_dim"],
            state["hidden"],
            seed=state["seed"],
            learning_rate=state["learning_rate"],
            online_learning_rate=state["online_learning_rate"],
            weight_decay=state["weight_decay"],
        )
        model._net.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state["weights"].items()})
        model.updates = int(state["updates"])
        return model


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _mlp(input_dim: int, hidden: Sequence[int], outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers).eval()


@dataclass(frozen=True)
class BanditConfig:
    """Router knobs. ``costs`` are the default relative costs ``C_i``; ``choose`` accepts measured ones.

    ``load_threshold`` is the knob that trades quality for throughput: below it the router routes for
    quality alone; above it costlier tiers lose up to ``lambda0 * C_i`` of score.
    """

    tiers: tuple[str, ...]
    costs: dict[str, float]
    epsilon: float = 0.05
    load_threshold: float = 1.0
    lambda0: float = 1.0
    gamma: float = 2.0
    temperature: float = 0.1
    policy: Literal["softmax", "argmax"] = "softmax"
    uniform_std: float = 0.1
    explore_under_load: bool = False
    compare_prior: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if set(self.costs) != set(self.tiers):
            raise ValueError(f"costs name {sorted(self.costs)}, tiers are {list(self.tiers)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tiers"] = list(self.tiers)
        data["compare_prior"] = list(self.compare_prior)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BanditConfig:
        values = dict(data)
        values["tiers"] = tuple(values["tiers"])
        values["compare_prior"] = tuple(values["compare_prior"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Choice:
    """One routing decision. ``compare_with``: a second tier to also run for a pairwise preference."""

    tier: str
    probabilities: dict[str, float]
    explore: bool
    compare_with: str | None
    utilities: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    bias: float = 0.0


class BanditRouter:
    """Chooses a tier per request from learned utilities, current load and exploration."""

    def __init__(self, config: BanditConfig, model: TierUtilityModel) -> None:
        if tuple(model.tiers) != tuple(config.tiers):
            raise ValueError(f"model tiers {model.tiers} differ from config tiers {config.tiers}")
        self.config = config
        self.model = model
        a, b = config.compare_prior
        self.beta: dict[str, list[float]] = {t: [a, b] for t in config.tiers}

    def choose(
        self,
        context: np.ndarray,
        load: float,
        rng: np.random.Generator,
        costs: Mapping[str, float] | None = None,
    ) -> Choice:
        """Route one request. ``load`` is the smoothed load the threshold is compared with (for instance
        the largest tier's EMA); ``costs`` overrides the configured ``C_i`` with measured ones."""
        cfg = self.config
        mu = self.model.utilities(context)
        tier_costs = dict(costs) if costs is not None else cfg.costs
        bias = load_bias(load, cfg.load_threshold, cfg.lambda0, cfg.gamma)
        scores = biased_scores(mu, load, tier_costs, cfg.load_threshold, cfg.lambda0, cfg.gamma)
        probabilities = softmax(scores, cfg.temperature)
        top = max(cfg.tiers, key=lambda t: (scores[t], -tier_costs[t]))

        may_explore = cfg.explore_under_load or bias == 0.0
        if may_explore and rng.random() < cfg.epsilon:
            tier = cfg.tiers[int(rng.integers(len(cfg.tiers)))]
            return Choice(tier, probabilities, True, None, mu, scores, bias)

        if len(cfg.tiers) > 1 and float(np.std(list(scores.values()))) < cfg.uniform_std:
            return Choice(top, probabilities, False, self._thompson_second(top, rng), mu, scores, bias)

        if cfg.policy == "argmax":
            tier = top
        else:
            p = np.array([probabilities[t] for t in cfg.tiers])
            tier = cfg.tiers[int(rng.choice(len(cfg.tiers), p=p / p.sum()))]
        return Choice(tier, probabilities, False, None, mu, scores, bias)

    def _thompson_second(self, top: str, rng: np.random.Generator) -> str:
        """Thompson sampling over the other arms' Beta(wins, losses) of pairwise comparisons."""
        others = [t for t in self.config.tiers if t != top]
        draws = [rng.beta(self.beta[t][0], self.beta[t][1]) for t in others]
        return others[int(np.argmax(draws))]

    def record_comparison(self, first: str, second: str, outcome: float) -> None:
        """A pairwise result: ``outcome`` 1.0 = ``first`` won, 0.0 = ``second`` won, 0.5 = tie."""
        if not 0.0 <= outcome <= 1.0:
            raise ValueError(f"outcome must be in [0, 1], got {outcome}")
        self.beta[first][0] += outcome
        self.beta[first][1] += 1.0 - outcome
        self.beta[second][0] += 1.0 - outcome
        self.beta[second][1] += outcome

    def observe(self, contexts: np.ndarray, tiers: Sequence[str], rewards: Sequence[float], steps: int = 1) -> float:
        """Online feedback: served tiers and their rewards."""
        return self.model.partial_fit(contexts, tiers, rewards, steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "beta": {t: list(ab) for t, ab in self.beta.items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> BanditRouter:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported router state version {state.get('version')}")
        router = cls(BanditConfig.from_dict(state["config"]), TierUtilityModel.from_state_dict(state["model"]))
        router.beta = {t: [float(a), float(b)] for t, (a, b) in state["beta"].items()}
        return router
