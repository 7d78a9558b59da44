"""Replay on historical logs, measured: GSM8K cache entries first answered by a weak model are replayed
on a stronger tier with ``echolm replay --from-history``'s code path, judged by the numeric verifier.

Setup (all real): the first N GSM8K test questions are answered by the weak model (SmolLM2-135M) and
admitted as cache entries (the "old" cache); the history logs three offloaded uses of each entry by the
small tier, so every entry has the same potential gain. Then ``run_replay`` rebuilds usages from the
history, settles them, and replays up to N entries on the replay tier (best of ``--samples`` at
temperature 0.7) with the GSM8K answers as references. Reported: verifier accuracy of the cached
answers before and after, entries upgraded/kept, and time per replayed entry.

Also measured: the eviction planner (``plan_tenant``, byte budget at 90% of the stored bytes) on N
synthetic examples, and the SQL query that lists a tenant's eviction candidates on SQLite.

    python bench/bench_replay.py --questions 16 --replay-model qwen2.5-coder-0.5b-instruct --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.cli_replay import run_replay  # noqa: E402
from echolm.datasets import load_gsm8k  # noqa: E402
from echolm.domain import ChatMessage, GenerationParams  # noqa: E402
from echolm.eviction_service import EvictionBudget, plan_tenant  # noqa: E402
from echolm.generation.factory import make_generator  # noqa: E402
from echolm.history.example_stats_store import EvictionCandidate, SqlExampleStatsStore  # noqa: E402
from echolm.history.migrate import upgrade  # noqa: E402
from echolm.history.store import SqlHistoryStore  # noqa: E402
from echolm.history.tables import ExampleRow  # noqa: E402
from echolm.judging.verifiers import numeric_answer_match  # noqa: E402
from echolm.protocols import ExampleCandidate, ResponseLog  # noqa: E402
from echolm.settings import ReplaySettings, Settings, TierSettings  # noqa: E402

WEAK = "smollm2-135m-instruct"


def prompt_of(question: str) -> str:
    return f"{question}\nSolve it step by step and end with 'The answer is N.'"


async def replay_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    items = load_gsm8k(Settings().model_cache_dir)[: args.questions]
    references = workdir / "references.jsonl"
    references.write_text("".join(json.dumps({"prompt": prompt_of(i.prompt), "reference": i.answer,
                                              "kind": "numeric"}) + "\n" for i in items))
    url = f"sqlite+aiosqlite:///{workdir / 'echolm.db'}"
    tiers = [TierSettings(name="small", model=WEAK, relative_cost=1.0, n_ctx=2048, max_tokens=args.max_tokens),
             TierSettings(name="large", model=args.replay_model, relative_cost=3.0, use_examples=False, n_ctx=2048,
                          max_tokens=args.max_tokens, timeout_s=300)]
    settings = Settings(data_dir=workdir, database_url=url, tiers=tiers, log_level="WARNING",
                        replay=ReplaySettings(samples=args.samples, temperature=0.7, references_path=references,
                                              settle_after_s=0, examples_per_round=args.questions))
    await upgrade(url)

    weak = make_generator(tiers[0], settings)
    started = time.monotonic()
    old_answers = []
    for n, item in enumerate(items):
        result = await weak.generate([ChatMessage("user", prompt_of(item.prompt))],
                                     GenerationParams(max_tokens=args.max_tokens, temperature=0.0), request_id=f"old{n}")
        old_answers.append(result.text)
    await weak.aclose()
    weak_s = time.monotonic() - started

    history = SqlHistoryStore(url)
    ids = await history.admit_examples([
        ExampleCandidate(tenant="default", source_request_id=f"q{n}", prompt=prompt_of(item.prompt), response=answer,
                         model=WEAK, tier="large", embedding=np.eye(8, dtype=np.float32)[n % 8])
        for n, (item, answer) in enumerate(zip(items, old_answers, strict=True))])
    finished = datetime.now(UTC) - timedelta(hours=1)
    await history.record_responses([
        ResponseLog(request_id=f"use-{example_id}-{k}", tenant="default", custom_id=None,
                    messages=[ChatMessage("user", "q")], prompt_text="q", response="a", tier="small", model=WEAK,
                    example_ids=[example_id], example_similarities=[0.9], route_reason="bench", route_score=1.0,
                    timings={"generate": 1.0}, prompt_tokens=1, completion_tokens=1, error_code=None,
                    error_message=None, submitted_at=finished, finished_at=finished)
        for example_id in ids for k in range(3)])
    await history.aclose()

    before = [numeric_answer_match(a, i.answer).passed for a, i in zip(old_answers, items, strict=True)]
    started = time.monotonic()
    summary = await run_replay(settings, from_history=True, limit=args.questions, rounds=1, dry_run=False,
                               ignore_load=False, progress=True)
    replay_s = time.monotonic() - started

    history = SqlHistoryStore(url)
    async with history._read() as connection:  # noqa: SLF001
        current = dict((await connection.execute(select(ExampleRow.prompt, ExampleRow.response)
                                                  .where(ExampleRow.status == "active"))).all())
    await history.aclose()
    after = [numeric_answer_match(current[prompt_of(i.prompt)], i.answer).passed for i in items]
    return {
        "questions": len(items), "weak_model": WEAK, "replay_model": args.replay_model, "samples": args.samples,
        "max_tokens": args.max_tokens, "accuracy_before": sum(before) / len(items),
        "accuracy_after": sum(after) / len(items), "weak_answers_s": round(weak_s, 1),
        "replay_s": round(replay_s, 1), "replay_s_per_entry": round(replay_s / max(1, summary["replayed"]), 2),
        "summary": summary,
    }


async def eviction_benchmark(sizes: list[int], workdir: Path) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    now = datetime.now(UTC)
    for n in sizes:
        created = now - timedelta(days=2)
        candidates = [EvictionCandidate(i, int(rng.integers(300, 3000)), float(rng.poisson(2.0)),
                                        now - timedelta(hours=float(rng.uniform(0, 48))), created) for i in range(n)]
        budget = EvictionBudget(max_bytes=int(0.9 * sum(c.size_bytes for c in candidates)), protect_new=timedelta(0))
        started = time.perf_counter()
        decision = plan_tenant(candidates, budget, now)
        plan_s = time.perf_counter() - started

        url = f"sqlite+aiosqlite:///{workdir / f'evict{n}.db'}"
        await upgrade(url)
        history = SqlHistoryStore(url)
        for start in range(0, n, 2000):
            await history.admit_examples([
                ExampleCandidate(tenant="t", source_request_id=f"s{i}", prompt="p" * 200, response="r" * 600,
                                 model="m", tier="large", embedding=np.ones(384, dtype=np.float32))
                for i in range(start, min(n, start + 2000))])
        started = time.perf_counter()
        listed = await SqlExampleStatsStore(history).eviction_candidates("t")
        query_s = time.perf_counter() - started
        await history.aclose()
        rows.append({"examples": n, "plan_s": round(plan_s, 3), "method": decision.methods,
                     "evicted": len(decision.evict), "sqlite_candidates_query_s": round(query_s, 3),
                     "listed": len(listed)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--replay-model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--eviction-sizes", type=int, nargs="*", default=[1000, 10000, 50000])
    parser.add_argument("--skip-replay", action="store_true")
    parser.add_argument("--json", action="store_true", help="write bench/results/replay.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "at": datetime.now(UTC).isoformat(timespec="seconds")}
        if not args.skip_replay:
            result["replay"] = asyncio.run(replay_benchmark(args, Path(tmp)))
        result["eviction"] = asyncio.run(eviction_benchmark(args.eviction_sizes, Path(tmp)))
    print(json.dumps(result, indent=2))
    if args.json:
        out = Path(__file__).resolve().parent / "results" / "replay.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
