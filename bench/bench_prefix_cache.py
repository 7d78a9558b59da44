"""The llama.cpp tiers' prefix cache on an evaluation's real prompts: seconds with reuse off vs on.

Takes the traffic of an ``echolm eval`` workload in arrival order (Zipf repeats included) on one arm (by
default ``small+nearest``: the small tier with the nearest examples, the prompts EchoLM offloads), and
generates every request twice, side by side: on a generator with ``prefix_cache_mb=0`` (every prompt
prefilled in full) and on one with the tier's prefix cache. Both run on the same machine, one request
after the other, so load from other jobs hits both alike. Printed: total and per-request seconds of
each, the speed-up, the prompt tokens reused as measured by the generator, and as predicted by the
evaluation's replay of the same cache (``echolm.evaluation.prefix_reuse``), which is what the cost
model credits. Answers of both are compared (llama.cpp batches a reused prompt's rest differently, so
greedy answers can differ in rare near-ties).

    python bench/bench_prefix_cache.py --workload gsm8k-numbers-program --arm small+nearest \\
        --json bench/results/prefix_cache.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.assets import resolve_model  # noqa: E402
from echolm.evaluation.evaluate import eval_settings, prefix_credit  # noqa: E402
from echolm.evaluation.generation_cache import DEFAULT_CACHE_DIR, GenerationCache  # noqa: E402
from echolm.evaluation.harness import WorkloadRun, default_embedder  # noqa: E402
from echolm.evaluation.replay_phase import stored_replayer  # noqa: E402
from echolm.evaluation.workload import load_workload  # noqa: E402
from echolm.generation.llamacpp import LlamaCppGenerator  # noqa: E402
from echolm.settings import Settings  # noqa: E402


async def side_by_side(run: WorkloadRun, arm_name: str, settings: Settings, limit: int | None) -> dict[str, object]:
    tier_name = run.arm_for(run.workload.traffic[0], arm_name).tier
    tier = settings.tier(tier_name)
    path = resolve_model(tier.model, settings.model_cache_dir)
    off = LlamaCppGenerator(tier.model_copy(update={"prefix_cache_mb": 0}), path)
    on = LlamaCppGenerator(tier, path)
    credit = prefix_credit(settings)
    assert credit is not None
    credit.start()
    rows = []
    items = run.workload.traffic[:limit] if limit else run.workload.traffic
    try:
        await off.start()
        await on.start()
        for n, item in enumerate(items):
            job = run.job(item, run.arm_for(item, arm_name))
            cold = await off.generate(list(job.messages), job.params, request_id=f"off-{n}")
            warm = await on.generate(list(job.messages), job.params, request_id=f"on-{n}")
            predicted = credit.reused(tier_name, job.key, job.messages, warm.completion_tokens)
            rows.append({"request": item.id, "prompt_tokens": cold.prompt_tokens, "off_s": cold.latency_s,
                         "on_s": warm.latency_s, "reused": warm.cached_prompt_tokens, "predicted_reused": predicted,
                         "same_answer": cold.text.strip() == warm.text.strip()})
            print(f"{n + 1:3d}/{len(items)} {item.id:>24} prompt {cold.prompt_tokens:5d}  reuse off {cold.latency_s:5.1f} s"
                  f"  on {warm.latency_s:5.1f} s  reused {warm.cached_prompt_tokens:5d} (predicted {predicted:5d})",
                  flush=True)
    finally:
        await off.aclose()
        await on.aclose()
    off_s, on_s = sum(r["off_s"] for r in rows), sum(r["on_s"] for r in rows)
    return {
        "workload": run.workload.name, "arm": arm_name, "tier": tier_name, "model": tier.model,
        "prefix_cache_mb": tier.prefix_cache_mb, "threads": tier.n_threads, "requests": len(rows),
        "reuse_off_s": round(off_s, 1), "reuse_on_s": round(on_s, 1), "speedup": round(off_s / on_s, 3),
        "median_off_s": round(statistics.median(r["off_s"] for r in rows), 2),
        "median_on_s": round(statistics.median(r["on_s"] for r in rows), 2),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows), "reused_tokens": sum(r["reused"] for r in rows),
        "predicted_reused_tokens": sum(r["predicted_reused"] for r in rows),
        "requests_where_prediction_differs": sum(r["reused"] != r["predicted_reused"] for r in rows),
        "same_answers": sum(r["same_answer"] for r in rows), "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="gsm8k-numbers-program")
    parser.add_argument("--arm", default="small+nearest", help="large, small, small+nearest, small+replayed, ...")
    parser.add_argument("--n-cache", type=int, default=40)
    parser.add_argument("--n-traffic", type=int, default=40)
    parser.add_argument("-k", "--examples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="only the first N traffic requests")
    parser.add_argument("--replay-samples", type=int, default=10, help="arm small+replayed: the stored replay's samples")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="the evaluation's generation cache")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    settings = eval_settings(Settings(log_level="WARNING"), 600.0, prompt_reuse=True)
    cache = GenerationCache(args.cache_dir)
    workload = load_workload(args.workload, settings.model_cache_dir, n_cache=args.n_cache,
                             n_traffic=args.n_traffic, seed=args.seed)
    run = WorkloadRun.build(workload, settings, cache, default_embedder(settings), k=args.examples, seed=args.seed)
    if args.arm == "small+replayed":
        from echolm.evaluation.quality import VerdictCache

        # Only a stored outcome is read: the arm is served with replay_outcome(generate=False).
        run.replayer = stored_replayer(args.cache_dir, settings, VerdictCache(args.cache_dir),
                                       samples=args.replay_samples)
    started = time.monotonic()
    result = asyncio.run(side_by_side(run, args.arm, settings, args.limit))
    result["wall_s"] = round(time.monotonic() - started, 1)
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
