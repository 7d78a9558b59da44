"""The "bandit" routing policy: ``policy.bandit.BanditRouter`` behind the ``Router`` protocol, with
measured load and token costs (paper, "Router: contextual bandit with load bias").

Per request:

* context = the request embedding + ``ExampleFeatures`` of its stage-2 examples (count, similarities,
  helpfulness, source quality) -> ``context_vector``;
* ``mu_i`` per tier from the trained ``TierUtilityModel``;
* ``C_i`` from the ``TokenCostModel`` for this request (its prompt tokens per tier: examples add
  prefill on tiers that take them; the typical completion length), fitted on the history's timings;
* ``L``: the EMA load of ``bandit.load_tier`` (default: the costliest tier) from the generate workers'
  reports (``routing.load``); ``S_i = mu_i - lambda0 * tanh(gamma * max(0, L - threshold)) * C_i``;
* epsilon-greedy exploration below the threshold; selective feedback when the scores are nearly
  uniform: the decision names a second tier (``compare_with``) at most for ``bandit.compare_rate`` of
  requests and never under load, and the route stage sends the request there too.

Each decision carries its ``RouteContext`` (``domain``): mu_i, S_i, C_i, the loads read and L, the
bias, whether it explored, the example features and the stored state's version. The route stage puts
it on the record, the log stage stores it with the answer, and ``echolm router fit`` / ``calibrate``
train on it instead of rebuilding the context (``learning``).

Until a trained state exists (``echolm router fit``) the similarity rule routes (cold start). The
state (``RouterState``: the bandit, the cost model, the calibrated threshold) is JSON in the model
store; route workers poll it (``learning.model_poll_interval_s``) and re-measure costs from the
history (``bandit.cost_refresh_interval_s``), without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from echolm.domain import RouteContext, RouteDecision
from echolm.judging.pairwise import should_sample
from echolm.policy.bandit import BanditConfig, BanditRouter, ExampleFeatures, TierUtilityModel, context_vector
from echolm.policy.load_bias import TokenCostModel
from echolm.protocols import RoutingContext
from echolm.routing.costs import DEFAULT_CHARS_PER_TOKEN, cost_model_from_rates, fit_token_rates, request_prompt_tokens
from echolm.routing.route_context import describe_route, routed_examples
from echolm.routing.similarity import SimilarityRouter
from echolm.selection import hint_chars
from echolm.settings import Settings

log = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_LOAD_THRESHOLD = 1.0
DEFAULT_COMPLETION_TOKENS = 128


@dataclass
class RouterState:
    """Everything the bandit router learned, as stored in the model store (``to_dict``: JSON-safe)."""

    bandit: BanditRouter
    costs: TokenCostModel
    embedding_dim: int
    completion_tokens: int = DEFAULT_COMPLETION_TOKENS
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN
    load_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "bandit": self.bandit.state_dict(), "costs": self.costs.state_dict(),
            "embedding_dim": self.embedding_dim, "completion_tokens": self.completion_tokens,
            "chars_per_token": self.chars_per_token, "load_threshold": self.load_threshold,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported router state version {data.get('version')}")
        return cls(BanditRouter.from_state_dict(data["bandit"]), TokenCostModel.from_state_dict(data["costs"]),
                   int(data["embedding_dim"]), int(data["completion_tokens"]), float(data["chars_per_token"]),
                   None if data.get("load_threshold") is None else float(data["load_threshold"]))


def prior_costs(settings: Settings) -> dict[str, float]:
    """Configured relative costs, cheapest = 1 (used until token costs are measured)."""
    cheapest = min(t.relative_cost for t in settings.tiers)
    return {t.name: t.relative_cost / cheapest for t in settings.tiers}


def bandit_config(settings: Settings, calibrated_threshold: float | None = None) -> BanditConfig:
    """The router's knobs from settings; the load threshold: the setting, else the calibrated one, else 1."""
    b = settings.bandit
    threshold = b.load_threshold if b.load_threshold is not None else (
        calibrated_threshold if calibrated_threshold is not None else DEFAULT_LOAD_THRESHOLD)
    return BanditConfig(tiers=tuple(t.name for t in settings.tiers), costs=prior_costs(settings), epsilon=b.epsilon,
                        load_threshold=threshold, lambda0=b.lambda0, gamma=b.gamma, temperature=b.temperature,
                        policy=b.policy, uniform_std=b.uniform_std)


def new_state(settings: Settings, embedding_dim: int, *, seed: int = 0) -> RouterState:
    """An untrained state for the configured tiers (what ``echolm router fit`` starts from)."""
    config = bandit_config(settings)
    model = TierUtilityModel(config.tiers, embedding_dim + 5, seed=seed)
    return RouterState(BanditRouter(config, model), TokenCostModel(prior=prior_costs(settings)), embedding_dim)


class LoadAwareBanditRouter:
    """``Router`` over a ``RouterState``; the similarity rule until a state is loaded.

    ``loads`` returns the current per-tier load EMAs (a ``KafkaLoadSource``'s in workers; a fake in
    tests); ``RoutingContext.load``, when given, takes precedence.
    """

    def __init__(self, settings: Settings, state: RouterState | None = None, *,
                 loads: Callable[[], Mapping[str, float]] | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self._settings = settings
        self._fallback = SimilarityRouter.from_settings(settings)
        self._loads = loads or dict
        self._rng = rng if rng is not None else np.random.default_rng(settings.bandit.seed)
        self._tiers = {t.name: t for t in settings.tiers}
        self._load_tier = settings.bandit.load_tier or settings.largest_tier.name
        if self._load_tier not in self._tiers:
            raise ValueError(f"bandit.load_tier names an unknown tier {self._load_tier!r}")
        self.state: RouterState | None = None
        self.policy: BanditRouter | None = None
        self.policy_version: int | None = None
        if state is not None:
            self.apply_state(state)

    @property
    def trained(self) -> bool:
        return self.policy is not None

    def apply_state(self, state: RouterState, version: int | None = None) -> None:
        """Use ``state`` (stored as ``version``) from now on, with the knobs of the current settings
        (tiers must match)."""
        tiers = tuple(self._tiers)
        if tuple(state.bandit.model.tiers) != tiers:
            raise ValueError(f"router state is for tiers {state.bandit.model.tiers}, configured {tiers}: "
                             "run `echolm router fit` again")
        policy = BanditRouter(bandit_config(self._settings, state.load_threshold), state.bandit.model)
        policy.beta = {t: list(ab) for t, ab in state.bandit.beta.items()}
        self.state, self.policy, self.policy_version = state, policy, version

    def loads(self) -> dict[str, float]:
        return dict(self._loads())

    def route(self, context: RoutingContext) -> RouteDecision:
        state, policy, version = self.state, self.policy, self.policy_version
        loads = dict(context.load or self.loads())
        if state is None or policy is None:
            decision = self._fallback.route(context)
            cold = RouteDecision(decision.tier, decision.score, f"bandit cold start, {decision.reason}",
                                 decision.use_examples, decision.scores)
            return replace(cold, context=describe_route(replace(context, load=loads), cold, "bandit-cold-start"))
        features = ExampleFeatures.from_retrieved(context.examples)
        x = context_vector(context.embedding if context.embedding is not None and
                           len(context.embedding) == state.embedding_dim else None, features, state.embedding_dim)
        load = loads.get(self._load_tier, 0.0)
        example_chars = sum(hint_chars(e) for e in context.examples)
        costs = self._costs(context.prompt_chars, example_chars)
        choice = policy.choose(x, load, self._rng, costs)
        tier = self._tiers[choice.tier]
        compare_with = choice.compare_with if (
            choice.compare_with and choice.bias == 0.0
            and should_sample(f"{context.request_id}#compare", self._settings.bandit.compare_rate)) else None
        described = ", ".join(f"{t} mu {choice.utilities[t]:.2f} C {costs[t]:.2f}" for t in policy.config.tiers)
        why = "explore" if choice.explore else ("nearly uniform, compare with " + compare_with if compare_with
                                                 else policy.config.policy)
        reason = f"bandit: {choice.tier} ({why}; {described}; load {load:.2f}, bias {choice.bias:.2f})"
        logged = RouteContext(
            policy="bandit", tier=choice.tier, policy_version=version, explore=bool(choice.explore),
            utilities=_floats(choice.utilities), scores=_floats(choice.scores), costs=_floats(costs),
            loads=_floats(loads), load_tier=self._load_tier, load=float(load),
            load_threshold=float(policy.config.load_threshold), bias=float(choice.bias),
            compare_with=compare_with, prompt_chars=context.prompt_chars, example_chars=example_chars,
            examples=routed_examples(context.examples), features=features)
        return RouteDecision(tier=choice.tier, score=choice.scores[choice.tier], reason=reason,
                             use_examples=tier.use_examples and bool(context.examples), scores=choice.scores,
                             compare_with=compare_with, context=logged)

    def costs_for(self, context: RoutingContext) -> dict[str, float]:
        """``C_i`` of this request: measured token costs, examples adding prefill where they are used."""
        return self._costs(context.prompt_chars, sum(hint_chars(e) for e in context.examples))

    def _costs(self, prompt_chars: int, example_chars: int) -> dict[str, float]:
        assert self.state is not None
        prompt_tokens = request_prompt_tokens(prompt_chars, example_chars,
                                              {n: t.use_examples for n, t in self._tiers.items()},
                                              self.state.chars_per_token)
        return self.state.costs.relative_costs(prompt_tokens, self.state.completion_tokens)


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Plain floats (numpy scalars would not serialise onto the wire)."""
    return {str(k): float(v) for k, v in values.items()}


class BanditRouterService(LoadAwareBanditRouter):
    """The router as a route worker runs it: follows the load topic, hot-reloads the stored state and
    re-measures token costs. ``refresh`` is called by the route stage before each batch (cheap when
    nothing is due); every database read is bounded and a failure keeps the current state."""

    def __init__(self, settings: Settings, *, rng: np.random.Generator | None = None, history: Any = None) -> None:
        from echolm.model_store import ROUTER_MODEL, ModelWatcher
        from echolm.routing.load import KafkaLoadSource, LoadBoard

        self._source = None
        if settings.kafka_bootstrap:
            board = LoadBoard(settings.bandit.load_half_life_s, settings.bandit.load_stale_after_s)
            self._source = KafkaLoadSource(settings.kafka_bootstrap, settings.topics.load, board,
                                           client_id=f"{settings.kafka_client_id}-load")
        super().__init__(settings, loads=self._source.loads if self._source else None, rng=rng)
        # A SqlHistoryStore; made lazily in the worker's event loop unless one is given (then not closed here).
        self._history: Any = history
        self._owns_history = history is None
        self._watcher = ModelWatcher(ROUTER_MODEL, lambda stored: self.apply_state(RouterState.from_dict(stored.state),
                                                                                    stored.version),
                                     settings.learning.model_poll_interval_s)
        self._next_cost_refresh = 0.0

    async def refresh(self, *, force: bool = False) -> None:
        """Start following load reports; reload a newer stored state (if due, or ``force``); re-measure costs."""
        from echolm.model_store import ModelStore

        if self._source is not None:
            self._source.start()
        if self._history is None:
            from echolm.history.store import SqlHistoryStore

            self._history = SqlHistoryStore(self._settings.resolved_database_url)
        if await self._watcher.poll(ModelStore(self._history), force=force):
            self._next_cost_refresh = 0.0
        if self.state is not None and time.monotonic() >= self._next_cost_refresh:
            self._next_cost_refresh = time.monotonic() + self._settings.bandit.cost_refresh_interval_s
            await self._refresh_costs()

    async def _refresh_costs(self) -> None:
        from echolm.history.feedback_store import FeedbackStore

        assert self.state is not None
        store = FeedbackStore(self._history)
        try:
            rates = {}
            for tier in self._tiers:
                fitted = fit_token_rates(await asyncio.wait_for(store.generation_timings(tier), 10))
                if fitted is not None:
                    rates[tier] = fitted
        except Exception as exc:
            log.warning("re-measuring token costs failed (%s: %s); keeping the current ones", type(exc).__name__, exc)
            return
        if rates:
            self.state.costs = cost_model_from_rates(self.state.costs.prior, rates)

    async def aclose(self) -> None:
        if self._source is not None:
            await self._source.aclose()
        if self._history is not None and self._owns_history:
            await self._history.aclose()
