"""The paper's pairwise judge protocol: prompt, parsing, both orders, ties, win rate."""

from __future__ import annotations

import asyncio
import re

import pytest

from echolm.domain import ChatMessage
from echolm.judging.pairwise import (
    JudgeError,
    PairwiseJudge,
    combine_orders,
    judge_messages,
    normalised_quality,
    outcome,
    parse_judge_score,
    should_sample,
    win_rate,
)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Score: 2", 2.0),
        ("B is clearly better.\nScore: +3", 3.0),
        ("Response A is more accurate.\n\n**Score:** -2", -2.0),
        ("score: \u22121", -1.0),
        ("The final score is 0.", 0.0),
        ("A score of 3 would mean B is much better; here Score: 1", 1.0),
        ("[[ -1 ]]", -1.0),
        ("  -2  ", -2.0),
        ("Score: 1.5", 1.5),
        ("Score: 8", None),  # another scale: rejected, not clamped
        ("Response B scored higher on 2 criteria", None),
        ("I cannot decide.", None),
        ("", None),
    ],
)
def test_parse_judge_score(reply, expected):
    assert parse_judge_score(reply) == expected


def test_prompt_shows_both_responses_in_order():
    messages = judge_messages("What is 2+2?", "four", "4")
    assert [m.role for m in messages] == ["system", "user"]
    user = messages[1].content
    assert user.index("[Request]") < user.index("[Response A]\nfour") < user.index("[Response B]\n4")
    assert "-3" in user and "Score: N" in user


def test_order_averaging_swaps_and_negates():
    assert combine_orders(2.0, -2.0) == 2.0  # consistent judge: candidate better in both positions
    assert combine_orders(1.0, 1.0) == 0.0  # position bias alone (always prefers B) cancels out
    assert combine_orders(3.0, -1.0) == 2.0
    assert combine_orders(None, -1.0) == 1.0
    assert combine_orders(2.0, None) == 2.0
    assert combine_orders(None, None) is None


def test_ties_and_win_rate():
    assert outcome(0.3) == "tie" and outcome(-0.3) == "tie" and outcome(0.31) == "win" and outcome(-0.5) == "loss"
    scores = [2.0, 0.5, 0.0, 0.3, -0.3, -1.0, -3.0, 1.0]  # 3 wins, 3 ties, 2 losses
    assert win_rate(scores) == pytest.approx((3 + 0.5 * 3) / 8)
    assert win_rate([0.0, 0.0]) == 0.5  # parity
    assert win_rate([0.5], tie_margin=1.0) == 0.5
    with pytest.raises(ValueError):
        win_rate([])


def test_normalised_quality():
    assert normalised_quality(-3) == 0.0 and normalised_quality(0) == 0.5 and normalised_quality(3) == 1.0
    assert normalised_quality(9) == 1.0


def test_should_sample_is_stable_and_close_to_the_rate():
    ids = [f"req-{i}" for i in range(20_000)]
    picked = [should_sample(i, 0.1) for i in ids]
    assert abs(sum(picked) / len(ids) - 0.1) < 0.01
    assert picked == [should_sample(i, 0.1) for i in ids]
    assert not should_sample("x", 0.0) and should_sample("x", 1.0)


def _fake_judge(bias: float = 0.0):
    """A judge that prefers the response containing 'good', plus a fixed lean towards position B."""

    async def generate(messages: list[ChatMessage]) -> str:
        text = messages[-1].content
        a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", text, re.DOTALL).group(1)
        b = re.search(r"\[Response B\]\n(.*?)\n\n", text, re.DOTALL).group(1)
        raw = 2.0 * (("good" in b) - ("good" in a)) + bias
        return f"Some reasoning.\nScore: {max(-3.0, min(3.0, raw))}"

    return generate


async def test_judge_compares_in_both_orders():
    judge = PairwiseJudge(_fake_judge())
    better = await judge.compare("q", candidate="a good answer", reference="a poor answer")
    assert (better.score, better.outcome, better.forward, better.backward) == (2.0, "win", 2.0, -2.0)
    worse = await judge.compare("q", candidate="a poor answer", reference="a good answer")
    assert worse.score == -2.0 and worse.outcome == "loss"


async def test_position_bias_cancels():
    judge = PairwiseJudge(_fake_judge(bias=1.0))
    same = await judge.compare("q", candidate="answer one", reference="answer two")
    assert same.score == 0.0 and same.outcome == "tie"
    better = await judge.compare("q", candidate="a good answer", reference="a poor answer")
    assert better.forward == 3.0 and better.backward == -1.0 and better.score == 2.0


async def test_one_failed_order_is_tolerated_and_none_raises():
    calls = 0

    async def flaky(messages: list[ChatMessage]) -> str:
        nonlocal calls
        calls += 1
        if "[Response A]\nmine" in messages[-1].content:
            await asyncio.sleep(10)  # this order hangs: cut by the timeout
        return "Score: 1"

    judge = PairwiseJudge(flaky, timeout_s=0.2)
    verdict = await judge.compare("q", candidate="mine", reference="theirs")
    assert calls == 2 and verdict.forward == 1.0 and verdict.backward is None and verdict.score == 1.0

    async def rambling(messages: list[ChatMessage]) -> str:
        return "Both have merits."

    with pytest.raises(JudgeError):
        await PairwiseJudge(rambling).compare("q", "a", "b")


async def test_single_order_mode():
    seen: list[str] = []

    async def generate(messages: list[ChatMessage]) -> str:
        seen.append(messages[-1].content)
        return "Score: -1"

    verdict = await PairwiseJudge(generate, both_orders=False).compare("q", "cand", "ref")
    assert len(seen) == 1 and verdict.score == -1.0 and verdict.outcome == "loss"
