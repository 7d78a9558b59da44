"""The evaluation's trained stage 2: a proxy fitted on other groups' outcomes keeps the examples that helped."""

from __future__ import annotations

from pathlib import Path

import pytest

from echolm.datasets import TaskItem
from echolm.evaluation.generation_cache import CachedGeneration, GenerationCache
from echolm.evaluation.harness import MissingGenerations, WorkloadRun
from echolm.evaluation.quality import VerdictCache
from echolm.evaluation.stage2 import TRAINING_ARMS, labelled_pairs, learned_selections
from echolm.evaluation.workload import Workload
from echolm.settings import Settings
from echolm.testing import HashingEmbedder

TOPICS = ["apples orchard harvest baskets", "trains station platform tickets", "rivers bridges boats fishing",
          "planets orbit telescope stars", "bakery bread flour ovens", "chess board pieces moves"]


def _item(item_id: str, prompt: str, answer: int) -> TaskItem:
    return TaskItem(item_id, item_id, prompt, f"#### {answer}", str(answer), (), None)


def _run(tmp_path: Path) -> tuple[WorkloadRun, VerdictCache]:
    """Six cached topics; traffic asks about each topic again (a close example exists) and about unrelated
    things (no close example). Planted outcome: the small model passes exactly when one of its examples
    is the request's own topic."""
    cache_part = [_item(f"c{i}", f"{topic} question number {i}", i) for i, topic in enumerate(TOPICS)]
    close = [_item(f"t{i}", f"{topic} another question {i}", 100 + i) for i, topic in enumerate(TOPICS)]
    unrelated = [_item(f"u{i}", f"unrelated words zebra{i} quartz{i} lantern{i} velvet{i}", 200 + i)
                 for i in range(6)]
    workload = Workload(name="planted", cache=tuple(cache_part), traffic=tuple(close + unrelated),
                        verifier="numeric", max_tokens=16)
    settings = Settings(retrieve_top_k=3)
    cache = GenerationCache(tmp_path / "gen")
    run = WorkloadRun.build(workload, settings, cache, HashingEmbedder(256), k=2, seed=0)
    for job in run.cache_jobs():
        cache.put(job, CachedGeneration(job.key, job.model, "cached answer", 10, 5, "stop", 0.1, None, None))
    for item in workload.unique_traffic:
        own_topic = next((i for i, c in enumerate(cache_part) if item.id == f"t{i}"), None)
        for arm_name in TRAINING_ARMS:
            arm = run.arm_for(item, arm_name)
            helped = own_topic is not None and own_topic in arm.examples
            text = f"The answer is {item.answer if helped else -1}."
            job = run.job(item, arm)
            cache.put(job, CachedGeneration(job.key, job.model, text, 50, 5, "stop", 0.1, None, None))
    return run, VerdictCache(tmp_path / "verdicts")


def test_pairs_carry_the_verdict_of_the_answer_served_with_them(tmp_path: Path) -> None:
    run, verdicts = _run(tmp_path)
    pairs = labelled_pairs(run, verdicts)

    assert set(pairs) == {item.id for item in run.workload.unique_traffic}
    assert all(len(rows) == 4 for rows in pairs.values())  # k = 2 examples on each of the two arms
    assert any(label for _, label in pairs["t0"]) and not any(label for _, label in pairs["u0"])


def test_trained_stage_2_keeps_the_close_example_and_drops_examples_for_unrelated_requests(tmp_path: Path) -> None:
    run, verdicts = _run(tmp_path)
    selections = learned_selections(run, verdicts, threshold=0.5, max_count=2)

    for i in range(len(TOPICS)):
        assert i in selections[f"t{i}"], selections
    assert sum(len(selections[f"u{i}"]) for i in range(6)) == 0, selections


def test_missing_training_generations_are_reported_not_guessed(tmp_path: Path) -> None:
    workload = Workload(name="empty", cache=(_item("c0", TOPICS[0], 0),), traffic=(_item("t0", TOPICS[0], 1),),
                        verifier="numeric", max_tokens=16)
    run = WorkloadRun.build(workload, Settings(), GenerationCache(tmp_path / "gen"), HashingEmbedder(64), k=1, seed=0)
    with pytest.raises(MissingGenerations):
        learned_selections(run, VerdictCache(tmp_path / "verdicts"), threshold=0.5, max_count=1)


def test_a_run_with_replayed_cache_answers_prompts_with_them_and_keeps_the_original(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    item = run.workload.unique_traffic[0]
    arm = run.arm_for(item, "small+nearest")
    replayed = run.with_cache_answers([f"replayed answer {i}" for i in range(len(run.workload.cache))])

    new_job, old_job = replayed.job(item, arm), run.job(item, arm)
    assert "replayed answer" in "".join(m.content for m in new_job.messages)
    assert "replayed answer" not in "".join(m.content for m in old_job.messages)
    assert new_job.key != old_job.key  # served again, not read from the old answers
    assert [e.response for e in run.examples()] == ["cached answer"] * len(TOPICS)
    with pytest.raises(ValueError, match="answers for a cache part"):
        run.with_cache_answers(["too few"])
