"""The systems compared, as what each one does to one request: an *arm* to generate, or a cached answer.

An **arm** is a model tier plus the examples prepended to the request (none for the large tier). Every
system is a policy that picks, per request, one arm or (the semantic cache) a cached response returned
verbatim. Because all systems share arms (always-large and EchoLM both use the large arm on some
requests, the same requests in the same phrasing), each (request, arm) is generated once and reused by
every system and every knob setting of a sweep.

Arms used here:

* ``large``: the large tier alone; ``small``: the small tier alone;
* ``small+nearest``: the small tier with the request's ``k`` most similar cached examples (stage 1);
* ``small+random``: the small tier with ``k`` cached examples drawn at random (same count, no relevance);
* ``small+nearest@n``: stage 1 on a cache of only its first ``n`` examples (the cache-size sweep);
* ``small+selected``: stage 1 candidates filtered by stage 2 (``echolm.selection``), when available.

Prompts are built exactly as the pipeline's generate stage builds them (``echolm.prompting``), so the
costs and answers measured here are those the pipeline would produce for the same routing decision.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from echolm.datasets import TaskItem
from echolm.domain import ChatMessage, Example, GenerationParams, RetrievedExample
from echolm.evaluation.generation_cache import GenerationJob
from echolm.prompting import PromptLayout, build_messages

EVAL_TENANT = "eval"
DEFAULT_K = 2


@dataclass(frozen=True, slots=True)
class Arm:
    """A tier and the cache entries (indices into the cache part) prepended as examples."""

    name: str
    tier: str
    examples: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SemanticHit:
    """The semantic cache's answer: cache entry ``index``'s stored response, returned verbatim."""

    index: int
    similarity: float


Decision = Arm | SemanticHit


class SimilarityTable:
    """Cosine similarities between requests (by id) and the cache part's entries (by index)."""

    def __init__(self, request_ids: Sequence[str], request_vectors: np.ndarray, cache_vectors: np.ndarray) -> None:
        self._row = {rid: i for i, rid in enumerate(request_ids)}
        self.matrix = np.asarray(request_vectors, dtype=np.float32) @ np.asarray(cache_vectors, dtype=np.float32).T

    def row(self, request_id: str) -> np.ndarray:
        return self.matrix[self._row[request_id]]

    def nearest(self, request_id: str, k: int, cache_size: int | None = None,
                exclude: Callable[[int], bool] | None = None) -> list[tuple[int, float]]:
        """The ``k`` most similar entries among the first ``cache_size`` (index, similarity), best first;
        ties broken by index so results are reproducible."""
        sims = self.row(request_id)
        n = len(sims) if cache_size is None else min(cache_size, len(sims))
        order = sorted(range(n), key=lambda i: (-float(sims[i]), i))
        if exclude is not None:
            order = [i for i in order if not exclude(i)]
        return [(i, float(sims[i])) for i in order[:k]]

    def best(self, request_id: str, cache_size: int | None = None) -> tuple[int, float]:
        hits = self.nearest(request_id, 1, cache_size)
        return hits[0] if hits else (-1, -1.0)


def random_examples(request_id: str, k: int, cache_size: int, seed: int) -> tuple[int, ...]:
    """``k`` distinct cache indices drawn at random, reproducibly per (request, seed)."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return tuple(sorted(rng.sample(range(cache_size), min(k, cache_size))))


def cache_examples(cache: Sequence[TaskItem], responses: Sequence[str], model: str) -> list[Example]:
    """The cache part as ``Example`` values (id = index + 1), holding the large model's answers."""
    return [Example(id=i + 1, tenant=EVAL_TENANT, prompt=item.prompt, response=response, model=model, tier="large")
            for i, (item, response) in enumerate(zip(cache, responses, strict=True))]


def arm_messages(item: TaskItem, arm: Arm, examples: Sequence[Example], similarities: np.ndarray | None,
                 budget_chars: int, layout: PromptLayout = "hints-first") -> tuple[ChatMessage, ...]:
    """The messages the pipeline would send for ``item`` on ``arm`` (hints folded in by ``build_messages``)."""
    base = [ChatMessage(role="user", content=item.prompt)]
    if not arm.examples:
        return tuple(base)
    retrieved = [RetrievedExample(example=examples[i],
                                  similarity=float(similarities[i]) if similarities is not None else 0.0)
                 for i in arm.examples]
    return tuple(build_messages(base, retrieved, budget_chars=budget_chars, layout=layout))


@dataclass(frozen=True, slots=True)
class ArmFactory:
    """Builds the arms of the systems for one workload from its similarity table."""

    table: SimilarityTable
    cache_size: int
    k: int = DEFAULT_K
    seed: int = 0

    def large(self) -> Arm:
        return Arm("large", "large")

    def small(self) -> Arm:
        return Arm("small", "small")

    def nearest(self, request_id: str, cache_size: int | None = None,
                exclude: Callable[[int], bool] | None = None) -> Arm:
        size = self.cache_size if cache_size is None else cache_size
        picked = tuple(i for i, _ in self.table.nearest(request_id, self.k, size, exclude))
        name = "small+nearest" if size == self.cache_size else f"small+nearest@{size}"
        return Arm(name, "small", picked)

    def random(self, request_id: str) -> Arm:
        return Arm("small+random", "small", random_examples(request_id, self.k, self.cache_size, self.seed))


def job_for(item: TaskItem, arm: Arm, *, examples: Sequence[Example], table: SimilarityTable | None,
            models: dict[str, str], max_tokens: int, temperature: float, budget_chars: int,
            layout: PromptLayout = "hints-first") -> GenerationJob:
    """The generation job of ``item`` on ``arm``."""
    sims = table.row(item.id) if (table is not None and arm.examples) else None
    messages = arm_messages(item, arm, examples, sims, budget_chars, layout)
    return GenerationJob(tier=arm.tier, model=models[arm.tier], messages=messages,
                         params=GenerationParams(max_tokens=max_tokens, temperature=temperature))


# ---------------------------------------------------------------------------------------------
# Policies: what each system does per request, with its knob


@dataclass(frozen=True, slots=True)
class Choice:
    """A policy's choice for one request: an arm by name, or the semantic cache's entry ``index``."""

    arm: str | None = None
    cached_index: int | None = None
    similarity: float | None = None
    replayed_cache: bool = False  # the semantic cache's entry as it stands after the replay phase


def threshold_choices(scores: dict[str, float], threshold: float, above: Choice | dict[str, Choice],
                      below: Choice) -> dict[str, Choice]:
    """Per request: ``above`` when its score >= ``threshold``, else ``below`` (the routers' common shape)."""
    out = {}
    for request_id, score in scores.items():
        chosen = above[request_id] if isinstance(above, dict) else above
        out[request_id] = chosen if score >= threshold else below
    return out


def sweep_thresholds(scores: Sequence[float]) -> list[float]:
    """Every threshold that changes a decision, from "all above" to "none above": one below every score,
    one halfway between each pair of neighbouring distinct scores, one above them all.

    Halfway, not at a score: the pipeline recomputes a request's similarity (faiss, float32), and a
    threshold equal to a score would send that request either way on float noise (``--validate`` caught
    it: the model offloaded a request the pipeline did not)."""
    distinct = sorted(set(float(s) for s in scores))
    if not distinct:
        return [1.0]
    halfway = [(low + high) / 2 for low, high in zip(distinct, distinct[1:])]
    return [distinct[0] - 1e-3, *halfway, distinct[-1] + 1.0]


def similarity_weighted_scores(request_ids: Sequence[str], vectors: np.ndarray, groups: Sequence[str],
                               labels: dict[str, float], counts: dict[str, int], *,
                               sharpness: float = 10.0) -> dict[str, float]:
    """RouteLLM's similarity-weighted ranking, leave-one-out over logged outcomes.

    The score of request i is the weighted mean of the logged labels of *other* requests j (never one of
    i's near-duplicate group, which would leak i's own outcome), weighted by ``exp(sharpness * cos(i, j))``
    times how often j was served. A label is what serving j on the cheap arm earned against the large
    model: 1 for a win, 0.5 for a tie, 0 for a loss. A request with no other logged request scores 0.5.
    """
    sims = np.asarray(vectors, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T
    scores = {}
    for i, request_id in enumerate(request_ids):
        weight_sum, total = 0.0, 0.0
        for j, other in enumerate(request_ids):
            if j == i or groups[j] == groups[i] or other not in labels:
                continue
            weight = float(np.exp(sharpness * (sims[i, j] - 1.0))) * counts.get(other, 1)
            weight_sum += weight
            total += weight * labels[other]
        scores[request_id] = total / weight_sum if weight_sum > 0 else 0.5
    return scores
