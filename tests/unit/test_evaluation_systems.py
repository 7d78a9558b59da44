"""Systems: arms, example choice, prompts as the pipeline builds them, routers' thresholds and scores."""

from __future__ import annotations

import numpy as np
import pytest

from echolm.datasets import TaskItem
from echolm.domain import GenerationParams
from echolm.evaluation.generation_cache import GenerationJob
from echolm.evaluation.systems import (
    Arm,
    ArmFactory,
    Choice,
    SimilarityTable,
    arm_messages,
    cache_examples,
    job_for,
    random_examples,
    similarity_weighted_scores,
    sweep_thresholds,
    threshold_choices,
)
from echolm.prompting import HINTS_HEADER


def _unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


CACHE_VECTORS = np.stack([_unit([1, 0, 0]), _unit([0, 1, 0]), _unit([1, 1, 0]), _unit([0, 0, 1])])
REQUESTS = {"a": _unit([1, 0.1, 0]), "b": _unit([0, 0, 1])}
TABLE = SimilarityTable(list(REQUESTS), np.stack(list(REQUESTS.values())), CACHE_VECTORS)
ITEM = TaskItem("a", "ga", "Request A", "ref", "1", (), None)
CACHE_ITEMS = [TaskItem(f"c{i}", f"c{i}", f"cached request {i}", "", None, (), None) for i in range(4)]


def test_nearest_is_ordered_by_similarity_and_respects_cache_size() -> None:
    assert [i for i, _ in TABLE.nearest("a", 2)] == [0, 2]
    assert [i for i, _ in TABLE.nearest("a", 2, cache_size=2)] == [0, 1]
    assert [i for i, _ in TABLE.nearest("a", 2, exclude=lambda i: i == 0)] == [2, 1]
    assert TABLE.best("b") == (3, pytest.approx(1.0))


def test_random_examples_are_reproducible_distinct_and_in_range() -> None:
    picked = random_examples("a", 3, 10, seed=0)
    assert picked == random_examples("a", 3, 10, seed=0)
    assert len(set(picked)) == 3 and all(0 <= i < 10 for i in picked)
    assert random_examples("a", 5, 2, seed=0) == (0, 1)


def test_arm_factory_names_arms() -> None:
    factory = ArmFactory(TABLE, cache_size=4, k=2)
    assert factory.nearest("a") == Arm("small+nearest", "small", (0, 2))
    assert factory.nearest("a", cache_size=2).name == "small+nearest@2"
    assert factory.large().examples == ()


def test_messages_are_the_pipelines_hint_layout() -> None:
    examples = cache_examples(CACHE_ITEMS, ["answer 0", "answer 1", "answer 2", "answer 3"], "big")
    plain = arm_messages(ITEM, Arm("large", "large"), examples, None, 6000)
    assert [m.content for m in plain] == ["Request A"]
    hinted = arm_messages(ITEM, Arm("small+nearest", "small", (2, 0)), examples, TABLE.row("a"), 6000)
    assert hinted[0].role == "system"
    user = hinted[-1].content
    assert HINTS_HEADER in user and user.index("answer 0") < user.index("answer 2")  # most similar first


def test_jobs_key_on_model_messages_and_sampling() -> None:
    examples = cache_examples(CACHE_ITEMS, ["x"] * 4, "big")
    make = lambda arm, tokens: job_for(ITEM, arm, examples=examples, table=TABLE,  # noqa: E731
                                       models={"small": "s", "large": "l"}, max_tokens=tokens, temperature=0.0,
                                       budget_chars=6000)
    base = make(Arm("small", "small"), 100)
    assert base.key == make(Arm("small", "small"), 100).key
    assert base.key != make(Arm("small", "small"), 101).key
    assert base.key != make(Arm("large", "large"), 100).key
    assert base.key != make(Arm("small+nearest", "small", (0,)), 100).key
    assert isinstance(base, GenerationJob) and base.params == GenerationParams(max_tokens=100, temperature=0.0)


def test_threshold_choices_and_sweep() -> None:
    scores = {"a": 0.9, "b": 0.4}
    choices = threshold_choices(scores, 0.5, Choice(arm="small"), Choice(arm="large"))
    assert choices == {"a": Choice(arm="small"), "b": Choice(arm="large")}
    per_request = {"a": Choice(cached_index=1), "b": Choice(cached_index=2)}
    assert threshold_choices(scores, 0.0, per_request, Choice(arm="large"))["b"] == Choice(cached_index=2)
    thresholds = sweep_thresholds(scores.values())
    assert len(thresholds) == 3 and thresholds[0] < 0.4 and thresholds[-1] > 0.9  # from all offloaded to none
    assert thresholds[1] == 0.65  # between the scores, never on one: float noise must not flip a decision
    assert [sorted(r for r, s in scores.items() if s >= t) for t in thresholds] == [["a", "b"], ["a"], []]
    assert sweep_thresholds([]) == [1.0]


def test_similarity_weighted_scores_leave_one_out_and_skip_the_same_group() -> None:
    vectors = np.stack([_unit([1, 0]), _unit([1, 0.05]), _unit([0, 1]), _unit([0.05, 1])])
    ids = ["p", "q", "r", "s"]
    labels = {"p": 1.0, "q": 1.0, "r": 0.0, "s": 0.0}
    scores = similarity_weighted_scores(ids, vectors, ["g1", "g2", "g3", "g4"], labels, {})
    assert scores["p"] > 0.9 and scores["r"] < 0.1  # neighbours' outcomes, never its own
    same_group = similarity_weighted_scores(ids, vectors, ["g1", "g1", "g3", "g4"], labels, {})
    assert same_group["p"] < 0.5  # q (its near-duplicate) is excluded, so the far r/s dominate
