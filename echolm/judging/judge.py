"""One ``Judge`` interface over the two kinds of autorater (issue: "Quality signal"):

* ``LlmPairwiseJudge``: the paper's pairwise LLM judge (``judging.pairwise.PairwiseJudge``: score -3..+3,
  both orders, ties within +-0.3) over any ``Generator`` (a configured tier, or a separate endpoint).
  It needs a second answer to the same request to compare with (the large tier's, as the paper does).
* ``VerifierJudge``: task verifiers for requests with references (``judging.verifiers``): GSM8K-style
  final-number match, or running unit tests in the sandboxed, resource-limited subprocess.

``CascadeJudge`` asks its judges in order and uses the first that accepts the task (a verifier where a
reference exists: exact and cheap; else the LLM judge). Every verdict comes as a ``Judgement`` whose
``quality`` in [0, 1] is what the router and the helpfulness proxy learn from.

``ReferenceBook`` holds verifier references, looked up by the request's text (whitespace-normalised):
a JSONL file of ``{"prompt": ..., "reference": ..., "kind": "numeric" | "program" | "python", "setup": ...}``
(``program``: the answer is a program whose last printed number must match the reference's).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from echolm.domain import ChatMessage, GenerationParams
from echolm.judging.pairwise import JudgeError, PairwiseJudge, normalised_quality
from echolm.judging.verifiers import numeric_answer_match, program_answer_match, run_python_tests_async
from echolm.protocols import Generator

ReferenceKind = Literal["numeric", "program", "python"]
REFERENCE_KINDS: tuple[ReferenceKind, ...] = ("numeric", "program", "python")


@dataclass(frozen=True, slots=True)
class TaskReference:
    """Ground truth for a verifier: a number (or a worked solution ending in one), or test code."""

    kind: ReferenceKind
    reference: str | tuple[str, ...]
    setup: str = ""


@dataclass(frozen=True, slots=True)
class JudgeTask:
    """What is judged: ``candidate``, an answer to ``request``; with another answer to compare it to
    (``reference_answer``, pairwise) and/or ground truth (``reference``, verifiers)."""

    request: str
    candidate: str
    reference_answer: str | None = None
    reference: TaskReference | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    """A verdict. ``score``: pairwise -3..+3 (positive: the candidate is better than the reference
    answer) or a verifier's fraction passed; ``quality``: the candidate's quality in [0, 1]."""

    kind: Literal["pairwise", "verifier"]
    score: float
    quality: float
    judge: str
    detail: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Judge(Protocol):
    """An autorater. ``judge`` raises ``JudgeError`` when it reaches no verdict (never hangs)."""

    @property
    def name(self) -> str: ...

    def accepts(self, task: JudgeTask) -> bool: ...

    async def judge(self, task: JudgeTask) -> Judgement: ...


def generator_chat(generator: Generator, *, max_tokens: int, request_id: str = "judge") -> Callable[[list[ChatMessage]], Awaitable[str]]:
    """A ``PairwiseJudge`` chat function over a tier's ``Generator`` (greedy decoding)."""
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)

    async def chat(messages: list[ChatMessage]) -> str:
        result = await generator.generate(messages, params, request_id=request_id)
        return result.text

    return chat


class LlmPairwiseJudge:
    """The pairwise LLM judge: candidate vs ``reference_answer``, both orders."""

    def __init__(self, pairwise: PairwiseJudge, model: str) -> None:
        self._pairwise = pairwise
        self.model = model

    @classmethod
    def over(cls, generator: Generator, *, max_tokens: int = 192, timeout_s: float = 120.0) -> LlmPairwiseJudge:
        chat = generator_chat(generator, max_tokens=max_tokens)
        return cls(PairwiseJudge(chat, timeout_s=timeout_s), generator.model_name)

    @property
    def name(self) -> str:
        return f"llm:{self.model}"

    def accepts(self, task: JudgeTask) -> bool:
        return bool(task.reference_answer and task.reference_answer.strip())

    async def judge(self, task: JudgeTask) -> Judgement:
        if not self.accepts(task):
            raise JudgeError("the pairwise judge needs a reference answer")
        assert task.reference_answer is not None
        verdict = await self._pairwise.compare(task.request, task.candidate, task.reference_answer)
        return Judgement("pairwise", verdict.score, normalised_quality(verdict.score), self.name,
                         {"outcome": verdict.outcome, "forward": verdict.forward, "backward": verdict.backward})


class VerifierJudge:
    """Task verifiers: numeric answer match, or unit tests in a sandboxed subprocess."""

    def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 512) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    @property
    def name(self) -> str:
        return "verifier"

    def accepts(self, task: JudgeTask) -> bool:
        return task.reference is not None

    async def judge(self, task: JudgeTask) -> Judgement:
        reference = task.reference
        if reference is None:
            raise JudgeError("no reference to verify against")
        if reference.kind in ("numeric", "program"):
            text = reference.reference if isinstance(reference.reference, str) else reference.reference[-1]
            try:
                if reference.kind == "program":  # runs the program: off the event loop, like the tests
                    verdict = await asyncio.to_thread(program_answer_match, task.candidate, text, self.timeout_s,
                                                      self.memory_mb)
                else:
                    verdict = numeric_answer_match(task.candidate, text)
            except ValueError as exc:
                raise JudgeError(f"unusable numeric reference: {exc}") from exc
        else:
            tests = [reference.reference] if isinstance(reference.reference, str) else list(reference.reference)
            verdict = await run_python_tests_async(task.candidate, tests, self.timeout_s, self.memory_mb,
                                                   setup=reference.setup)
        return Judgement("verifier", verdict.score, verdict.score, f"{self.name}:{reference.kind}",
                         {"passed": verdict.passed, "detail": verdict.detail})


class CascadeJudge:
    """The first of ``judges`` that accepts a task judges it."""

    def __init__(self, judges: Sequence[Judge]) -> None:
        if not judges:
            raise ValueError("a cascade needs at least one judge")
        self.judges = tuple(judges)

    @property
    def name(self) -> str:
        return "+".join(j.name for j in self.judges)

    def accepts(self, task: JudgeTask) -> bool:
        return any(j.accepts(task) for j in self.judges)

    async def judge(self, task: JudgeTask) -> Judgement:
        for judge in self.judges:
            if judge.accepts(task):
                return await judge.judge(task)
        raise JudgeError("no judge accepts this task (no reference answer and no verifier reference)")


_SPACES = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


class ReferenceBook:
    """Verifier references by request text (whitespace-normalised)."""

    def __init__(self, references: dict[str, TaskReference] | None = None) -> None:
        self._by_prompt = dict(references or {})

    def __len__(self) -> int:
        return len(self._by_prompt)

    def add(self, prompt: str, reference: TaskReference) -> None:
        self._by_prompt[normalise_prompt(prompt)] = reference

    def lookup(self, request_text: str) -> TaskReference | None:
        return self._by_prompt.get(normalise_prompt(request_text))

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> ReferenceBook:
        """Parse JSONL lines (module docstring); a bad line raises ``ValueError`` naming its number."""
        book = cls()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                kind = data.get("kind", "numeric")
                if kind not in REFERENCE_KINDS:
                    raise ValueError(f"kind must be one of {', '.join(REFERENCE_KINDS)}, got {kind!r}")
                raw = data["reference"]
                reference = raw if isinstance(raw, str) else tuple(str(t) for t in raw)
                if not reference:
                    raise ValueError("empty reference")
                book.add(str(data["prompt"]), TaskReference(kind, reference, str(data.get("setup", ""))))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"references line {number}: {exc}") from exc
        return book

    @classmethod
    def load(cls, path: Path | None) -> ReferenceBook:
        if path is None:
            return cls()
        with open(path, encoding="utf-8") as handle:
            return cls.from_lines(handle)
