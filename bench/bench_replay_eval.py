"""Replay moving quality on an evaluation workload, as a JSON of before and after figures.

The replay itself is ``echolm eval``'s ``replay`` phase (``echolm.evaluation.replay_phase``: the
history gets the eval's cache and the small tier's served answers with verifier feedback, the replay
agent upgrades entries on the large tier, the traffic is served again with the upgraded examples); run
the eval's ``cache``, ``large`` and ``nearest`` phases first. This script runs (or reuses the stored)
replay and prints the cache entries right before/after, the replay's outcomes and the small model's
accuracy and win rate against the large model on the traffic before and after.

    python bench/bench_replay_eval.py --workload gsm8k-numbers-program --samples 10 \
        --json bench/results/replay_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.evaluation.evaluate import eval_settings  # noqa: E402
from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR, GenerationCache, generate_missing  # noqa: E402
from echolm.evaluation.harness import WorkloadRun, default_embedder  # noqa: E402
from echolm.evaluation.quality import VerdictCache, pass_fail_outcome, win_rate_of  # noqa: E402
from echolm.evaluation.replay_phase import ReplayStore, stored_or_replayed  # noqa: E402
from echolm.evaluation.workload import load_workload  # noqa: E402
from echolm.settings import Settings  # noqa: E402


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
    before = traffic_quality(run, verdicts)
    outcome = stored_or_replayed(run, True, store=ReplayStore(args.cache_dir), settings=settings, verdicts=verdicts,
                                 samples=args.samples, judge_tests=args.judge_tests, rounds=args.rounds)
    assert outcome is not None
    upgraded = run.with_cache_answers(outcome.answers)
    jobs = [upgraded.job(item, upgraded.arms.nearest(item.id)) for item in workload.unique_traffic]
    started = time.monotonic()
    regenerated = generate_missing(jobs, settings, cache, description=f"{workload.name}: small + replayed examples")
    serve_s = time.monotonic() - started
    after = traffic_quality(upgraded, verdicts)

    result = {
        "workload": workload.name, "n_cache": len(workload.cache), "traffic": len(workload.traffic),
        "distinct_traffic": len(workload.unique_traffic), "k": args.examples, "samples": args.samples,
        "history": outcome.history, "judge_tests": args.judge_tests,
        "entries_with_reference": outcome.entries_with_reference,
        "cache_verifiable": sum(v is not None for v in outcome.right_before),
        "cache_right_before": sum(v is True for v in outcome.right_before),
        "cache_right_after": sum(v is True for v in outcome.right_after),
        "entries_replaced": len(outcome.replaced),
        "traffic_using_replaced_entries": sum(
            any(outcome.versions[i] > 1 for i in run.arms.nearest(item.id).examples) for item in workload.traffic),
        "small_nearest_before": before, "small_nearest_after": after,
        "replaced": {str(i): {"prompt": workload.cache[i].prompt, "answer": outcome.answers[i],
                              "right": outcome.right_after[i]} for i in outcome.replaced},
        "replay_seconds": outcome.seconds, "reserve_generations": regenerated, "reserve_seconds": round(serve_s, 1),
        "replay_summary": outcome.summary,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
