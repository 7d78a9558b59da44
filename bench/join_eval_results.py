"""Join the real-pipeline runs of several ``echolm eval`` runs into one folder's results.json.

``--validate`` on one workload at a time (each run its own ``--out-dir``) keeps every run's results on
disk as soon as it ends; a report-only run (``--no-generate``) over all workloads then keeps the
``validation`` and ``pipeline_latency`` lists it finds in its own ``--out-dir``/results.json. This
writes that file from the per-workload runs:

    python bench/join_eval_results.py out/eval-s15 out/eval-s15-gsm8k-numbers-program out/eval-s15-mbpp-camel
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def join(runs: list[Path]) -> dict[str, object]:
    joined: dict[str, object] = {"validation": [], "pipeline_latency": []}
    stamps = []
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        if not results.get("validation"):
            raise SystemExit(f"{run}/results.json holds no real-pipeline validation")
        joined["validation"] += results["validation"]  # type: ignore[operator]
        joined["pipeline_latency"] += results.get("pipeline_latency", [])  # type: ignore[operator]
        if results.get("validation_at"):  # a UTC timestamp, so the latest sorts last
            stamps.append(results["validation_at"])
    joined["validation_at"] = max(stamps, default="an earlier run")
    return joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="the report run's --out-dir (its results.json is written)")
    parser.add_argument("runs", type=Path, nargs="+", help="--out-dir folders of the runs with --validate")
    args = parser.parse_args()
    joined = join(args.runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(joined, indent=2))
    print(f"{args.out_dir / 'results.json'}: {len(joined['validation'])} validation runs, "  # type: ignore[arg-type]
          f"{len(joined['pipeline_latency'])} latency runs")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
