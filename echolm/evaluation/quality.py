"""Quality: task verifiers, and the paper's win rate against the large model.

**Verifier outcomes.** Each answer is checked by its task's verifier: GSM8K by the final number
(``numeric_answer_match``), MBPP by running the data set's asserts in the sandbox
(``run_python_tests``; an answer passes when every assert does).

**Win rate from verifiers.** The paper's win rate compares a system's answer with the large model's
answer to the *same request*: ``(wins + 0.5 ties) / total``. With a verifier the comparison is made on
pass/fail: the candidate **wins** when it passes and the large model's answer fails, **loses** in the
opposite case, and **ties** when both pass or both fail. Always-large scores exactly 0.5 by construction,
and a system's win rate is ``0.5 + (its accuracy - the large model's accuracy) / 2``, so a win rate of
0.5 means "as accurate as the large model on this traffic". (Judge-based win rates also give credit for
better style; verifier-based ones only for correctness.)

**LLM judge.** Where a judge endpoint is configured, ``JudgeQuality`` scores candidate vs large with the
project's ``PairwiseJudge`` (both orders, ties within +-0.3) instead; verdicts are cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from echolm.datasets import TaskItem
from echolm.domain import ChatMessage
from echolm.judging.pairwise import Outcome, PairwiseJudge, win_rate
from echolm.judging.verifiers import Verdict, numeric_answer_match, program_answer_match, run_python_tests

TEST_TIMEOUT_S = 10.0
TEST_MEMORY_MB = 512
_OUTCOME_SCORE = {"win": 1.0, "tie": 0.0, "loss": -1.0}


def verifiable(item: TaskItem) -> bool:
    """Whether a task verifier can check answers to ``item`` (MBPP asked in another language has no tests)."""
    return item.answer is not None or bool(item.tests)


def verify(item: TaskItem, answer: str, verifier: str) -> Verdict:
    """Check ``answer`` with the workload's verifier ("numeric", "program-output" or "python-tests")."""
    if verifier in ("numeric", "program-output"):
        if item.answer is None:
            raise ValueError(f"{item.id} has no reference answer")
        if verifier == "program-output":
            return program_answer_match(answer, item.answer, timeout_s=TEST_TIMEOUT_S, memory_mb=TEST_MEMORY_MB)
        return numeric_answer_match(answer, item.answer)
    if verifier == "python-tests":
        if not item.tests:
            raise ValueError(f"{item.id} has no tests")
        if not answer.strip():
            return Verdict(False, 0.0, "empty answer")
        return run_python_tests(answer, item.tests, timeout_s=TEST_TIMEOUT_S, memory_mb=TEST_MEMORY_MB)
    raise ValueError(f"no verifier {verifier!r}: this workload needs an LLM judge")


def pass_fail_outcome(candidate_passed: bool, large_passed: bool) -> Outcome:
    """Win/tie/loss of a candidate against the large model's answer to the same request (see module doc)."""
    if candidate_passed == large_passed:
        return "tie"
    return "win" if candidate_passed else "loss"


def win_rate_of(outcomes: Sequence[Outcome]) -> float:
    """``(wins + 0.5 ties) / total`` (the judging module's definition, fed with +1/0/-1 scores)."""
    return win_rate(_OUTCOME_SCORE[o] for o in outcomes)


def accuracy(passed: Iterable[bool]) -> float:
    values = list(passed)
    if not values:
        raise ValueError("accuracy of nothing")
    return sum(values) / len(values)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (how little ``n`` requests can tell)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Lift:
    """How many win-rate points examples add to the small model, request by request.

    ``points`` is 100 x the mean over requests of ``score(candidate) - score(baseline)``, each score the
    request's win (1), tie (0.5) or loss (0) against the large model's answer, so it equals the
    difference of the two win rates. Traffic requests are independent draws from the workload's
    popularity law, so the mean of the paired differences has a normal-approximation 95% interval
    (``low``, ``high``); pairing removes the requests on which both arms do the same.
    """

    points: float
    low: float
    high: float
    requests: int


def paired_lift(candidate: Sequence[bool], baseline: Sequence[bool], large: Sequence[bool],
                z: float = 1.96) -> Lift:
    """The candidate's win-rate lift over the baseline, both judged by pass/fail against ``large``."""
    if not (len(candidate) == len(baseline) == len(large)) or not large:
        raise ValueError("paired_lift needs three equally long, non-empty pass/fail lists")
    # Halved: _OUTCOME_SCORE spans -1..1, a win rate's per-request score 0..1.
    diffs = [(_OUTCOME_SCORE[pass_fail_outcome(c, g)] - _OUTCOME_SCORE[pass_fail_outcome(b, g)]) / 2
             for c, b, g in zip(candidate, baseline, large, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * (variance / n) ** 0.5
    return Lift(100 * mean, 100 * (mean - half), 100 * (mean + half), n)


def parity_headroom(small: Sequence[bool], large: Sequence[bool]) -> float:
    """Win-rate points the small model would gain by tying the large model on every request, i.e. by
    answering as it does: ``100 x (0.5 - win rate)``. Examples that only carry the large model's answers
    cannot lift it further; more needs answers better than the large model's own (replay's verified
    samples), so this bounds what copying can show against a lift target."""
    if len(small) != len(large) or not large:
        raise ValueError("parity_headroom needs two equally long, non-empty pass/fail lists")
    return 100 * (0.5 - win_rate_of([pass_fail_outcome(s, g) for s, g in zip(small, large, strict=True)]))


class VerdictCache:
    """Verifier results on disk, keyed by the verifier, the request and the answer text."""

    def __init__(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(Path(directory) / "verdicts.sqlite", timeout=30.0)
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, passed INTEGER, score REAL, "
                         "detail TEXT)")
        self._db.commit()

    @staticmethod
    def key(item: TaskItem, answer: str, verifier: str) -> str:
        payload = json.dumps([verifier, item.answer, list(item.tests), answer], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def verify(self, item: TaskItem, answer: str, verifier: str) -> Verdict:
        key = self.key(item, answer, verifier)
        row = self._db.execute("SELECT passed, score, detail FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row:
            return Verdict(bool(row[0]), float(row[1]), str(row[2]))
        verdict = verify(item, answer, verifier)
        self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                         (key, int(verdict.passed), verdict.score, verdict.detail))
        self._db.commit()
        return verdict

    def close(self) -> None:
        self._db.close()


@dataclass
class JudgeQuality:
    """Pairwise LLM-judge outcomes (candidate vs the large model's answer), cached by content."""

    judge: PairwiseJudge
    directory: Path

    def __post_init__(self) -> None:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(Path(self.directory) / "judgements.sqlite", timeout=30.0)
        self._db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, score REAL, outcome TEXT)")
        self._db.commit()

    async def outcome(self, request: str, candidate: str, reference: str) -> Outcome:
        if candidate == reference:
            return "tie"  # identical answers: no need to ask
        key = hashlib.sha256(json.dumps([request, candidate, reference]).encode("utf-8")).hexdigest()
        row = self._db.execute("SELECT outcome FROM judgements WHERE key = ?", (key,)).fetchone()
        if row:
            return row[0]
        verdict = await self.judge.compare(request, candidate, reference)
        self._db.execute("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?)", (key, verdict.score, verdict.outcome))
        self._db.commit()
        return verdict.outcome


def openai_judge(base_url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 120.0) -> PairwiseJudge:
    """A ``PairwiseJudge`` calling an OpenAI-compatible chat endpoint (a capable model: the judge's
    verdicts are only as good as it is)."""
    from echolm.domain import GenerationParams
    from echolm.generation.openai_http import OpenAIChatGenerator
    from echolm.settings import TierSettings

    tier = TierSettings(name="judge", backend="openai", model=model, relative_cost=1.0, base_url=base_url,
                        max_tokens=512, timeout_s=timeout_s)
    generator = OpenAIChatGenerator(tier, api_key=api_key)

    async def generate(messages: list[ChatMessage]) -> str:
        result = await generator.generate(messages, GenerationParams(max_tokens=512, temperature=0.0),
                                          request_id="judge")
        return result.text

    judge_call: Callable[[list[ChatMessage]], Awaitable[str]] = generate
    return PairwiseJudge(judge_call, timeout_s=timeout_s)
