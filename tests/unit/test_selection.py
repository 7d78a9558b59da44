"""Stage 2: threshold, count and budget guards, deterministic order, the learned proxy, and the
retrieve stage applying it."""

from __future__ import annotations

import numpy as np
import pytest

from echolm.domain import Example, RetrievedExample
from echolm.policy.helpfulness import HelpfulnessModel, HelpfulnessPair
from echolm.retrieval.example_cache import ExampleCache
from echolm.selection import ExampleSelector, SelectionPolicy, StageTwo, hint_chars, selector_from_state
from echolm.settings import Settings
from echolm.testing import HashingEmbedder, InMemoryHistoryStore
from echolm.protocols import ExampleCandidate
from streams.records import InFlightRequest, Message, RequestRecord
from streams.stages import RetrieveStage

DIM = 8


def hit(example_id: int, similarity: float, response: str = "answer", quality: float | None = None) -> RetrievedExample:
    return RetrievedExample(Example(example_id, "t", f"question {example_id}", response, "m", "large", quality),
                            similarity)


def test_cold_start_keeps_examples_above_the_similarity_threshold_best_first():
    selector = ExampleSelector(SelectionPolicy(threshold=0.6, max_count=5, budget_chars=10_000))
    kept = selector.select(None, [hit(1, 0.55), hit(2, 0.9), hit(3, 0.7)])
    assert [k.example.id for k in kept] == [2, 3]
    assert [k.helpfulness for k in kept] == [pytest.approx(0.9), pytest.approx(0.7)]
    assert not selector.learned


def test_count_and_prompt_budget_are_hard_guards():
    candidates = [hit(i, 0.9 - i / 100) for i in range(1, 8)]
    assert len(ExampleSelector(SelectionPolicy(0.0, 3, 10_000)).select(None, candidates)) == 3
    one = hint_chars(candidates[0])
    kept = ExampleSelector(SelectionPolicy(0.0, 10, 2 * one + 1)).select(None, candidates)
    assert [k.example.id for k in kept] == [1, 2]
    long = hit(9, 0.99, response="x" * 5000)
    kept = ExampleSelector(SelectionPolicy(0.0, 10, 2 * one + 1)).select(None, [long, *candidates])
    assert 9 not in {k.example.id for k in kept}, "an example over the budget is skipped, smaller ones still fit"
    assert ExampleSelector(SelectionPolicy(0.0, 0, 10_000)).select(None, candidates) == []


def test_order_is_deterministic_with_ties_broken_by_id():
    selector = ExampleSelector(SelectionPolicy(0.0, 5, 10_000))
    forward = selector.select(None, [hit(7, 0.8), hit(3, 0.8), hit(5, 0.9)])
    backward = selector.select(None, [hit(5, 0.9), hit(3, 0.8), hit(7, 0.8)])
    assert [k.example.id for k in forward] == [k.example.id for k in backward] == [5, 3, 7]


def _planted_proxy(seed: int = 0) -> tuple[HelpfulnessModel, np.ndarray, np.ndarray]:
    """A proxy trained where examples from direction ``good`` help and those from ``bad`` do not,
    whatever their similarity."""
    rng = np.random.default_rng(seed)
    good, bad = np.eye(DIM)[0], np.eye(DIM)[1]
    pairs, labels = [], []
    for _ in range(120):
        helped = rng.random() < 0.5
        base = good if helped else bad
        example = base + 0.1 * rng.normal(size=DIM)
        example /= np.linalg.norm(example)
        request = example + 0.3 * rng.normal(size=DIM)
        request /= np.linalg.norm(request)
        pairs.append(HelpfulnessPair(request.astype(np.float32), example.astype(np.float32), None, 100))
        labels.append(int(helped))
    model = HelpfulnessModel(DIM)
    assert model.fit(pairs, labels)
    return model, good.astype(np.float32), bad.astype(np.float32)


def test_learned_proxy_overrides_similarity_and_falls_back_when_a_vector_is_missing():
    model, good, bad = _planted_proxy()
    selector = ExampleSelector(SelectionPolicy(0.5, 5, 10_000), model)
    request = (good + bad) / np.linalg.norm(good + bad)
    helpful, unhelpful = hit(1, 0.6), hit(2, 0.95)  # the unhelpful one is the more similar
    vectors = {1: good, 2: bad}
    kept = selector.select(request, [unhelpful, helpful], vectors)
    assert [k.example.id for k in kept] == [1]
    assert kept[0].helpfulness is not None and kept[0].helpfulness > 0.5
    # Without the unhelpful example's vector the request falls back to similarity as a whole.
    assert [k.example.id for k in selector.select(request, [unhelpful, helpful], {1: good})] == [2, 1]


def test_stored_state_round_trips_with_its_threshold():
    model, good, _ = _planted_proxy()
    settings = Settings(learning={"max_examples": 2})
    selector = selector_from_state({"model": model.state_dict(), "threshold": 0.7}, settings, version=3)
    assert selector.learned and selector.version == 3
    assert (selector.policy.threshold, selector.policy.max_count) == (0.7, 2)
    assert selector.policy.budget_chars == settings.max_examples_prompt_chars
    untrained = selector_from_state({"model": HelpfulnessModel(DIM).state_dict()}, settings)
    assert not untrained.learned and untrained.policy.threshold == settings.learning.selection_threshold


async def test_retrieve_stage_applies_stage_two_after_the_search():
    embedder = HashingEmbedder(64)
    history = InMemoryHistoryStore()
    prompts = ["how do I sort a list in python", "how do I sort a dict in python", "bake a chocolate cake"]
    vectors = embedder.embed(prompts)
    await history.admit_examples([ExampleCandidate("default", f"src{i}", p, f"answer {i}", "m", "large", v)
                                  for i, (p, v) in enumerate(zip(prompts, vectors, strict=True))])
    cache = ExampleCache(64)
    await cache.sync_from(history)
    settings = Settings(retrieve_top_k=3, min_similarity=-1.0, learning={"selection_threshold": 0.3, "max_examples": 1})
    record = InFlightRequest(request=RequestRecord(request_id="q", messages=[Message(role="user", content=prompts[0])]))
    record = record.with_embedding(embedder.embed([prompts[0]])[0])
    out = await RetrieveStage(settings, cache, StageTwo(settings)).process([record])
    examples = InFlightRequest.model_validate_json(out[0].value).examples
    assert examples is not None and [e.prompt for e in examples] == [prompts[0]]
    assert examples[0].helpfulness == pytest.approx(examples[0].similarity)
