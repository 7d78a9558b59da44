"""Stage 2 of retrieval: keep the stage-1 candidates that are expected to help (paper, "Stage 2").

``ExampleSelector`` (pure) scores each candidate with the helpfulness proxy
(``policy.helpfulness.HelpfulnessModel``) when a trained one is loaded, and with its similarity at cold
start; keeps those scoring at least the threshold, at most ``max_count`` and within the prompt budget
(``policy.threshold.select_examples``, best first, ties by example id, so the same candidates always
give the same examples). A kept example carries its score as ``helpfulness``: the router reads it.

``StageTwo`` is the selector as the retrieve stage runs it: it polls the model store for a newer
trained proxy (``echolm selector fit`` stores one) and loads it without a restart, and fetches the
example embeddings the proxy reads (from the history, cached). Any failure there falls back to the
cold-start rule for that batch: stage 2 never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from echolm.domain import RetrievedExample
from echolm.policy.helpfulness import HelpfulnessModel, HelpfulnessPair
from echolm.policy.threshold import ScoredExample, select_examples
from echolm.prompting import render_hint
from echolm.settings import Settings

log = logging.getLogger(__name__)

# Separator between rendered hints (build_messages joins them with a blank line).
HINT_SEPARATOR_CHARS = 2


@dataclass(frozen=True, slots=True)
class SelectionPolicy:
    """Threshold on the helpfulness score, and the guards: example count and prompt characters."""

    threshold: float
    max_count: int
    budget_chars: int

    @classmethod
    def cold_start(cls, settings: Settings) -> SelectionPolicy:
        return cls(settings.learning.selection_threshold, settings.learning.max_examples,
                   settings.max_examples_prompt_chars)


def hint_chars(example: RetrievedExample) -> int:
    """Prompt characters the example takes as a hint (what the budget counts)."""
    return len(render_hint(1, example)) + HINT_SEPARATOR_CHARS


class ExampleSelector:
    """Stage 2 on one request's candidates; ``model`` None or untrained means similarity (cold start)."""

    def __init__(self, policy: SelectionPolicy, model: HelpfulnessModel | None = None, version: int | None = None) -> None:
        self.policy = policy
        self.model = model if model is not None and model.fitted else None
        self.version = version

    @property
    def learned(self) -> bool:
        return self.model is not None

    def scores(self, request_vec: np.ndarray | None, candidates: Sequence[RetrievedExample],
               example_vecs: Mapping[int, np.ndarray]) -> np.ndarray:
        """Helpfulness of each candidate: the proxy's probability, or the similarity clipped to [0, 1]
        when there is no trained proxy or a vector is missing (scores of one request are never mixed)."""
        if not candidates:
            return np.zeros(0)
        have_vectors = request_vec is not None and all(c.example.id in example_vecs for c in candidates)
        if self.model is None or not have_vectors:
            return np.clip(np.array([c.similarity for c in candidates], dtype=np.float64), 0.0, 1.0)
        pairs = [HelpfulnessPair(request_vec=request_vec, example_vec=example_vecs[c.example.id],  # type: ignore[arg-type]
                                 example_quality=c.example.quality, response_chars=len(c.example.response),
                                 similarity=c.similarity) for c in candidates]
        return self.model.score(pairs)

    def select(self, request_vec: np.ndarray | None, candidates: Sequence[RetrievedExample],
               example_vecs: Mapping[int, np.ndarray] | None = None) -> list[RetrievedExample]:
        """The kept candidates, best first, each with its score as ``helpfulness``."""
        scores = self.scores(request_vec, candidates, example_vecs or {})
        scored = [ScoredExample(id=c.example.id, score=float(s), tokens=hint_chars(c), item=c)
                  for c, s in zip(candidates, scores, strict=True)]
        kept = select_examples(scored, self.policy.threshold, self.policy.max_count, self.policy.budget_chars)
        return [replace(k.item, helpfulness=k.score) for k in kept if k.item is not None]


def selector_from_state(state: Mapping[str, Any], settings: Settings, version: int | None = None) -> ExampleSelector:
    """The selector a stored ``helpfulness`` state describes (its model and its chosen threshold)."""
    model = HelpfulnessModel.from_state_dict(state["model"])
    threshold = float(state.get("threshold", settings.learning.selection_threshold))
    policy = SelectionPolicy(threshold, settings.learning.max_examples, settings.max_examples_prompt_chars)
    return ExampleSelector(policy, model, version)


class _VectorCache:
    """Example id -> request embedding, least recently used evicted beyond ``capacity``."""

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._vectors: OrderedDict[int, np.ndarray] = OrderedDict()

    def get_many(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        found = {}
        for example_id in ids:
            vector = self._vectors.get(example_id)
            if vector is not None:
                self._vectors.move_to_end(example_id)
                found[example_id] = vector
        return found

    def put_many(self, vectors: Mapping[int, np.ndarray]) -> None:
        for example_id, vector in vectors.items():
            self._vectors[example_id] = vector
            self._vectors.move_to_end(example_id)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)


class StageTwo:
    """The selector as the retrieve stage runs it: hot-reloads the trained proxy, fetches vectors.

    ``history`` is a ``SqlHistoryStore`` (None: cold start only, nothing is read).
    """

    def __init__(self, settings: Settings, history: Any | None = None, *, timeout_s: float = 5.0) -> None:
        self._settings = settings
        self.selector = ExampleSelector(SelectionPolicy.cold_start(settings))
        self._timeout_s = timeout_s
        self._vectors = _VectorCache()
        self._feedback = None
        self._watcher = None
        self._models = None
        self._warned_at = 0.0
        if history is not None:
            from echolm.history.feedback_store import FeedbackStore
            from echolm.model_store import HELPFULNESS_MODEL, ModelStore, ModelWatcher

            self._feedback = FeedbackStore(history)
            self._models = ModelStore(history)
            self._watcher = ModelWatcher(HELPFULNESS_MODEL, self._apply, settings.learning.model_poll_interval_s,
                                         timeout_s)

    def _apply(self, stored: Any) -> None:
        self.selector = selector_from_state(stored.state, self._settings, stored.version)

    async def refresh(self, *, force: bool = False) -> bool:
        """Load a newer stored proxy if one exists (at most every ``model_poll_interval_s``)."""
        if self._watcher is None or self._models is None:
            return False
        return await self._watcher.poll(self._models, force=force)

    async def select_batch(self, request_vecs: np.ndarray,
                           candidates: Sequence[Sequence[RetrievedExample]]) -> list[list[RetrievedExample]]:
        """Stage 2 for a batch (one row of ``request_vecs`` per request)."""
        await self.refresh()
        selector = self.selector
        vectors: dict[int, np.ndarray] = {}
        if selector.learned:
            vectors = await self._example_vectors([c.example.id for hits in candidates for c in hits])
        return [selector.select(vec, hits, vectors) for vec, hits in zip(request_vecs, candidates, strict=True)]

    async def _example_vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        wanted = list(dict.fromkeys(ids))
        found = self._vectors.get_many(wanted)
        missing = [i for i in wanted if i not in found]
        if missing and self._feedback is not None:
            try:
                fetched = await asyncio.wait_for(self._feedback.example_embeddings(missing), self._timeout_s)
            except Exception as exc:  # cold start for this batch rather than a failed request
                if time.monotonic() - self._warned_at > 60:
                    log.warning("stage 2: example vectors unavailable (%s: %s); using similarity",
                                type(exc).__name__, exc)
                    self._warned_at = time.monotonic()
                return found
            self._vectors.put_many(fetched)
            found.update(fetched)
        return found
