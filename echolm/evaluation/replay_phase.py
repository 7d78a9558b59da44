"""The ``replay`` phase of ``echolm eval``: the replay agent upgrades the example cache on the traffic's
own feedback, and the small tier serves the traffic again with the upgraded examples.

1. A throw-away history gets the workload's example cache (the large model's answers to the cache part)
   and one logged response per traffic request (Zipf repeats included) as the small tier served it with
   its nearest examples, plus one feedback row per response: thumbs up when the task verifier passes the
   answer, down when not (what a user, or the ``judge`` stage, would report).
2. ``echolm replay --from-history``'s code (``run_replay``) rebuilds usages from those responses, settles
   them with the feedback into G(e), and replays the entries that pay on the large tier: best of
   ``samples`` answers at temperature 0.7, judged by the task verifier against each *cache* entry's own
   reference (its published answer, or only the assert its prompt shows: never the traffic's grading
   key), a new version only where it beats the current answer.
3. The harness then serves the traffic with the same nearest examples, now holding the replayed answers
   (arm ``small+replayed``).

Replay samples at a temperature, so its result is stored (``ReplayStore``, keyed by everything it read)
and a re-run or ``--no-generate`` report reuses it instead of sampling again. Its large-tier seconds are
reported apart: the paper runs replay in idle capacity, not in the served traffic's time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from echolm.domain import ChatMessage
from echolm.evaluation.quality import VerdictCache, verifiable
from echolm.evaluation.systems import EVAL_TENANT
from echolm.settings import ReplaySettings, Settings

if TYPE_CHECKING:
    from echolm.evaluation.harness import WorkloadRun

# Workload verifier -> the replay judge's reference kind (echolm.judging.judge.REFERENCE_KINDS).
REFERENCE_KIND = {"numeric": "numeric", "program-output": "program", "python-tests": "python"}
REPLAY_TEMPERATURE = 0.7


@dataclass(frozen=True)
class ReplayOutcome:
    """What one replay of a workload's cache did."""

    answers: list[str]  # each cache entry's active answer afterwards
    versions: list[int]  # each entry's version afterwards (1: not replaced)
    right_before: list[bool | None]  # the task verifier on each entry's answer (None: cannot tell)
    right_after: list[bool | None]
    samples: int
    judge_tests: str
    entries_with_reference: int
    history: dict[str, int]
    summary: dict[str, Any]  # run_replay's
    seconds: float

    @property
    def replaced(self) -> list[int]:
        return [i for i, version in enumerate(self.versions) if version > 1]


def source_id(index: int) -> str:
    return f"cache-{index}"


def write_references(run: WorkloadRun, path: Path, tests: str = "shown") -> int:
    """The replay judge's references: each cache entry's prompt with the workload's answer or tests.

    Python tasks: ``tests="shown"`` judges an entry only by the assert its own prompt shows (what the
    asker stated; the traffic is scored on every assert, so judging replay by all of them would grade
    the examples with the evaluation's own key), ``"all"`` by every assert. Entries without tests (MBPP
    asked in another language) get no reference and are left to the other judges. Returns how many
    entries have one.
    """
    kind = REFERENCE_KIND.get(run.workload.verifier)
    if kind is None:
        raise ValueError(f"{run.workload.name} has no task verifier; replay would need an LLM judge tier")
    lines = []
    for item in run.workload.cache:
        if kind in ("numeric", "program"):
            reference: str | list[str] = item.answer or ""
        else:  # one test per entry of the list, so the verifier scores the share that pass
            reference = list(item.tests[:1] if tests == "shown" else item.tests)
        if reference:
            lines.append(json.dumps({"prompt": item.prompt, "reference": reference, "kind": kind}))
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


async def seed_history(url: str, run: WorkloadRun, verdicts: VerdictCache) -> dict[str, int]:
    """Step 1 of the module docstring; returns what was logged."""
    from echolm.feedback import FeedbackInput
    from echolm.history.feedback_store import FeedbackStore
    from echolm.history.migrate import upgrade
    from echolm.history.store import SqlHistoryStore
    from echolm.protocols import ExampleCandidate, ResponseLog

    await upgrade(url)
    history = SqlHistoryStore(url)
    await history.start()
    try:
        assert run.cache_vectors is not None
        ids = await history.admit_examples([
            ExampleCandidate(tenant=EVAL_TENANT, source_request_id=source_id(i), prompt=item.prompt,
                             response=example.response, model=example.model, tier="large",
                             embedding=run.cache_vectors[i])
            for i, (item, example) in enumerate(zip(run.workload.cache, run.examples(), strict=True))])
        served = datetime.now(UTC) - timedelta(hours=1)
        logs, feedback, passed = [], [], 0
        for n, item in enumerate(run.workload.traffic):
            arm = run.arms.nearest(item.id)
            answer = run.generation(item, arm).text
            ok = verdicts.verify(item, answer, run.workload.verifier).passed
            passed += ok
            request_id = f"traffic-{n}"
            logs.append(ResponseLog(
                request_id=request_id, tenant=EVAL_TENANT, custom_id=None,
                messages=[ChatMessage("user", item.prompt)], prompt_text=item.prompt, response=answer, tier="small",
                model=run.models["small"], example_ids=[ids[i] for i in arm.examples],
                example_similarities=[float(run.table.row(item.id)[i]) for i in arm.examples],
                route_reason="eval: small + nearest examples", route_score=None, timings={}, prompt_tokens=None,
                completion_tokens=None, error_code=None, error_message=None, submitted_at=served, finished_at=served))
            feedback.append(FeedbackInput(request_id=request_id, tier="small", rating="up" if ok else "down",
                                          tenant=EVAL_TENANT, source="verifier").to_feedback())
        await history.record_responses(logs)
        await FeedbackStore(history).record_feedback(feedback)
        return {"responses": len(logs), "responses_passed": passed, "examples": len(ids)}
    finally:
        await history.aclose()


async def active_answers(url: str, n: int) -> tuple[list[str], list[int]]:
    """The active answer of each cache entry (by its source id), and each entry's version."""
    from sqlalchemy import select

    from echolm.history.store import SqlHistoryStore
    from echolm.history.tables import ExampleRow

    history = SqlHistoryStore(url)
    await history.start()
    try:
        async with history._read() as connection:  # noqa: SLF001 - reading the table the replay wrote
            rows = (await connection.execute(select(ExampleRow.source_request_id, ExampleRow.response,
                                                    ExampleRow.version).where(ExampleRow.status == "active"))).all()
    finally:
        await history.aclose()
    by_source = {r.source_request_id: (r.response, r.version) for r in rows}
    return [by_source[source_id(i)][0] for i in range(n)], [by_source[source_id(i)][1] for i in range(n)]


def cache_verdicts(run: WorkloadRun, answers: list[str], verdicts: VerdictCache) -> list[bool | None]:
    """Each cache entry's answer right or not by the task verifier; None where it cannot tell."""
    workload = run.workload
    return [verdicts.verify(item, answer, workload.verifier).passed if verifiable(item) else None
            for item, answer in zip(workload.cache, answers, strict=True)]


def replay_cache(run: WorkloadRun, settings: Settings, verdicts: VerdictCache, *, samples: int,
                 judge_tests: str = "shown", rounds: int = 1, progress: bool = True) -> ReplayOutcome:
    """Steps 1 and 2 of the module docstring on ``settings``' large tier (needs the ``cache`` and
    ``nearest`` phases' generations)."""
    from echolm.cli_replay import run_replay

    before = [example.response for example in run.examples()]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'history.db'}"
        references = Path(tmp) / "references.jsonl"
        with_reference = write_references(run, references, judge_tests)
        seeded = asyncio.run(seed_history(url, run, verdicts))
        replay_settings = settings.model_copy(update={
            "database_url": url, "data_dir": Path(tmp),
            "replay": ReplaySettings(samples=samples, temperature=REPLAY_TEMPERATURE, max_tokens=run.workload.max_tokens,
                                     references_path=references, settle_after_s=0,
                                     examples_per_round=len(run.workload.cache))})
        started = time.monotonic()
        summary = asyncio.run(run_replay(replay_settings, from_history=True, limit=None, rounds=rounds,
                                         dry_run=False, ignore_load=True, progress=progress))
        seconds = time.monotonic() - started
        answers, versions = asyncio.run(active_answers(url, len(run.workload.cache)))
    return ReplayOutcome(answers, versions, cache_verdicts(run, before, verdicts), cache_verdicts(run, answers, verdicts),
                         samples, judge_tests, with_reference, seeded, summary, round(seconds, 1))


class ReplayStore:
    """Replay outcomes on disk, keyed by what the replay read (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self._directory = Path(directory) / "replays"

    @staticmethod
    def key(run: WorkloadRun, samples: int, judge_tests: str, rounds: int) -> str:
        served = [run.generation(item, run.arms.nearest(item.id)).text for item in run.workload.traffic]
        material = {"workload": run.workload.name, "cache": [(e.prompt, e.response) for e in run.examples()],
                    "traffic": [item.prompt for item in run.workload.traffic], "served": served,
                    "model": run.models["large"], "samples": samples, "judge_tests": judge_tests, "rounds": rounds,
                    "temperature": REPLAY_TEMPERATURE, "max_tokens": run.workload.max_tokens}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, key: str) -> ReplayOutcome | None:
        path = self._directory / f"{key}.json"
        if not path.exists():
            return None
        return ReplayOutcome(**json.loads(path.read_text()))

    def put(self, key: str, outcome: ReplayOutcome) -> None:
        self.put_raw(key, asdict(outcome))

    def keys(self) -> set[str]:
        return {path.stem for path in self._directory.glob("*.json")} if self._directory.is_dir() else set()

    def raw(self) -> dict[str, dict[str, Any]]:
        """Every stored outcome as its JSON object, by key (what a snapshot carries)."""
        if not self._directory.is_dir():
            return {}
        return {path.stem: json.loads(path.read_text()) for path in sorted(self._directory.glob("*.json"))}

    def put_raw(self, key: str, outcome: dict[str, Any]) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        (self._directory / f"{key}.json").write_text(json.dumps(outcome, indent=1))


def stored_or_replayed(run: WorkloadRun, generate: bool, *, store: ReplayStore, settings: Settings,
                       verdicts: VerdictCache, samples: int, judge_tests: str = "shown", rounds: int = 1,
                       progress: bool = True) -> ReplayOutcome | None:
    """The stored outcome for this run, else (when ``generate``) a new replay, stored; else None."""
    key = ReplayStore.key(run, samples, judge_tests, rounds)
    outcome = store.get(key)
    if outcome is None and generate:
        outcome = replay_cache(run, settings, verdicts, samples=samples, judge_tests=judge_tests, rounds=rounds,
                               progress=progress)
        store.put(key, outcome)
    return outcome


def stored_replayer(cache_dir: Path, settings: Settings, verdicts: VerdictCache, *, samples: int,
                    progress: bool = True) -> Callable[[WorkloadRun, bool], ReplayOutcome | None]:
    """What ``WorkloadRun.replayer`` takes: the replay phase, its outcomes stored under ``cache_dir``."""
    return partial(stored_or_replayed, store=ReplayStore(cache_dir), settings=settings, verdicts=verdicts,
                   samples=samples, progress=progress)
