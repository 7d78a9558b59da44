"""Replay moving quality on an evaluation workload: does upgrading the cache help the small model?

``bench/bench_replay.py`` shows replay upgrading weak cache entries on planted uses. This one closes
the loop on the evaluation's own data (``echolm eval``; run its ``cache``, ``large`` and ``nearest``
phases first, this script reads their answers from the generation cache):

1. The history gets the workload's example cache (the large model's answers to the cache part) and
   one logged response per traffic request (Zipf repeats included) as the small tier served it with
   its nearest examples, plus one feedback row per response: thumbs up when the task verifier passes
   the answer, down when not (what a user, or the ``judge`` stage, would report).
2. ``echolm replay --from-history``'s code (``run_replay``) rebuilds usages from those responses,
   settles them with the feedback into G(e), and replays the entries that pay on the large tier:
   best of ``--samples`` answers at temperature 0.7, judged by the task verifier against the
   references, a new version only where it beats the current answer.
3. The same traffic is served again by the small model with the same nearest examples, now holding
   the replayed answers.

Reported: cache entries right before/after (verifier), replay outcomes, and the small model's
accuracy and win rate against the large model on the traffic before and after. Every generation goes
through the evaluation's generation cache, so a re-run only scores.

    python bench/bench_replay_eval.py --workload gsm8k-numbers --json bench/results/replay_eval.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select  # noqa: E402

from echolm.cli_replay import run_replay  # noqa: E402
from echolm.domain import ChatMessage  # noqa: E402
from echolm.evaluation.evaluate import eval_settings  # noqa: E402
from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR, GenerationCache, generate_missing  # noqa: E402
from echolm.evaluation.harness import WorkloadRun, default_embedder  # noqa: E402
from echolm.evaluation.quality import VerdictCache, pass_fail_outcome, win_rate_of  # noqa: E402
from echolm.evaluation.systems import EVAL_TENANT  # noqa: E402
from echolm.evaluation.workload import load_workload  # noqa: E402
from echolm.feedback import FeedbackInput  # noqa: E402
from echolm.history.feedback_store import FeedbackStore  # noqa: E402
from echolm.history.migrate import upgrade  # noqa: E402
from echolm.history.store import SqlHistoryStore  # noqa: E402
from echolm.history.tables import ExampleRow  # noqa: E402
from echolm.protocols import ExampleCandidate, ResponseLog  # noqa: E402
from echolm.settings import ReplaySettings, Settings  # noqa: E402

REFERENCE_KIND = {"numeric": "numeric", "program-output": "program", "python-tests": "python"}


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
        raise SystemExit(f"{run.workload.name} has no task verifier; replay would need an LLM judge tier")
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


async def seed_history(url: str, run: WorkloadRun, verdicts: VerdictCache) -> dict[str, Any]:
    """Step 1 of the module docstring; returns what was logged."""
    await upgrade(url)
    history = SqlHistoryStore(url)
    await history.start()
    try:
        examples = run.examples()
        assert run.cache_vectors is not None
        ids = await history.admit_examples([
            ExampleCandidate(tenant=EVAL_TENANT, source_request_id=source_id(i), prompt=item.prompt,
                             response=example.response, model=example.model, tier="large",
                             embedding=run.cache_vectors[i])
            for i, (item, example) in enumerate(zip(run.workload.cache, examples, strict=True))])
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
                route_reason="bench: small + nearest examples", route_score=None, timings={}, prompt_tokens=None,
                completion_tokens=None, error_code=None, error_message=None, submitted_at=served, finished_at=served))
            feedback.append(FeedbackInput(request_id=request_id, tier="small", rating="up" if ok else "down",
                                          tenant=EVAL_TENANT, source="verifier").to_feedback())
        await history.record_responses(logs)
        await FeedbackStore(history).record_feedback(feedback)
        return {"responses": len(logs), "responses_passed": passed, "examples": len(ids)}
    finally:
        await history.aclose()


async def cache_answers_after(url: str, n: int) -> tuple[list[str], list[int]]:
    """The active answer of each cache entry (by its source id), and each entry's version."""
    history = SqlHistoryStore(url)
    await history.start()
    try:
        async with history._read() as connection:  # noqa: SLF001 - a bench reading the table directly
            rows = (await connection.execute(select(ExampleRow.source_request_id, ExampleRow.response,
                                                    ExampleRow.version).where(ExampleRow.status == "active"))).all()
    finally:
        await history.aclose()
    by_source = {r.source_request_id: (r.response, r.version) for r in rows}
    return [by_source[source_id(i)][0] for i in range(n)], [by_source[source_id(i)][1] for i in range(n)]


def cache_verdicts(run: WorkloadRun, answers: list[str], verdicts: VerdictCache) -> list[bool | None]:
    """Each cache entry's answer right or not; None where the task verifier cannot tell (MBPP asked in
    another language has no tests)."""
    workload = run.workload
    return [verdicts.verify(item, answer, workload.verifier).passed
            if item.answer is not None or item.tests else None
            for item, answer in zip(workload.cache, answers, strict=True)]


def traffic_quality(run: WorkloadRun, verdicts: VerdictCache) -> dict[str, float]:
    """Small + nearest examples on the traffic (repeats included): accuracy and win rate vs large."""
    passed, outcomes = [], []
    for item in run.workload.traffic:
        small = verdicts.verify(item, run.generation(item, run.arms.nearest(item.id)).text, run.workload.verifier)
        large = verdicts.verify(item, run.generation(item, run.arms.large()).text, run.workload.verifier)
        passed.append(small.passed)
        outcomes.append(pass_fail_outcome(small.passed, large.passed))
    return {"accuracy": round(sum(passed) / len(passed), 4), "win_rate_vs_large": round(win_rate_of(outcomes), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="gsm8k-numbers")
    parser.add_argument("--n-cache", type=int, default=40)
    parser.add_argument("--n-traffic", type=int, default=40)
    parser.add_argument("-k", "--examples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=3, help="replay answers per entry (best of n by the verifier)")
    parser.add_argument("--rounds", type=int, default=1, help="replay rounds (each entry at most once per round)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the replay and re-serving")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="the evaluation's generation cache")
    parser.add_argument("--judge-tests", choices=("shown", "all"), default="shown",
                        help="python tasks: judge replayed answers by the assert the entry's prompt shows, or by all")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    base = Settings(log_level="WARNING")
    settings = eval_settings(base, 600.0, args.threads)
    cache = GenerationCache(args.cache_dir)
    verdicts = VerdictCache(args.cache_dir)
    workload = load_workload(args.workload, settings.model_cache_dir, n_cache=args.n_cache,
                             n_traffic=args.n_traffic, seed=args.seed)
    run = WorkloadRun.build(workload, settings, cache, default_embedder(settings), k=args.examples, seed=args.seed)
    before_cache = cache_verdicts(run, [e.response for e in run.examples()], verdicts)
    before = traffic_quality(run, verdicts)

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'history.db'}"
        references = Path(tmp) / "references.jsonl"
        judged_entries = write_references(run, references, args.judge_tests)
        seeded = asyncio.run(seed_history(url, run, verdicts))
        replay_settings = settings.model_copy(update={
            "database_url": url, "data_dir": Path(tmp),
            "replay": ReplaySettings(samples=args.samples, temperature=0.7, max_tokens=workload.max_tokens,
                                     references_path=references, settle_after_s=0,
                                     examples_per_round=len(workload.cache))})
        started = time.monotonic()
        summary = asyncio.run(run_replay(replay_settings, from_history=True, limit=None, rounds=args.rounds,
                                         dry_run=False, ignore_load=True, progress=True))
        replay_s = time.monotonic() - started
        answers, versions = asyncio.run(cache_answers_after(url, len(workload.cache)))

    upgraded = run.with_cache_answers(answers)
    after_cache = cache_verdicts(run, answers, verdicts)
    jobs = [upgraded.job(item, upgraded.arms.nearest(item.id)) for item in workload.unique_traffic]
    started = time.monotonic()
    regenerated = generate_missing(jobs, settings, cache, description=f"{workload.name}: small + replayed examples")
    serve_s = time.monotonic() - started
    after = traffic_quality(upgraded, verdicts)

    result = {
        "workload": workload.name, "n_cache": len(workload.cache), "traffic": len(workload.traffic),
        "distinct_traffic": len(workload.unique_traffic), "k": args.examples, "samples": args.samples,
        "history": seeded, "judge_tests": args.judge_tests, "entries_with_reference": judged_entries,
        "cache_verifiable": sum(v is not None for v in before_cache),
        "cache_right_before": sum(v is True for v in before_cache),
        "cache_right_after": sum(v is True for v in after_cache),
        "entries_replaced": sum(v > 1 for v in versions),
        "traffic_using_replaced_entries": sum(
            any(versions[i] > 1 for i in run.arms.nearest(item.id).examples) for item in workload.traffic),
        "small_nearest_before": before, "small_nearest_after": after,
        "replaced": {str(i): {"prompt": workload.cache[i].prompt, "answer": answers[i], "right": after_cache[i]}
                     for i, v in enumerate(versions) if v > 1},
        "replay_seconds": round(replay_s, 1), "reserve_generations": regenerated, "reserve_seconds": round(serve_s, 1),
        "replay_summary": summary,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
