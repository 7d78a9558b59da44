"""How retrieved examples are put in front of the small model.

When there are examples, the hints go in one of three layouts (``PromptLayout``). In ``hints-first``
and ``paper`` the system message becomes the user's own (or ``DEFAULT_SYSTEM_PROMPT``) followed by
``HINT_GUIDANCE``, a fixed text telling the model how to treat hints (judge their relevance, quality
and helpfulness; ignore unrelated ones; follow good format; use helpful information), and the last
user turn is rewritten:

* ``hints-first`` (the default): ``HINTS_HEADER``; each example framed as a *hint*, "a solved similar
  request"; ``HINTS_REMINDER`` (they guide, not dictate); ``REQUEST_HEADER`` and the instruction,
  once, last.
* ``paper``: the paper's order: the instruction; ``HINTS_HEADER``; the hints; ``HINTS_REMINDER``;
  ``REQUEST_AGAIN`` and the instruction repeated.
* ``system``: the system message becomes the user's own (or the default) followed by
  ``SYSTEM_HINTS_HEADER`` and the hints, with no guidance text; the user's turns stay exactly as sent.

Why hints-first is the default: with the paper's order, Qwen2.5-Coder-0.5B stopped reasoning on
GSM8K and answered with one line copied from a hint ("The answer is 16" for 5 of 5 different
questions, 11 tokens each), while hints-first kept its step-by-step answers (2 of 5 right, the same
as without hints) and changed nothing on MBPP (2 of 10 either way, same-task hints). It also shares
more with other requests: everything up to the first hint is byte-identical across requests, so a
serving engine's prefix cache reuses it.

Why ``system`` exists: on GSM8K problems asked again with other numbers (the ``gsm8k-numbers``
workload), given the same problem's published worked solution as its one hint, Qwen2.5-Coder-0.5B
answered with a bare final line ("The answer is 108.") with ``hints-first`` (38 of 40) and ``paper``
(40 of 40) and solved 1 of 40, against 5 of 40 alone; with ``system`` it redid the solution's steps
with the request's numbers and solved 16 of 40 (``bench/probe_hint_layouts.py``, session 4). The
position is not what matters: ``hints-first`` with ``HINT_GUIDANCE`` replaced by one neutral sentence
solved 15 of 40. The guidance text ("follow the format of good solutions") is what turns the small
model to the final line when the hint is terse; ``system`` carries none. With the large tier's own,
longer answers as hints the failure mostly disappears (system 12, hints-first 9, alone 5 of 40).
Neither is the default yet: ``echolm eval`` has not
measured them on every workload (the guidance is the paper's and was in place for the MBPP results).

Examples are never earlier chat turns: as fake turns, the small
model copied the foreign answer verbatim (MBPP: 7% pass with the same task's solution in another
language as a chat turn, 30% framed as a hint).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from echolm.domain import ChatMessage, RetrievedExample

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

HINT_GUIDANCE = (
    "The user's request may come with hints: requests similar to it that were solved before, each with "
    "its solution. Judge each hint's relevance, quality and helpfulness for the current request. Ignore "
    "hints that are unrelated to it. Follow the format of good solutions and use the helpful information "
    "they contain, but answer the current request itself: keep its language, names, numbers and "
    "requirements, even where a hint differs."
)

HINTS_HEADER = "Below are solved similar requests, given as hints. They may differ from my request."

HINTS_REMINDER = (
    "The hints above only guide you; they do not dictate your answer. Do not copy a hint's answer "
    "where my request differs from it."
)

REQUEST_AGAIN = "My request again:"

REQUEST_HEADER = "### My request"

SYSTEM_HINTS_HEADER = "Solved similar requests, for reference only:"

PromptLayout = Literal["hints-first", "paper", "system"]


def order_examples(examples: Sequence[RetrievedExample]) -> list[RetrievedExample]:
    """Most similar first; ties broken by example id so the prompt is reproducible."""
    return sorted(examples, key=lambda e: (-e.similarity, e.example.id))


def render_hint(number: int, example: RetrievedExample) -> str:
    """One example framed as a hint (never as an earlier chat turn)."""
    return (
        f"### Hint {number}: a solved similar request\n"
        f"Request:\n{example.example.prompt.strip()}\n\n"
        f"Solution:\n{example.example.response.strip()}"
    )


def select_within_budget(examples: Sequence[RetrievedExample], budget_chars: int) -> list[RetrievedExample]:
    """Examples in prompt order whose rendered hints fit in ``budget_chars`` together.

    Whole examples only: one that does not fit is dropped and the next, possibly shorter, is tried.
    """
    chosen: list[RetrievedExample] = []
    used = 0
    for example in order_examples(examples):
        size = len(render_hint(len(chosen) + 1, example))
        if used + size <= budget_chars:
            chosen.append(example)
            used += size
    return chosen


def build_messages(
    messages: Sequence[ChatMessage],
    examples: Sequence[RetrievedExample],
    *,
    budget_chars: int,
    layout: PromptLayout = "hints-first",
) -> list[ChatMessage]:
    """The request's messages with ``examples`` folded in as hints (see the module docstring).

    With no examples (or none fitting ``budget_chars``, or no user turn to attach them to) the
    messages are returned unchanged.
    """
    chosen = select_within_budget(examples, budget_chars)
    last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
    if not chosen or last_user is None:
        return list(messages)

    hints = "\n\n".join(render_hint(i, example) for i, example in enumerate(chosen, start=1))
    rest = list(messages)
    system_text = rest.pop(0).content if rest and rest[0].role == "system" else DEFAULT_SYSTEM_PROMPT
    if layout == "system":
        system = f"{system_text} {SYSTEM_HINTS_HEADER}\n\n{hints}"
        return [ChatMessage(role="system", content=system), *rest]

    instruction = messages[last_user].content.strip()
    if layout == "paper":
        user_content = f"{instruction}\n\n{HINTS_HEADER}\n\n{hints}\n\n{HINTS_REMINDER}\n\n{REQUEST_AGAIN}\n{instruction}"
    else:
        user_content = f"{HINTS_HEADER}\n\n{hints}\n\n{HINTS_REMINDER}\n\n{REQUEST_HEADER}\n{instruction}"

    if messages[0].role == "system":
        last_user -= 1
    rest[last_user] = ChatMessage(role="user", content=user_content)
    return [ChatMessage(role="system", content=f"{system_text}\n\n{HINT_GUIDANCE}"), *rest]
