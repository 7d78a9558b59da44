"""The prompt layout that folds retrieved examples into a request as hints."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from echolm.domain import ChatMessage, Example, RetrievedExample
from echolm.prompting import (
    DEFAULT_SYSTEM_PROMPT,
    HINT_GUIDANCE,
    HINTS_HEADER,
    HINTS_REMINDER,
    REQUEST_AGAIN,
    REQUEST_HEADER,
    SYSTEM_HINTS_HEADER,
    build_messages,
    render_hint,
    select_within_budget,
)

BIG_BUDGET = 100_000


def _example(example_id: int, similarity: float, prompt: str = "", response: str = "") -> RetrievedExample:
    return RetrievedExample(
        example=Example(
            id=example_id,
            tenant="t",
            prompt=prompt or f"request number {example_id}",
            response=response or f"answer number {example_id}",
            model="large-model",
            tier="large",
        ),
        similarity=similarity,
    )


def _request(text: str = "Write a Python function that reverses a list.") -> list[ChatMessage]:
    return [ChatMessage("user", text)]


def test_without_examples_the_messages_are_returned_unchanged() -> None:
    messages = [ChatMessage("system", "Be terse."), ChatMessage("user", "Hi")]
    assert build_messages(messages, [], budget_chars=BIG_BUDGET) == messages


def test_default_layout_puts_the_hints_first_and_the_request_once_at_the_end() -> None:
    instruction = "Write a Python function that reverses a list."
    out = build_messages(_request(instruction), [_example(1, 0.9)], budget_chars=BIG_BUDGET)

    assert [m.role for m in out] == ["system", "user"]
    assert out[0].content == f"{DEFAULT_SYSTEM_PROMPT}\n\n{HINT_GUIDANCE}"
    user = out[1].content
    assert user.startswith(HINTS_HEADER)
    positions = [user.index("a solved similar request"), user.index("answer number 1"), user.index(HINTS_REMINDER),
                 user.index(REQUEST_HEADER)]
    assert positions == sorted(positions)
    assert user.endswith(f"{REQUEST_HEADER}\n{instruction}") and user.count(instruction) == 1
    assert REQUEST_AGAIN not in user


def test_hints_first_layout_shares_everything_before_the_hints_across_requests() -> None:
    first = build_messages(_request("Sort a list."), [_example(1, 0.9)], budget_chars=BIG_BUDGET)
    second = build_messages(_request("Compute a factorial."), [_example(7, 0.5)], budget_chars=BIG_BUDGET)

    assert first[0] == second[0]
    shared = first[1].content.index("### Hint 1")
    assert first[1].content[:shared] == second[1].content[:shared]


def test_paper_layout_follows_the_paper_order() -> None:
    instruction = "Write a Python function that reverses a list."
    out = build_messages(_request(instruction), [_example(1, 0.9)], budget_chars=BIG_BUDGET, layout="paper")

    assert [m.role for m in out] == ["system", "user"]
    assert out[0].content == f"{DEFAULT_SYSTEM_PROMPT}\n\n{HINT_GUIDANCE}"
    user = out[1].content
    positions = [
        user.index(instruction),
        user.index(HINTS_HEADER),
        user.index("a solved similar request"),
        user.index("answer number 1"),
        user.index(HINTS_REMINDER),
        user.rindex(instruction),
    ]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert user.startswith(instruction) and user.endswith(instruction)


def test_system_layout_puts_the_hints_in_the_system_message_and_keeps_the_user_turns() -> None:
    messages = [ChatMessage("system", "Be terse."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello"),
                ChatMessage("user", "Sort a list.")]
    examples = [_example(2, 0.5), _example(1, 0.9)]
    out = build_messages(messages, examples, budget_chars=BIG_BUDGET, layout="system")

    assert out[1:] == messages[1:]
    system = out[0]
    assert system.role == "system"
    assert system.content.startswith(f"Be terse. {SYSTEM_HINTS_HEADER}")
    # most similar first, framed as hints, in the system message only
    assert system.content.index("### Hint 1") < system.content.index("answer number 1")
    assert system.content.index("answer number 1") < system.content.index("### Hint 2")
    assert system.content.index("### Hint 2") < system.content.index("answer number 2")
    assert all("answer number" not in m.content for m in out[1:])


def test_system_layout_without_a_system_message_uses_the_default_one() -> None:
    out = build_messages(_request("Sort a list."), [_example(1, 0.9)], budget_chars=BIG_BUDGET, layout="system")

    assert [m.role for m in out] == ["system", "user"]
    assert out[0].content.startswith(f"{DEFAULT_SYSTEM_PROMPT} {SYSTEM_HINTS_HEADER}")
    assert out[1] == ChatMessage("user", "Sort a list.")


def test_examples_are_hints_inside_the_user_turn_never_earlier_chat_turns() -> None:
    examples = [_example(i, 0.9 - i / 100) for i in range(1, 4)]
    out = build_messages(_request(), examples, budget_chars=BIG_BUDGET)

    assert [m.role for m in out] == ["system", "user"]
    for example in examples:
        assert example.example.prompt in out[1].content
        assert example.example.response in out[1].content


def test_the_users_own_system_message_is_kept_first() -> None:
    messages = [ChatMessage("system", "You answer in French."), ChatMessage("user", "Reverse a list.")]
    out = build_messages(messages, [_example(1, 0.9)], budget_chars=BIG_BUDGET)

    assert out[0].role == "system"
    assert out[0].content.startswith("You answer in French.")
    assert HINT_GUIDANCE in out[0].content
    assert sum(m.role == "system" for m in out) == 1


def test_shared_prefix_is_byte_identical_across_requests() -> None:
    first = build_messages(_request("Sort a list."), [_example(1, 0.9)], budget_chars=BIG_BUDGET)
    second = build_messages(_request("Compute a factorial."), [_example(7, 0.5), _example(8, 0.6)], budget_chars=BIG_BUDGET)

    assert first[0] == second[0]


def test_only_the_last_user_turn_is_rewritten_in_a_conversation() -> None:
    messages = [
        ChatMessage("user", "First question"),
        ChatMessage("assistant", "First answer"),
        ChatMessage("user", "Follow-up question"),
    ]
    out = build_messages(messages, [_example(1, 0.9)], budget_chars=BIG_BUDGET)

    assert out[1:3] == messages[:2]
    assert out[3].role == "user" and out[3].content.endswith("Follow-up question")
    assert HINTS_HEADER not in out[1].content


def test_examples_are_ordered_by_similarity_then_id_whatever_the_input_order() -> None:
    examples = [_example(5, 0.7), _example(2, 0.9), _example(9, 0.7), _example(1, 0.8)]
    expected = build_messages(_request(), examples, budget_chars=BIG_BUDGET)
    shuffled = examples[:]
    random.Random(3).shuffle(shuffled)

    out = build_messages(_request(), shuffled, budget_chars=BIG_BUDGET)

    assert out == expected
    user = out[1].content
    order = [user.index(f"answer number {i}") for i in (2, 1, 5, 9)]
    assert order == sorted(order)


def test_budget_drops_whole_examples_and_keeps_later_ones_that_fit() -> None:
    long_one = _example(1, 0.95, response="x" * 5_000)
    short_ones = [_example(2, 0.9), _example(3, 0.8)]
    budget = sum(len(render_hint(i, e)) for i, e in enumerate(short_ones, start=1))

    out = build_messages(_request(), [long_one, *short_ones], budget_chars=budget)

    user = out[1].content
    assert "x" * 10 not in user
    assert "answer number 2" in user and "answer number 3" in user
    assert "### Hint 1: " in user and "### Hint 2: " in user and "### Hint 3" not in user


def test_nothing_fits_returns_the_messages_unchanged() -> None:
    messages = _request()
    assert build_messages(messages, [_example(1, 0.9)], budget_chars=10) == messages
    assert build_messages(messages, [_example(1, 0.9)], budget_chars=0) == messages


def test_no_user_turn_leaves_the_messages_unchanged() -> None:
    messages = [ChatMessage("system", "Only a system prompt")]
    assert build_messages(messages, [_example(1, 0.9)], budget_chars=BIG_BUDGET) == messages


@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.floats(-1, 1, allow_nan=False), st.integers(0, 400)),
        max_size=8,
        unique_by=lambda t: t[0],
    ),
    st.integers(0, 2_000),
)
def test_selected_hints_fit_the_budget_and_keep_the_order(raw: list[tuple[int, float, int]], budget: int) -> None:
    examples = [_example(i, sim, response="y" * n) for i, sim, n in raw]

    chosen = select_within_budget(examples, budget)

    assert sum(len(render_hint(i, e)) for i, e in enumerate(chosen, start=1)) <= budget
    keys = [(-e.similarity, e.example.id) for e in chosen]
    assert keys == sorted(keys)
