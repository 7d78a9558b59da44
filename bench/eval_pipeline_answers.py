"""Quality of the answers the real pipeline gave in ``echolm eval --validate``, scored like the evaluation.

``--validate`` compares the pipeline's answers with the evaluation's (same prompts, temperature 0), but
a prompt served with prefix reuse is prefilled in a different batch, and llama.cpp's floats depend on
batching, so a few greedy answers differ. This scores each validation run's own answers with the
workload's verifier and its win rate against the always-large run's own answers, request by request:
quality measured on the same answers as the throughput.

    python bench/eval_pipeline_answers.py --validation out/eval/validation --workload gsm8k-numbers-program \\
        --n-cache 40 --n-traffic 40
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR  # noqa: E402
from echolm.evaluation.quality import VerdictCache, pass_fail_outcome, win_rate_of  # noqa: E402
from echolm.evaluation.validation import read_answers  # noqa: E402
from echolm.evaluation.workload import load_workload  # noqa: E402
from echolm.settings import Settings  # noqa: E402

BASELINE = "always-large"


def answers(run_dir: Path) -> dict[int, str]:
    """Position in the traffic -> the pipeline's answer text ('' for an error)."""
    return {int(custom_id.split(":", 1)[0]): answer.text
            for custom_id, answer in read_answers(run_dir / "requests.out.jsonl").items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validation", type=Path, nargs="+", default=[Path("out/eval/validation")],
                        help="the validation folder of an echolm eval --out-dir; several (runs of the same workload "
                             "with --validate-systems) are scored together against the one always-large run")
    parser.add_argument("--workload", default="gsm8k-numbers-program", help="the validated workload")
    parser.add_argument("--n-cache", type=int, default=40)
    parser.add_argument("--n-traffic", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where verdicts are cached")
    args = parser.parse_args()

    workload = load_workload(args.workload, Settings(log_level="WARNING").model_cache_dir, n_cache=args.n_cache,
                             n_traffic=args.n_traffic, seed=args.seed)
    verdicts = VerdictCache(args.cache_dir)
    runs = {}
    for validation in args.validation:
        # Each workload's runs are in their own subfolder (runs made before that are directly in the folder).
        folder = validation / args.workload if (validation / args.workload).is_dir() else validation
        runs.update({d.name: answers(d) for d in sorted(folder.iterdir()) if (d / "requests.out.jsonl").exists()})
    if BASELINE not in runs:
        sys.exit(f"{', '.join(map(str, args.validation))}: no {BASELINE} run; its answers are the baseline of the win rate")
    passed = {name: {n: verdicts.verify(workload.traffic[n], text, workload.verifier).passed
                     for n, text in run.items()} for name, run in runs.items()}
    report = {}
    for name, run_passed in passed.items():
        outcomes = [pass_fail_outcome(ok, passed[BASELINE][n]) for n, ok in run_passed.items()]
        counts = Counter(outcomes)
        report[name] = {"requests": len(outcomes), "accuracy": round(sum(run_passed.values()) / len(outcomes), 3),
                        "win_rate_vs_always_large_run": round(win_rate_of(outcomes), 3),
                        "wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"]}
    verdicts.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
