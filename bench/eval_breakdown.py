"""Where examples help: an evaluated workload's traffic split by what its nearest examples held.

Reads ``echolm eval``'s generation cache (run its ``cache``, ``large``, ``small`` and ``nearest`` phases
first; nothing is generated here) and counts, per group of traffic requests, how many the large model,
the small model alone and the small model with its nearest examples answered right. Groups: whether the
request's own problem/task is among its nearest examples, and whether that cached answer is right
(``unverifiable``: MBPP cached in another language, which has no tests).

    python bench/eval_breakdown.py --workload gsm8k-numbers-program
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.evaluation.evaluate import eval_settings  # noqa: E402
from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR, GenerationCache  # noqa: E402
from echolm.evaluation.harness import WorkloadRun, default_embedder  # noqa: E402
from echolm.evaluation.quality import VerdictCache, verifiable  # noqa: E402
from echolm.evaluation.workload import load_workload  # noqa: E402
from echolm.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="gsm8k-numbers-program")
    parser.add_argument("--n-cache", type=int, default=40)
    parser.add_argument("--n-traffic", type=int, default=40)
    parser.add_argument("-k", "--examples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="the evaluation's generation cache")
    args = parser.parse_args()

    settings = eval_settings(Settings(log_level="WARNING"), 600.0)
    cache, verdicts = GenerationCache(args.cache_dir), VerdictCache(args.cache_dir)
    workload = load_workload(args.workload, settings.model_cache_dir, n_cache=args.n_cache,
                             n_traffic=args.n_traffic, seed=args.seed)
    run = WorkloadRun.build(workload, settings, cache, default_embedder(settings), k=args.examples, seed=args.seed)
    cached_right = {item.group: verdicts.verify(item, example.response, workload.verifier).passed
                    for item, example in zip(workload.cache, run.examples(), strict=True)
                    if verifiable(item)}

    def right(item, arm) -> bool:  # type: ignore[no-untyped-def]
        return verdicts.verify(item, run.generation(item, arm).text, workload.verifier).passed

    rows: dict[str, list[int]] = {}
    for item in workload.traffic:
        nearest = run.arms.nearest(item.id)
        if item.group not in {workload.cache[i].group for i in nearest.examples}:
            group = "own problem not among its examples"
        elif item.group not in cached_right:
            group = "own problem among its examples, cached answer unverifiable"
        else:
            group = f"own problem among its examples, cached answer {'right' if cached_right[item.group] else 'wrong'}"
        counts = rows.setdefault(group, [0, 0, 0, 0])
        counts[0] += 1
        for column, arm in enumerate((run.arms.large(), run.arms.small(), nearest), start=1):
            counts[column] += right(item, arm)
    print(f"{workload.name}: {len(workload.traffic)} traffic requests\n")
    print("| requests | n | large | small alone | small + nearest |\n|---|---|---|---|---|")
    for group, (n, large, small, hinted) in sorted(rows.items()):
        print(f"| {group} | {n} | {large} | {small} | {hinted} |")


if __name__ == "__main__":
    main()
