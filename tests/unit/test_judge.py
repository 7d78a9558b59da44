"""The Judge interface (LLM pairwise, verifiers, cascade), references, and the judge stage's decisions
with doubles for the store and the models."""

from __future__ import annotations

import pytest

from echolm.domain import ChatMessage, GenerationParams, GenerationResult
from echolm.history.feedback_store import Feedback
from echolm.judging.judge import (
    CascadeJudge,
    Judge,
    JudgeTask,
    LlmPairwiseJudge,
    ReferenceBook,
    TaskReference,
    VerifierJudge,
)
from echolm.judging.pairwise import JudgeError, PairwiseJudge
from echolm.protocols import ResponseLog
from echolm.settings import Settings, TierSettings
from streams.judge_stage import JudgeStage
from streams.records import Message, ResponseRecord

TIERS = [TierSettings(name="small", backend="echo", model="s", relative_cost=1.0),
         TierSettings(name="large", backend="echo", model="l", relative_cost=3.0, use_examples=False)]


def scripted_chat(replies: dict[str, str]):
    """A judge model that answers by which response is shown first."""
    async def chat(messages: list[ChatMessage]) -> str:
        text = messages[-1].content
        first = text.index("[Response A]")
        for marker, reply in replies.items():
            if text.find(marker, first) == first + len("[Response A]\n"):
                return reply
        return "no idea"
    return chat


async def test_llm_judge_averages_both_orders_and_maps_to_quality():
    # The candidate "good" is called better in both orders: +2 when second, -2 (A better) when first.
    judge = LlmPairwiseJudge(PairwiseJudge(scripted_chat({"ref": "Score: 2", "good": "Score: -2"})), "m")
    assert isinstance(judge, Judge) and judge.name == "llm:m"
    verdict = await judge.judge(JudgeTask("q", "good", reference_answer="ref"))
    assert (verdict.kind, verdict.score, verdict.detail["outcome"]) == ("pairwise", 2.0, "win")
    assert verdict.quality == pytest.approx(5 / 6)
    assert not judge.accepts(JudgeTask("q", "good"))
    with pytest.raises(JudgeError):
        await judge.judge(JudgeTask("q", "good"))


async def test_verifiers_score_numbers_and_unit_tests():
    numeric = await VerifierJudge().judge(JudgeTask("q", "so the answer is 42.", reference=TaskReference("numeric", "#### 42")))
    assert (numeric.kind, numeric.quality, numeric.detail["passed"]) == ("verifier", 1.0, True)
    wrong = await VerifierJudge().judge(JudgeTask("q", "it is 41", reference=TaskReference("numeric", "42")))
    assert wrong.quality == 0.0
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    tests = TaskReference("python", ("assert add(1, 2) == 3", "assert add(2, 2) == 5"))
    half = await VerifierJudge(timeout_s=10).judge(JudgeTask("q", code, reference=tests))
    assert half.quality == pytest.approx(0.5) and half.judge == "verifier:python"
    program = TaskReference("program", "42")
    ran = await VerifierJudge().judge(JudgeTask("q", "```python\nprint(6 * 7)\n```", reference=program))
    assert (ran.quality, ran.judge) == (1.0, "verifier:program")
    prose = await VerifierJudge().judge(JudgeTask("q", "The answer is 42.", reference=program))
    assert prose.quality == 0.0 and "no fenced code block" in prose.detail["detail"]


async def test_cascade_prefers_the_verifier_when_a_reference_exists():
    llm = LlmPairwiseJudge(PairwiseJudge(scripted_chat({"ref": "Score: 0", "cand": "Score: 0"})), "m")
    cascade = CascadeJudge([VerifierJudge(), llm])
    with_truth = JudgeTask("q", "cand 7", reference_answer="ref", reference=TaskReference("numeric", "7"))
    assert (await cascade.judge(with_truth)).kind == "verifier"
    assert (await cascade.judge(JudgeTask("q", "cand", reference_answer="ref"))).kind == "pairwise"
    with pytest.raises(JudgeError):
        await cascade.judge(JudgeTask("q", "cand"))


def test_reference_book_matches_normalised_prompts_and_reports_bad_lines():
    book = ReferenceBook.from_lines(['{"prompt": "What is  2+2?\\n", "reference": "4"}',
                                     '{"prompt": "add", "reference": ["assert add(1,1)==2"], "kind": "python"}'])
    assert book.lookup("What is 2+2?") == TaskReference("numeric", "4")
    assert book.lookup("add").reference == ("assert add(1,1)==2",) and book.lookup("other") is None
    with pytest.raises(ValueError, match="line 2"):
        ReferenceBook.from_lines(['{"prompt": "a", "reference": "1"}', '{"prompt": "b", "reference": "1", "kind": "x"}'])


class FakeFeedbackStore:
    def __init__(self) -> None:
        self.rows: dict[str, Feedback] = {}

    async def record_feedback(self, items):
        new = [i for i in items if i.feedback_id not in self.rows]
        self.rows.update({i.feedback_id: i for i in items})
        return len(new)

    async def feedback_about(self, request_ids):
        return [f for f in self.rows.values() if f.request_id in request_ids]


class CountingGenerator:
    model_name = "large-model"

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, messages, params: GenerationParams, *, request_id: str) -> GenerationResult:
        self.calls += 1
        return GenerationResult("ref", self.model_name, 5, 3, "stop", 0.01)

    async def aclose(self) -> None:
        pass


def response(request_id: str, tier: str, text: str, prompt: str = "question") -> ResponseRecord:
    return ResponseRecord(request_id=request_id, tenant="default", custom_id=None,
                          messages=[Message(role="user", content=prompt)], text=text, tier=tier, submitted_at=0.0)


def stage(rate: float, references: ReferenceBook | None = None, originals: dict | None = None):
    settings = Settings(tiers=TIERS, learning={"judge_sample_rate": rate})
    store, generator = FakeFeedbackStore(), CountingGenerator()
    judge = CascadeJudge([VerifierJudge(), LlmPairwiseJudge(PairwiseJudge(scripted_chat(
        {"ref": "Score: 1", "good": "Score: -1"})), "judge-model")])

    async def reference():
        return generator

    async def lookup(request_id: str):
        return (originals or {}).get(request_id)

    return JudgeStage(settings, store, judge, reference_generator=reference, original_lookup=lookup,
                      references=references, wait_for_original_s=0.1), store, generator


async def test_sampled_offloaded_answers_are_judged_against_a_fresh_reference_answer_once():
    judge_stage, store, generator = stage(1.0)
    stored = await judge_stage.process([response("r1", "small", "good"), response("r2", "large", "ref")])
    assert len(stored) == 1 and generator.calls == 1, "the reference tier's own answer is not judged"
    verdict = stored[0]
    assert (verdict.request_id, verdict.kind, verdict.source, verdict.tier, verdict.other_tier) == \
        ("r1", "pairwise", "judge", "small", "large")
    assert verdict.score == 1.0 and verdict.detail["reference_answer"] == "ref"
    assert await judge_stage.process([response("r1", "small", "good")]) == [] and generator.calls == 1


async def test_unsampled_answers_are_left_alone_and_references_are_verified_without_generating():
    judge_stage, _, generator = stage(0.0)
    assert await judge_stage.process([response("r1", "small", "good")]) == []
    book = ReferenceBook.from_lines(['{"prompt": "question", "reference": "12"}'])
    judge_stage, _, generator = stage(1.0, references=book)
    stored = await judge_stage.process([response("r1", "large", "it is 12")])
    assert [(f.kind, f.quality, f.tier) for f in stored] == [("verifier", 1.0, "large")] and generator.calls == 0


async def test_a_comparison_is_judged_against_the_original_answer():
    original = ResponseLog("r1", "default", None, [], "question", "ref", "large", "l", [], [], None, None, {}, None,
                           None, None, None, None, None)  # type: ignore[arg-type]
    judge_stage, _, generator = stage(0.0, originals={"r1": original})
    stored = await judge_stage.process([response("r1~vs~small", "small", "good")])
    assert [(f.request_id, f.tier, f.other_tier, f.score) for f in stored] == [("r1", "small", "large", 1.0)]
    assert generator.calls == 0 and stored[0].detail["comparison"] is True
    missing, _, _ = stage(0.0)
    assert await missing.process([response("r9~vs~small", "small", "good")]) == []
