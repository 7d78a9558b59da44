"""How retrieved examples are put in front of the small model (the paper's prompt layout).

Layout, when there are examples:

1. the system message: the user's own (or ``DEFAULT_SYSTEM_PROMPT``) followed by ``HINT_GUIDANCE``,
   a fixed text telling the model how to treat hints (judge their relevance, quality and
   helpfulness; ignore unrelated ones; follow good format; use helpful information);
2. the last user turn, rewritten as: the instruction; ``HINTS_HEADER``; each example framed as a
   *hint*, "a solved similar request"; ``HINTS_REMINDER`` (they guide, not dictate); the instruction
   again.

Everything that does not depend on the request comes first and is byte-identical across requests,
so a serving engine's prefix cache reuses it. Examples are hints inside the user's turn and never
earlier chat turns: as fake turns, the small model copied the foreign answer verbatim (MBPP: 7% pass
with the same task's solution in another language as a chat turn, 30% framed as a hint).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    messages: Sequence[ChatMessage], examples: Sequence[RetrievedExample], *, budget_chars: int
) -> list[ChatMessage]:
    """The request's messages with ``examples`` folded in as hints (see the module docstring).

    With no examples (or none fitting ``budget_chars``, or no user turn to attach them to) the
    messages are returned unchanged.
    """
    chosen = select_within_budget(examples, budget_chars)
    last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
    if not chosen or last_user is None:
        return list(messages)

    instruction = messages[last_user].content.strip()
    hints = "\n\n".join(render_hint(i, example) for i, example in enumerate(chosen, start=1))
    user_content = f"{instruction}\n\n{HINTS_HEADER}\n\n{hints}\n\n{HINTS_REMINDER}\n\n{REQUEST_AGAIN}\n{instruction}"

    rest = list(messages)
    if rest and rest[0].role == "system":
        system_text = rest.pop(0).content
        last_user -= 1
    else:
        system_text = DEFAULT_SYSTEM_PROMPT
    rest[last_user] = ChatMessage(role="user", content=user_content)
    return [ChatMessage(role="system", content=f"{system_text}\n\n{HINT_GUIDANCE}"), *rest]
