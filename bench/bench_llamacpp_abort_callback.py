"""Decode speed of a llama.cpp tier with its abort callback armed for every graph node vs only while
the prompt is read (``echolm.generation.llamacpp``'s module docstring says why).

llama.cpp calls the abort callback after every node of the compute graph, several hundred times per
decoded token, and a Python callback takes the GIL each time while the model's other threads wait at
the next barrier. The generator now arms it only for prompt evaluation and checks its deadline once per
token while decoding. This runs the same prompts through both, alternating request by request on one
shared compute thread (so machine noise hits both alike and libgomp sees one team), on an idle event
loop and on one kept busy by Python work (as a worker's loop is while it consumes, embeds and routes).
Printed: milliseconds per decoded token for each tier, variant and loop, and the ratio.

    python bench/bench_llamacpp_abort_callback.py --tiers small,large --json bench/results/abort_callback.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.assets import resolve_model  # noqa: E402
from echolm.domain import ChatMessage, GenerationParams  # noqa: E402
from echolm.generation.llamacpp import LlamaCppGenerator, shared_compute_thread  # noqa: E402
from echolm.settings import Settings  # noqa: E402

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "A shop sells pens at 3 dollars and notebooks at 5 dollars. Tom buys 4 pens and 3 notebooks and pays "
    "with 50 dollars. How much change does he get? Explain step by step.",
    "Write a JavaScript function camelCase(s) that converts a snake_case string to camelCase.",
    "Explain in a short paragraph what a hash table is and why lookups are fast on average.",
]


class PerNodeAbortCheck(LlamaCppGenerator):
    """The generator as it was: the abort callback armed for decoding too (the baseline)."""

    def _arm_abort_callback(self, llm: Any, armed: bool) -> None:
        super()._arm_abort_callback(llm, True)


async def keep_loop_busy(stop: asyncio.Event, busy_ms: float = 0.5, idle_ms: float = 1.5) -> None:
    """Python work on the event loop's thread: ``busy_ms`` of it every ``busy_ms + idle_ms``."""
    while not stop.is_set():
        until = time.perf_counter() + busy_ms / 1000
        while time.perf_counter() < until:
            sum(range(50))
        await asyncio.sleep(idle_ms / 1000)


async def measure(tier_name: str, settings: Settings, max_tokens: int, rounds: int) -> list[dict[str, Any]]:
    tier = settings.tier(tier_name).model_copy(update={"prefix_cache_mb": 0, "timeout_s": 600.0})
    path = resolve_model(tier.model, settings.model_cache_dir)
    variants = {"per-node check (before)": PerNodeAbortCheck(tier, path, executor=shared_compute_thread()),
                "prompt-only check (now)": LlamaCppGenerator(tier, path, executor=shared_compute_thread())}
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    rows = []
    try:
        for generator in variants.values():
            await generator.start()
            await generator.generate([ChatMessage("user", "Say hi.")], params, request_id="warm-up")
        for loop_state in ("idle loop", "busy loop"):
            stop = asyncio.Event()
            busy = asyncio.create_task(keep_loop_busy(stop)) if loop_state == "busy loop" else None
            per_token: dict[str, list[float]] = {name: [] for name in variants}
            answers: dict[str, list[str]] = {name: [] for name in variants}
            for round_ in range(rounds):
                for n, prompt in enumerate(PROMPTS):
                    for name, generator in variants.items():
                        result = await generator.generate([ChatMessage("user", prompt)], params,
                                                          request_id=f"{tier_name}-{round_}-{n}")
                        assert result.decode_s is not None
                        per_token[name].append(result.decode_s / max(1, result.completion_tokens - 1))
                        answers[name].append(result.text)
            if busy is not None:
                stop.set()
                await busy
            names = list(variants)
            for name in names:
                rows.append({"tier": tier_name, "model": tier.model, "loop": loop_state, "variant": name,
                             "requests": len(per_token[name]),
                             "ms_per_token_median": 1000 * statistics.median(per_token[name]),
                             "ms_per_token_mean": 1000 * statistics.fmean(per_token[name])})
            rows[-1]["same_answers"] = sum(a == b for a, b in zip(answers[names[0]], answers[names[1]], strict=True))
    finally:
        for generator in variants.values():
            await generator.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", default="small,large", help="comma-separated tier names of the default settings")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the prompts per loop state")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    settings = Settings()
    rows = []
    for tier_name in args.tiers.split(","):
        rows += asyncio.run(measure(tier_name.strip(), settings, args.max_tokens, args.rounds))
    print(f"{'tier':6} {'loop':10} {'variant':26} {'ms/token median':>16} {'mean':>8}")
    for row in rows:
        print(f"{row['tier']:6} {row['loop']:10} {row['variant']:26} {row['ms_per_token_median']:16.1f} "
              f"{row['ms_per_token_mean']:8.1f}")
    for before, after in zip(rows[0::2], rows[1::2], strict=True):
        print(f"{before['tier']} on a {before['loop']}: decode {before['ms_per_token_median'] / after['ms_per_token_median']:.3f}x "
              f"faster with the prompt-only check; same answers {after['same_answers']}/{after['requests']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": _machine(), "max_tokens": args.max_tokens, "rows": rows}, indent=2))


def _machine() -> str:
    from echolm.evaluation.evaluate import machine_description

    return machine_description()


if __name__ == "__main__":
    main()
