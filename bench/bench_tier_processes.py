"""Two llama.cpp tiers on a few CPU cores: one generation at a time on every core, or one per core?

A worker serving both tiers on a small machine can run them
- ``shared``: in one process on one shared compute thread, each generation on every core, one
  generation at a time (the default when the tiers' threads together exceed the cores, see
  ``echolm.generation.llamacpp``);
- ``own-threads``: in one process, each tier on its own thread with ``cores / 2`` llama.cpp threads,
  so a small and a large request generate at once (``n_threads`` per tier,
  ``ECHOLM_LLAMACPP_SHARED_THREAD=false``); a tier's own requests still go one at a time;
- ``per-core``: one process per core, each holding both tiers on one llama.cpp thread, every process
  taking the next request of either tier (as one ``echolm worker --stage generate`` per core with
  ``n_threads`` 1 would: two requests of any tiers generate at once).

Two threads decode a token less than twice as fast as one (they meet at a barrier after every graph
node), so two requests decoded side by side, one core each, can finish sooner than the same two decoded
one after the other on both cores; and if the tiers scaled differently, the split would change their speed ratio, which bounds what
offloading gains on a CPU. Session 16 (2 cores, 16 requests per mix): per-core 1.22-1.23x on every mix,
the tiers alike (docs/evaluation.md, "Session 16").

Each arrangement serves the same requests per traffic mix (``mixed``: alternately small and large;
``small``; ``large``), in fresh processes; rounds alternate the order so machine noise hits all alike.
Printed: wall seconds from the moment all models are loaded until the last answer, decoded tokens per
second, the speed against ``shared`` on the same mix, and how many answers equal ``shared``'s (greedy
decoding; llama.cpp's floats depend on its thread count, so some may differ).

    python bench/bench_tier_processes.py --requests 16 --arrangements shared,per-core \
        --json bench/results/tier_processes.json

With fewer requests the last one, alone on one core, decides the per-core wall time (8 requests gave
1.01x-1.39x on the same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.assets import resolve_model  # noqa: E402
from echolm.domain import ChatMessage, GenerationParams  # noqa: E402
from echolm.evaluation.workload import load_workload  # noqa: E402
from echolm.settings import Settings  # noqa: E402

ARRANGEMENTS = ("shared", "own-threads", "per-core")
MIXES = ("mixed", "small", "large")
TIERS = ("small", "large")


def process_layout(arrangement: str, cores: int) -> list[tuple[int, bool]]:
    """The processes an arrangement starts, each holding both tiers: (llama.cpp threads per tier,
    whether the tiers share one compute thread)."""
    if arrangement == "shared":
        return [(cores, True)]
    if arrangement == "own-threads":
        return [(max(1, cores // 2), False)]
    if arrangement == "per-core":
        return [(1, True)] * cores
    raise ValueError(f"unknown arrangement {arrangement!r}: use {', '.join(ARRANGEMENTS)}")


def serve(threads: int, shared_thread: bool, queues: dict[str, Any], max_tokens: int, ready: Any, go: Any,
          results: Any) -> None:
    """One serving process: load both tiers, say ready, wait for ``go``, then each tier takes requests
    from its queue (shared with the other processes) one at a time until it is empty."""
    asyncio.run(_serve(threads, shared_thread, queues, max_tokens, ready, go, results))


async def _serve(threads: int, shared_thread: bool, queues: dict[str, Any], max_tokens: int, ready: Any, go: Any,
                 results: Any) -> None:
    from echolm.generation.llamacpp import LlamaCppGenerator, shared_compute_thread

    settings = Settings(log_level="WARNING")
    generators = {}
    for name in TIERS:
        tier = settings.tier(name).model_copy(update={"n_threads": threads, "prefix_cache_mb": 0, "timeout_s": 900.0})
        generators[name] = LlamaCppGenerator(tier, resolve_model(tier.model, settings.model_cache_dir),
                                             executor=shared_compute_thread() if shared_thread else None)
    for generator in generators.values():
        await generator.start()
        await generator.generate([ChatMessage("user", "Say hi.")], GenerationParams(max_tokens=4, temperature=0.0),
                                 request_id="warm-up")
    ready.put(os.getpid())
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    started = time.perf_counter()
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)

    async def take_requests(name: str) -> list[dict[str, Any]]:
        answered = []
        while True:
            try:
                index, prompt = await loop.run_in_executor(None, queues[name].get_nowait)
            except queue.Empty:
                return answered
            result = await generators[name].generate([ChatMessage("user", prompt)], params, request_id=f"job-{index}")
            answered.append({"index": index, "tier": name, "text": result.text, "pid": os.getpid(),
                             "completion_tokens": result.completion_tokens, "done_s": time.perf_counter() - started})

    per_tier = await asyncio.gather(*(take_requests(name) for name in TIERS))
    results.put([answer for answers in per_tier for answer in answers])
    for generator in generators.values():
        await generator.aclose()


def run_arrangement(arrangement: str, cores: int, jobs: list[tuple[int, str, str]], max_tokens: int) -> dict[str, Any]:
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        queues = {name: manager.Queue() for name in TIERS}
        for index, tier, prompt in jobs:
            queues[tier].put((index, prompt))
        ready, results, go = context.Queue(), context.Queue(), context.Event()
        processes = [context.Process(target=serve, args=(threads, shared, queues, max_tokens, ready, go, results))
                     for threads, shared in process_layout(arrangement, cores)]
        for process in processes:
            process.start()
        for _ in processes:
            ready.get(timeout=900)
        go.set()
        answers = [answer for _ in processes for answer in results.get(timeout=3600)]
        for process in processes:
            process.join(timeout=120)
            if process.exitcode != 0:
                raise RuntimeError(f"{arrangement}: a serving process exited with {process.exitcode}")
    return {"wall_s": max(answer["done_s"] for answer in answers),
            "decoded_tokens": sum(answer["completion_tokens"] for answer in answers),
            "answers": {answer["index"]: answer["text"] for answer in answers}}


def mix_jobs(mix: str, prompts: list[str]) -> list[tuple[int, str, str]]:
    if mix == "mixed":
        return [(i, TIERS[i % 2], prompt) for i, prompt in enumerate(prompts)]
    return [(i, mix, prompt) for i, prompt in enumerate(prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="gsm8k-numbers-program", help="traffic prompts from this eval workload")
    parser.add_argument("--requests", type=int, default=16, help="distinct requests per traffic mix")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=1, help="each arrangement this many times per mix, alternating")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--arrangements", default=",".join(ARRANGEMENTS), help="the first is the baseline")
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    arrangements = [a.strip() for a in args.arrangements.split(",") if a.strip()]
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    for arrangement in arrangements:
        process_layout(arrangement, args.cores)  # fail on a typo before loading anything
    unknown = set(mixes) - set(MIXES)
    if unknown:
        parser.error(f"unknown mixes {sorted(unknown)}: use {', '.join(MIXES)}")

    workload = load_workload(args.workload, Settings(log_level="WARNING").model_cache_dir)
    prompts = list(dict.fromkeys(item.prompt for item in workload.traffic))[: args.requests]

    summary = []
    for mix in mixes:
        jobs = mix_jobs(mix, prompts)
        runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arrangements}
        for round_ in range(args.rounds):
            for arrangement in arrangements if round_ % 2 == 0 else arrangements[::-1]:
                run = run_arrangement(arrangement, args.cores, jobs, args.max_tokens)
                runs[arrangement].append(run)
                print(f"{mix:>5} round {round_ + 1} {arrangement:>11}: {run['wall_s']:6.1f} s, "
                      f"{run['decoded_tokens'] / run['wall_s']:5.1f} decoded tokens/s", flush=True)
        baseline = runs[arrangements[0]]
        base_wall = statistics.median(r["wall_s"] for r in baseline)
        for arrangement, arrangement_runs in runs.items():
            wall = statistics.median(r["wall_s"] for r in arrangement_runs)
            summary.append({
                "mix": mix, "arrangement": arrangement, "requests": len(jobs), "wall_s": wall,
                "decoded_tokens_per_s": statistics.median(r["decoded_tokens"] / r["wall_s"] for r in arrangement_runs),
                "speed_vs_baseline": base_wall / wall,
                "same_answers": sum(arrangement_runs[0]["answers"][i] == baseline[0]["answers"][i] for i, _, _ in jobs),
                "runs_wall_s": [r["wall_s"] for r in arrangement_runs]})

    print(f"\n{len(prompts)} requests per mix ({args.workload}), max_tokens {args.max_tokens}, {args.cores} cores, "
          f"{args.rounds} round(s); median over rounds; speed against {arrangements[0]} on the same mix")
    print(f"{'mix':>5} {'arrangement':>11} {'wall s':>7} {'tok/s':>6} {'speed':>6} {'same answers':>12}")
    for row in summary:
        print(f"{row['mix']:>5} {row['arrangement']:>11} {row['wall_s']:7.1f} {row['decoded_tokens_per_s']:6.1f} "
              f"{row['speed_vs_baseline']:5.2f}x {row['same_answers']:>5}/{row['requests']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"workload": args.workload, "requests": len(prompts), "cores": args.cores,
                                         "max_tokens": args.max_tokens, "rounds": args.rounds, "summary": summary},
                                        indent=2))


if __name__ == "__main__":
    main()
