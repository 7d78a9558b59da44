"""Training the learned parts from the history, off the critical path (``echolm selector|router ...``).

Labels come from the ``feedback`` table (users, the judge stage): per (request, tier) answer a mean
quality in [0, 1] (``history.feedback_store.outcomes_from_feedback``).

* ``fit_selector``: the helpfulness proxy on (request, example used) pairs of answers served with
  examples, labelled "helped" when that answer's quality >= ``learning.helped_quality``; then the
  stage-2 threshold is re-chosen (``policy.threshold.choose_threshold``) from the same outcomes: at
  threshold t a request keeps its examples (and is offloaded) if one scores >= t, otherwise it goes to
  the reference tier (quality: that tier's mean observed quality, 0.5 = parity if unknown); the
  threshold with the highest offload share at the best quality (within ``tolerance``) wins.
* ``fit_router``: the bandit's utility model on (context, tier, reward) triples. The context is the
  request's embedding (of its logged prompt text) and the features of its stage-2 examples as the router
  saw them: read from the route context logged with the answer (``responses.route_context``, see
  ``RoutingInputs``) when there is one, else rebuilt (rows logged before it was stored): the examples
  logged with the answer, or, for an answer served without examples, the examples that existed before
  the request, found again and passed through the current stage-2 selector. Rewards use
  ``policy.bandit.reward`` with the per-request relative cost from token costs measured on the history
  (``routing.costs``), for the prompt and example sizes the router costed.
* ``calibrate_router``: replays logged requests through the trained router at the load each one met
  (the logged load when there is one; else rebuilt from the history: the load tier's requests in
  generation at its routing time, over the tier's capacity) for a grid of load thresholds, and picks the
  threshold meeting a target offload share or win rate (negative thresholds make the cost bias
  permanent: the knob then also works on an idle system).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echolm.domain import Example, RetrievedExample
from echolm.history.feedback_store import Feedback, FeedbackStore, LoggedRequest, Outcome, StoredExample
from echolm.judging.pairwise import MAX_SCORE, TIE_MARGIN, outcome as pairwise_outcome
from echolm.model_store import HELPFULNESS_MODEL, ROUTER_MODEL, ModelStore
from echolm.policy.bandit import BanditRouter, ExampleFeatures, RewardWeights, context_vector, reward
from echolm.policy.helpfulness import HelpfulnessModel, HelpfulnessPair, holdout_aucs, trained_beats_similarity
from echolm.policy.threshold import choose_threshold, summarise_outcomes
from echolm.protocols import Embedder
from echolm.routing.bandit_router import RouterState, bandit_config, new_state, prior_costs
from echolm.routing.comparison import comparison_request_id, split_comparison_id
from echolm.routing.costs import (
    DEFAULT_CHARS_PER_TOKEN,
    TokenRates,
    cost_model_from_rates,
    estimate_chars_per_token,
    fit_token_rates,
    request_prompt_tokens,
)
from echolm.selection import ExampleSelector, SelectionPolicy, hint_chars, selector_from_state
from echolm.settings import Settings

log = logging.getLogger(__name__)

PARITY_QUALITY = 0.5
# Stage-1 candidates looked at when rebuilding a request's examples (then filtered by time and source).
RECONSTRUCT_CANDIDATES = 50


# ----------------------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """Labelled answers with their logged requests, and what the contexts need."""

    outcomes: list[Outcome]
    requests: dict[str, LoggedRequest]
    answers: dict[tuple[str, str], LoggedRequest] = field(default_factory=dict)

    def best_quality(self) -> dict[str, float]:
        best: dict[str, float] = {}
        for o in self.outcomes:
            best[o.request_id] = max(best.get(o.request_id, 0.0), o.quality)
        return best


async def load_training_data(store: FeedbackStore, *, limit: int = 50_000) -> TrainingData:
    """Outcomes of the newest ``limit`` feedback rows, keyed by original request ids, with the logged
    requests (and, per (request, tier), the logged answer: the original or its comparison twin)."""
    return await training_data_from_rows(store, await store.recent_feedback(limit))


async def training_data_from_rows(store: FeedbackStore, rows: Sequence[Feedback]) -> TrainingData:
    """``load_training_data`` for given feedback rows."""
    raw = await store.outcomes(rows)
    merged: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for o in raw:
        split = split_comparison_id(o.request_id)
        request_id = split[0] if split else o.request_id
        merged[(request_id, o.tier)].append((o.quality, o.n))
    outcomes = [Outcome(r, t, sum(q * n for q, n in v) / sum(n for _, n in v), sum(n for _, n in v))
                for (r, t), v in sorted(merged.items())]
    ids = sorted({o.request_id for o in outcomes})
    twins = [c for o in outcomes if (c := comparison_request_id(o.request_id, o.tier)) is not None]
    logged = await store.logged_requests(ids + twins)
    requests = {i: logged[i] for i in ids if i in logged}
    answers: dict[tuple[str, str], LoggedRequest] = {}
    for o in outcomes:
        original = requests.get(o.request_id)
        twin_id = comparison_request_id(o.request_id, o.tier)
        if original is not None and original.tier == o.tier:
            answers[(o.request_id, o.tier)] = original
        elif twin_id is not None and twin_id in logged:
            answers[(o.request_id, o.tier)] = logged[twin_id]
    return TrainingData([o for o in outcomes if o.request_id in requests], requests, answers)


async def embed_texts(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, embedder.dimension), dtype=np.float32)
    return await asyncio.to_thread(embedder.embed, list(texts))


class ExampleHistory:
    """Every stored example version (any status) with its embedding, per tenant, for rebuilding the
    examples a request could have been given when it was routed."""

    def __init__(self, examples: Sequence[StoredExample] = ()) -> None:
        self.by_id: dict[int, StoredExample] = {}
        self._tenants: dict[str, tuple[list[StoredExample], np.ndarray]] = {}
        self.extend(examples)

    @property
    def last_id(self) -> int:
        return max(self.by_id, default=0)

    def extend(self, examples: Sequence[StoredExample]) -> None:
        """Add newly stored examples (ids above ``last_id``; example rows never change their text)."""
        grouped: dict[str, list[StoredExample]] = defaultdict(list)
        for e in examples:
            if e.id not in self.by_id:
                self.by_id[e.id] = e
                grouped[e.tenant].append(e)
        for tenant, items in grouped.items():
            matrix = np.stack([e.embedding for e in items]).astype(np.float32)
            if tenant in self._tenants:
                old_items, old_matrix = self._tenants[tenant]
                items, matrix = old_items + items, np.vstack([old_matrix, matrix])
            self._tenants[tenant] = (items, matrix)

    async def refresh(self, store: FeedbackStore) -> int:
        """Load the examples stored since the last call; returns how many."""
        new = await store.examples(None, min_id=self.last_id)
        self.extend(new)
        return len(new)

    @staticmethod
    def retrieved(example: StoredExample, similarity: float) -> RetrievedExample:
        return RetrievedExample(Example(example.id, example.tenant, example.prompt, example.response, example.model,
                                        example.tier, example.quality), float(similarity))

    def logged(self, request: LoggedRequest) -> list[RetrievedExample]:
        """The examples logged with an answer (those still stored)."""
        return [self.retrieved(self.by_id[i], s) for i, s in zip(request.example_ids, request.example_similarities,
                                                                   strict=False) if i in self.by_id]

    def candidates(self, request: LoggedRequest, vector: np.ndarray, top_k: int,
                   min_similarity: float) -> list[RetrievedExample]:
        """Stage 1 as it would have run at the request's time: examples of its tenant created before it
        was submitted, not from the request itself, most similar first."""
        entry = self._tenants.get(request.tenant)
        if entry is None or top_k <= 0:
            return []
        items, matrix = entry
        similarities = matrix @ np.asarray(vector, np.float32)
        order = np.argsort(-similarities)[:RECONSTRUCT_CANDIDATES]
        own = {request.request_id}
        split = split_comparison_id(request.request_id)
        if split:
            own.add(split[0])
        found = []
        for index in order:
            example, similarity = items[int(index)], float(similarities[int(index)])
            if similarity < min_similarity or len(found) >= top_k:
                break
            if example.created_at >= request.submitted_at or example.source_request_id in own:
                continue
            found.append(self.retrieved(example, min(1.0, similarity)))
        return found


async def load_selector(models: ModelStore, settings: Settings) -> ExampleSelector:
    stored = await models.load(HELPFULNESS_MODEL)
    if stored is None:
        return ExampleSelector(SelectionPolicy.cold_start(settings))
    return selector_from_state(stored.state, settings, stored.version)


async def routing_examples(store: FeedbackStore, selector: ExampleSelector, examples: ExampleHistory,
                           requests: Sequence[LoggedRequest], vectors: np.ndarray,
                           settings: Settings) -> list[list[RetrievedExample]]:
    """Per request, the stage-2 examples the router is taken to have seen, rebuilt (module docstring)."""
    out = []
    for request, vector in zip(requests, vectors, strict=True):
        logged = examples.logged(request)
        candidates = logged or examples.candidates(request, vector, settings.retrieve_top_k, settings.min_similarity)
        example_vecs = {e.example.id: examples.by_id[e.example.id].embedding for e in candidates}
        out.append(selector.select(vector, candidates, example_vecs))
    return out


@dataclass(frozen=True)
class RoutingInputs:
    """What a request's route decision was computed from, besides its embedding: the example features,
    the prompt and example sizes its costs were computed for, and (logged contexts only) the load ``L``."""

    features: ExampleFeatures
    prompt_chars: int
    example_chars: int
    load: float | None = None
    logged: bool = False

    @classmethod
    def from_logged(cls, request: LoggedRequest, load_tier: str) -> RoutingInputs | None:
        """From the route context logged with the answer; None if there is none (older rows)."""
        context = request.route_context
        if context is None:
            return None
        load = context.load if context.load is not None else context.loads.get(load_tier)
        return cls(context.features, context.prompt_chars, context.example_chars, load, logged=True)

    @classmethod
    def rebuilt(cls, request: LoggedRequest, examples: Sequence[RetrievedExample]) -> RoutingInputs:
        return cls(ExampleFeatures.from_retrieved(examples), len(request.prompt_text),
                   sum(hint_chars(e) for e in examples))


async def routing_inputs(store: FeedbackStore, models: ModelStore, settings: Settings,
                         requests: Sequence[LoggedRequest], vectors: np.ndarray,
                         example_history: ExampleHistory | None = None) -> list[RoutingInputs]:
    """Per request, its logged route context when there is one; the others' are rebuilt
    (``routing_examples``), which loads the example history (``example_history``: a kept one,
    refreshed here) and the stored selector only when some request needs it."""
    load_tier = settings.bandit.load_tier or settings.largest_tier.name
    found = [RoutingInputs.from_logged(r, load_tier) for r in requests]
    missing = [i for i, inputs in enumerate(found) if inputs is None]
    if missing:
        history = example_history if example_history is not None else ExampleHistory()
        await history.refresh(store)
        selector = await load_selector(models, settings)
        rebuilt = await routing_examples(store, selector, history, [requests[i] for i in missing], vectors[missing],
                                         settings)
        for i, examples in zip(missing, rebuilt, strict=True):
            found[i] = RoutingInputs.rebuilt(requests[i], examples)
    return [inputs for inputs in found if inputs is not None]


# ----------------------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class MeasuredCosts:
    rates: dict[str, TokenRates]
    completion_tokens: int
    chars_per_token: float


async def measure_costs(store: FeedbackStore, settings: Settings, *, per_tier: int = 2000) -> MeasuredCosts:
    """Per-tier token rates, the typical completion length and characters per token from the history."""
    rates: dict[str, TokenRates] = {}
    completions: list[int] = []
    for tier in settings.tiers:
        timings = await store.generation_timings(tier.name, per_tier)
        completions += [t.completion_tokens for t in timings]
        fitted = fit_token_rates(timings)
        if fitted is not None:
            rates[tier.name] = fitted
    recent = await store.recent_requests(2000)
    chars = estimate_chars_per_token([(len(r.prompt_text), r.prompt_tokens or 0) for r in recent if not r.example_ids])
    completion = int(np.median(completions)) if completions else 128
    return MeasuredCosts(rates, max(1, completion), chars or DEFAULT_CHARS_PER_TOKEN)


def relative_costs(state: RouterState, settings: Settings, inputs: RoutingInputs) -> dict[str, float]:
    prompt_tokens = request_prompt_tokens(inputs.prompt_chars, inputs.example_chars,
                                          {t.name: t.use_examples for t in settings.tiers}, state.chars_per_token)
    return state.costs.relative_costs(prompt_tokens, state.completion_tokens)


# ----------------------------------------------------------------------------------------- selector


@dataclass
class SelectorFit:
    version: int | None
    pairs: int
    helped: int
    requests: int
    fitted: bool
    threshold: float | None
    holdout_auc: float | None
    thresholds: list[dict[str, float]]
    similarity_auc: float | None = None
    # Why the proxy was not deployed (stage 2 then keeps selecting by similarity); None when it was.
    not_deployed: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"stored_version": self.version, "pairs": self.pairs, "helped": self.helped, "requests": self.requests,
                "fitted": self.fitted, "threshold": self.threshold, "holdout_auc": self.holdout_auc,
                "similarity_holdout_auc": self.similarity_auc, "not_deployed": self.not_deployed}


async def fit_selector(store: FeedbackStore, models: ModelStore, embedder: Embedder, settings: Settings, *,
                       limit: int = 50_000, min_samples: int = 20, tolerance: float = 0.02,
                       save: bool = True) -> SelectorFit:
    """Train the helpfulness proxy and re-choose the threshold (module docstring); store both."""
    data = await load_training_data(store, limit=limit)
    reference_tier = settings.learning.reference_tier or settings.largest_tier.name
    served = [(o, data.answers[(o.request_id, o.tier)]) for o in data.outcomes
              if (o.request_id, o.tier) in data.answers and data.answers[(o.request_id, o.tier)].example_ids]
    example_rows = await store.examples([i for _, answer in served for i in answer.example_ids])
    by_id = {e.id: e for e in example_rows}
    vectors = await embed_texts(embedder, [answer.prompt_text for _, answer in served])
    pairs: list[HelpfulnessPair] = []
    labels: list[int] = []
    groups: list[int] = []
    for index, ((outcome, answer), vector) in enumerate(zip(served, vectors, strict=True)):
        for example_id, similarity in zip(answer.example_ids, answer.example_similarities, strict=False):
            example = by_id.get(example_id)
            if example is None:
                continue
            pairs.append(HelpfulnessPair(vector, example.embedding, example.quality, example.response_chars, similarity))
            labels.append(int(outcome.quality >= settings.learning.helped_quality))
            groups.append(index)
    model = HelpfulnessModel(embedder.dimension, min_samples=min_samples)
    auc, similarity_auc = holdout_aucs(embedder.dimension, pairs, labels, groups, min_samples=min_samples)
    fitted = model.fit(pairs, labels) if pairs else False
    result = SelectorFit(None, len(pairs), sum(labels), len(served), fitted, None, auc, [], similarity_auc)
    if not fitted:
        result.not_deployed = f"not enough labelled pairs of both outcomes ({len(pairs)}, need {min_samples})"
        return result
    if not trained_beats_similarity(auc, similarity_auc):
        result.fitted = False
        result.not_deployed = (f"on held-out requests the proxy ranked outcomes no better than similarity "
                               f"(AUC {auc if auc is None else round(auc, 3)} vs "
                               f"{similarity_auc if similarity_auc is None else round(similarity_auc, 3)})")
        return result
    scores = model.score(pairs) if pairs else np.zeros(0)
    per_request: dict[int, list[float]] = defaultdict(list)
    for group, score in zip(groups, scores, strict=True):
        per_request[group].append(float(score))
    reference_quality = np.mean([o.quality for o in data.outcomes if o.tier == reference_tier]) \
        if any(o.tier == reference_tier for o in data.outcomes) else PARITY_QUALITY
    grid = sorted({0.0, *np.round(np.quantile(scores, np.linspace(0, 0.95, 20)), 4).tolist()})
    samples = []
    for group, request_scores in per_request.items():
        quality = served[group][0].quality
        for threshold in grid:
            kept = max(request_scores) >= threshold
            samples.append((threshold, quality if kept else float(reference_quality), 1.0 if kept else 0.0))
    outcomes = summarise_outcomes(samples)
    threshold = choose_threshold(outcomes, tolerance=tolerance)
    result.threshold = threshold
    result.thresholds = [{"threshold": o.threshold, "quality": round(o.quality, 4), "offload": round(o.efficiency, 4)}
                         for o in outcomes]
    if save:
        state = {"model": model.state_dict(), "threshold": threshold, "embedding_dim": embedder.dimension}
        result.version = await models.save(HELPFULNESS_MODEL, state, result.summary())
    return result


# ----------------------------------------------------------------------------------------- router


@dataclass
class RouterTrainingSet:
    contexts: np.ndarray
    tiers: list[str]
    rewards: list[float]
    qualities: list[float]
    request_ids: list[str]
    logged_contexts: int = 0  # requests whose context was read from the log (the others were rebuilt)


async def router_training_set(store: FeedbackStore, models: ModelStore, embedder: Embedder, settings: Settings,
                              state: RouterState, data: TrainingData, weights: RewardWeights = RewardWeights(),
                              example_history: ExampleHistory | None = None) -> RouterTrainingSet:
    """(context, tier, reward) triples of every labelled answer on a configured tier; contexts as logged,
    else rebuilt (``routing_inputs``). ``example_history``: a kept ``ExampleHistory`` for rebuilding."""
    tiers = {t.name for t in settings.tiers}
    outcomes = [o for o in data.outcomes if o.tier in tiers]
    ids = sorted({o.request_id for o in outcomes})
    requests = [data.requests[i] for i in ids]
    vectors = await embed_texts(embedder, [r.prompt_text for r in requests])
    inputs = await routing_inputs(store, models, settings, requests, vectors, example_history)
    best = data.best_quality()
    contexts, out_tiers, rewards, qualities, out_ids = [], [], [], [], []
    index = {request_id: i for i, request_id in enumerate(ids)}
    for o in outcomes:
        i = index[o.request_id]
        costs = relative_costs(state, settings, inputs[i])
        top = max(costs.values())
        contexts.append(context_vector(vectors[i], inputs[i].features, state.embedding_dim))
        out_tiers.append(o.tier)
        rewards.append(reward(o.quality, costs[o.tier] / top, best[o.request_id], weights))
        qualities.append(o.quality)
        out_ids.append(o.request_id)
    matrix = np.stack(contexts) if contexts else np.zeros((0, state.embedding_dim + 5), np.float32)
    return RouterTrainingSet(matrix, out_tiers, rewards, qualities, out_ids, sum(i.logged for i in inputs))


@dataclass
class RouterFit:
    version: int | None
    samples: int
    requests: int
    loss: float | None
    mean_reward: dict[str, float]
    preferred: dict[str, float]
    rates: dict[str, dict[str, float]]
    logged_contexts: int = 0

    def summary(self) -> dict[str, Any]:
        return {"stored_version": self.version, "samples": self.samples, "requests": self.requests,
                "logged_contexts": self.logged_contexts, "loss": self.loss, "mean_reward_by_tier": self.mean_reward,
                "share_preferred_by_tier": self.preferred, "token_rates": self.rates}


async def fit_router(store: FeedbackStore, models: ModelStore, embedder: Embedder, settings: Settings, *,
                     limit: int = 50_000, epochs: int = 150, seed: int = 0, save: bool = True) -> RouterFit:
    """Bootstrap the bandit from the history's outcomes (module docstring); store the new state."""
    state = new_state(settings, embedder.dimension, seed=seed)
    previous = await models.load(ROUTER_MODEL)
    if previous is not None:  # keep a calibrated threshold across refits
        state.load_threshold = previous.state.get("load_threshold")
    measured = await measure_costs(store, settings)
    state.costs = cost_model_from_rates(prior_costs(settings), measured.rates)
    state.completion_tokens, state.chars_per_token = measured.completion_tokens, measured.chars_per_token
    data = await load_training_data(store, limit=limit)
    training = await router_training_set(store, models, embedder, settings, state, data)
    rates = {t: {"prefill_s_per_token": r.prefill_s_per_token, "decode_s_per_token": r.decode_s_per_token,
                 "prompt_reused_share": round(r.reused_share, 4), "answers": r.samples}
             for t, r in measured.rates.items()}
    if not training.tiers:
        return RouterFit(None, 0, 0, None, {}, {}, rates)
    loss = state.bandit.model.fit(training.contexts, training.tiers, training.rewards, epochs=epochs)
    record_comparisons(state.bandit, await store.recent_feedback(limit))
    by_tier: dict[str, list[float]] = defaultdict(list)
    for tier, value in zip(training.tiers, training.rewards, strict=True):
        by_tier[tier].append(value)
    unique_contexts = {rid: training.contexts[i] for i, rid in enumerate(training.request_ids)}
    utilities = state.bandit.model.predict(np.stack(list(unique_contexts.values())))
    top = np.argmax(utilities, axis=1)
    preferred = {t: round(float(np.mean(top == i)), 4) for i, t in enumerate(state.bandit.model.tiers)}
    result = RouterFit(None, len(training.tiers), len(unique_contexts), round(float(loss), 6),
                       {t: round(float(np.mean(v)), 4) for t, v in sorted(by_tier.items())}, preferred, rates,
                       training.logged_contexts)
    if save:
        result.version = await models.save(ROUTER_MODEL, state.to_dict(), result.summary())
    return result


@dataclass
class OnlineUpdate:
    version: int | None
    rows: int
    samples: int
    loss: float | None


def record_comparisons(policy: BanditRouter, rows: Sequence[Feedback]) -> int:
    """Pairwise verdicts between two tiers feed the Thompson-sampling prior of selective feedback."""
    counted = 0
    for row in rows:
        if row.pairwise and row.tier in policy.beta and row.other_tier in policy.beta and row.tier != row.other_tier:
            won = {"win": 1.0, "tie": 0.5, "loss": 0.0}[pairwise_outcome(row.score)]
            policy.record_comparison(row.tier, row.other_tier, won)
            counted += 1
    return counted


async def update_router_online(store: FeedbackStore, models: ModelStore, embedder: Embedder, settings: Settings,
                               rows: Sequence[Feedback], *, steps: int = 5, save: bool = True,
                               example_history: ExampleHistory | None = None) -> OnlineUpdate:
    """Adapt the stored router to new feedback ``rows``: a few plain-SGD steps on their triples (the
    bandit's ``observe``) and their pairwise verdicts into the Thompson prior; stores a new version.
    Nothing happens before ``echolm router fit`` stored a first state."""
    stored = await models.load(ROUTER_MODEL)
    if stored is None or not rows:
        return OnlineUpdate(None, len(rows), 0, None)
    state = RouterState.from_dict(stored.state)
    data = await training_data_from_rows(store, rows)
    training = await router_training_set(store, models, embedder, settings, state, data,
                                         example_history=example_history)
    loss = None
    if training.tiers:
        loss = state.bandit.observe(training.contexts, training.tiers, training.rewards, steps=steps)
    compared = record_comparisons(state.bandit, rows)
    if not training.tiers and not compared:
        return OnlineUpdate(None, len(rows), 0, None)
    result = OnlineUpdate(None, len(rows), len(training.tiers), None if loss is None else round(float(loss), 6))
    if save:
        metrics = {**stored.metrics, "online": {"rows": result.rows, "samples": result.samples, "loss": result.loss,
                                                "from_version": stored.version}}
        result.version = await models.save(ROUTER_MODEL, state.to_dict(), metrics)
    return result


# ----------------------------------------------------------------------------------------- calibration


def historical_loads(requests: Sequence[LoggedRequest], tier: str, capacity: float) -> list[float]:
    """The load tier's load when each request was routed: its answers in generation at that moment
    (routed, not finished) over ``capacity``. A request's routing time is its submission time plus its
    logged embed, retrieve and route times (waits between stages are not logged, so loads read low)."""
    def routed_at(r: LoggedRequest) -> float:
        return r.submitted_at.timestamp() + sum(r.timings.get(k, 0.0) for k in ("embed", "retrieve", "route"))

    busy = [(routed_at(r), r.finished_at.timestamp()) for r in requests if r.tier == tier]
    starts = sorted(s for s, _ in busy)
    ends = sorted(e for _, e in busy)
    loads = []
    for r in requests:
        t = routed_at(r)
        active = bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t)
        loads.append(max(0, active) / capacity)
    return loads


@dataclass
class CalibrationPoint:
    threshold: float
    offload: float
    win_rate: float | None
    judged: int


@dataclass
class Calibration:
    chosen: CalibrationPoint
    reached: bool
    points: list[CalibrationPoint]
    requests: int
    mean_load: float
    version: int | None = None
    logged_contexts: int = 0  # requests replayed from their logged context and load (the others rebuilt)


def simulate(policy: BanditRouter, contexts: np.ndarray, loads: Sequence[float], costs: Sequence[Mapping[str, float]],
             threshold: float) -> list[str]:
    """Deterministic decisions (argmax, no exploration) at a load threshold."""
    from dataclasses import replace

    config = replace(policy.config, load_threshold=threshold, epsilon=0.0, policy="argmax", uniform_std=0.0)
    router = BanditRouter(config, policy.model)
    rng = np.random.default_rng(0)
    return [router.choose(x, load, rng, c).tier for x, load, c in zip(contexts, loads, costs, strict=True)]


def win_rate_of(decisions: Sequence[str], request_ids: Sequence[str], quality: Mapping[tuple[str, str], float],
                reference_tier: str) -> tuple[float | None, int]:
    """Win rate vs the reference tier over requests whose chosen tier has an outcome (the reference tier
    itself counts as a tie); an outcome's quality q is read as the judge score 6q - 3."""
    values = []
    for tier, request_id in zip(decisions, request_ids, strict=True):
        if tier == reference_tier:
            values.append(0.5)
        elif (request_id, tier) in quality:
            score = 2 * MAX_SCORE * quality[(request_id, tier)] - MAX_SCORE
            values.append({"win": 1.0, "tie": 0.5, "loss": 0.0}[pairwise_outcome(score, TIE_MARGIN)])
    return (float(np.mean(values)) if values else None), len(values)


async def calibrate_router(store: FeedbackStore, models: ModelStore, embedder: Embedder, settings: Settings, *,
                           target_offload: float | None = None, target_win_rate: float | None = None,
                           limit: int = 5000, grid: Sequence[float] | None = None, save: bool = True) -> Calibration:
    """Pick the load threshold for a target offload share or win rate on logged traffic (module docstring)."""
    if (target_offload is None) == (target_win_rate is None):
        raise ValueError("give exactly one of target_offload or target_win_rate")
    stored = await models.load(ROUTER_MODEL)
    if stored is None:
        raise LookupError("no trained router: run `echolm router fit` first")
    state = RouterState.from_dict(stored.state)
    policy = BanditRouter(bandit_config(settings, state.load_threshold), state.bandit.model)
    requests = [r for r in await store.recent_requests(limit) if split_comparison_id(r.request_id) is None]
    if not requests:
        raise LookupError("no logged requests to calibrate on")
    load_tier = settings.bandit.load_tier or settings.largest_tier.name
    reference_tier = settings.learning.reference_tier or settings.largest_tier.name
    vectors = await embed_texts(embedder, [r.prompt_text for r in requests])
    inputs = await routing_inputs(store, models, settings, requests, vectors)
    rebuilt_loads = historical_loads(requests, load_tier, float(settings.tier(load_tier).concurrency))
    loads = [i.load if i.load is not None else rebuilt for i, rebuilt in zip(inputs, rebuilt_loads, strict=True)]
    contexts = np.stack([context_vector(v, i.features, state.embedding_dim) for v, i in zip(vectors, inputs, strict=True)])
    costs = [relative_costs(state, settings, i) for i in inputs]
    data = await load_training_data(store)
    quality = {(o.request_id, o.tier): o.quality for o in data.outcomes}
    ids = [r.request_id for r in requests]
    if grid is None:
        top = max(loads) if loads else 0.0
        grid = np.round(np.linspace(-3.0, top + 0.5, 36), 3).tolist()
    points = []
    for threshold in grid:
        decisions = simulate(policy, contexts, loads, costs, float(threshold))
        offload = float(np.mean([d != reference_tier for d in decisions]))
        rate, judged = win_rate_of(decisions, ids, quality, reference_tier)
        points.append(CalibrationPoint(float(threshold), offload, rate, judged))
    chosen, reached = _choose(points, target_offload, target_win_rate)
    result = Calibration(chosen, reached, points, len(requests), float(np.mean(loads)) if loads else 0.0,
                         logged_contexts=sum(i.logged for i in inputs))
    if save:
        state.load_threshold = chosen.threshold
        metrics = {**stored.metrics, "calibrated": {"threshold": chosen.threshold, "offload": chosen.offload,
                                                     "win_rate": chosen.win_rate, "target_offload": target_offload,
                                                     "target_win_rate": target_win_rate, "reached": reached}}
        result.version = await models.save(ROUTER_MODEL, state.to_dict(), metrics)
    return result


def _choose(points: Sequence[CalibrationPoint], target_offload: float | None,
            target_win_rate: float | None) -> tuple[CalibrationPoint, bool]:
    """Offload target: the highest threshold reaching it (the least quality given up); win-rate target:
    the lowest threshold keeping it (the most offload). Unreachable: the closest point."""
    if target_offload is not None:
        meeting = [p for p in points if p.offload >= target_offload - 1e-9]
        if meeting:
            return max(meeting, key=lambda p: p.threshold), True
        return max(points, key=lambda p: (p.offload, p.threshold)), False
    rated = [p for p in points if p.win_rate is not None]
    if not rated:
        raise LookupError("no judged outcomes to estimate a win rate from: collect feedback or run the judge stage")
    assert target_win_rate is not None
    meeting = [p for p in rated if p.win_rate is not None and p.win_rate >= target_win_rate - 1e-9]
    if meeting:
        return max(meeting, key=lambda p: (p.offload, p.threshold)), True
    return max(rated, key=lambda p: (p.win_rate or 0.0, p.offload)), False
