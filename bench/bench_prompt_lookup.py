"""Prompt lookup decoding on a llama.cpp tier: does drafting from the prompt decode EchoLM's answers faster?

Replays prompts an eval run sent to a tier (an ``echolm eval-cache export`` snapshot, e.g.
bench/results/answers_session12_k1.json.gz) through ``LlamaCppGenerator`` once per draft length
(``TierSettings.lookup_draft_tokens``; 0 is plain decoding), each in a fresh generator, and prints per
setting: decode seconds (after the first token; prefill is the same work either way), decoded tokens per
second, the speed against plain decoding, tokens per decode pass, and how many answers equal plain
decoding's (llama.cpp's floats differ between batch sizes, so a near tie can tip).

    python bench/bench_prompt_lookup.py --tier small --examples with --workload mbpp --drafts 0,3,5

Session 17 (2 cores, AMD EPYC): a batch of 1 + k tokens costs nearly k + 1 single steps on this CPU for
the 0.5B model (4 tokens about 2.3x one, logits included), while mbpp-camel's answers with an example
accept about 0.75 draft tokens per pass: drafting decodes slower there (docs/evaluation.md, "Session 17").
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.assets import resolve_model  # noqa: E402
from echolm.domain import ChatMessage, GenerationParams  # noqa: E402
from echolm.settings import Settings, TierSettings  # noqa: E402

MODELS = {"small": "qwen2.5-coder-0.5b-instruct", "large": "qwen2.5-coder-1.5b-instruct"}
# How the eval's prompts tell the workloads apart: MBPP's carry their unit test.
MBPP_MARKER = "Your code should pass"


def load_prompts(snapshot: Path, tier: str, with_examples: bool, workload: str, limit: int) -> list[dict[str, Any]]:
    """The snapshot's generations of ``tier``'s model, with or without examples (a system message and a
    hint block), of one workload."""
    entries = json.loads(gzip.decompress(snapshot.read_bytes()))["generations"]
    chosen = []
    for entry in entries:
        messages = json.loads(entry["messages"])
        if entry["model"] != MODELS[tier] or (len(messages) > 1) != with_examples:
            continue
        if (MBPP_MARKER in entry["messages"]) != (workload == "mbpp"):
            continue
        chosen.append({"messages": [ChatMessage(role, content) for role, content in messages],
                       "max_tokens": json.loads(entry["params"]).get("max_tokens")})
    return chosen[:limit] if limit else chosen


async def serve(tier: TierSettings, model_path: Path, prompts: list[dict[str, Any]]) -> dict[str, Any]:
    from echolm.generation.llamacpp import LlamaCppGenerator

    generator = LlamaCppGenerator(tier, model_path)
    await generator.start()
    try:
        answers, decode_s, decoded = [], 0.0, 0
        for i, prompt in enumerate(prompts):
            result = await generator.generate(
                prompt["messages"], GenerationParams(max_tokens=prompt["max_tokens"], temperature=0.0),
                request_id=f"p{i}")
            answers.append(result.text)
            decode_s += result.decode_s or 0.0
            # the first token comes with the prompt's pass: decode time covers the rest
            decoded += max(result.completion_tokens - 1, 0)
        stats = generator.lookup_stats
        return {"draft": tier.lookup_draft_tokens, "answers": answers, "decode_s": decode_s, "decoded": decoded,
                "passes": stats.passes if stats else decoded, "drafted": stats.drafted if stats else 0}
    finally:
        await generator.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshot", type=Path, default=Path("bench/results/answers_session12_k1.json.gz"))
    parser.add_argument("--tier", choices=sorted(MODELS), default="small")
    parser.add_argument("--examples", choices=("with", "without"), default="with",
                        help="prompts that carried examples (EchoLM's offloaded requests) or bare ones")
    parser.add_argument("--workload", choices=("mbpp", "gsm8k"), default="mbpp")
    parser.add_argument("--drafts", default="0,3", help="comma list of draft lengths; 0 is plain decoding")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    prompts = load_prompts(args.snapshot, args.tier, args.examples == "with", args.workload, args.limit)
    if not prompts:
        parser.error("no prompts of that tier, kind and workload in the snapshot")
    settings = Settings()
    model = MODELS[args.tier]
    model_path = resolve_model(model, settings.model_cache_dir)
    print(f"{len(prompts)} {args.workload} prompts {args.examples} examples on {model}", flush=True)
    runs = []
    for draft in (int(value) for value in args.drafts.split(",")):
        tier = TierSettings(name=args.tier, model=model, relative_cost=1.0, n_threads=args.threads,
                            lookup_draft_tokens=draft)
        run = asyncio.run(serve(tier, model_path, prompts))
        plain = runs[0] if runs and runs[0]["draft"] == 0 else None
        run["tok_per_s"] = run["decoded"] / run["decode_s"] if run["decode_s"] else 0.0
        run["speedup"] = run["tok_per_s"] / plain["tok_per_s"] if plain else None
        run["same_answers"] = sum(a == b for a, b in zip(run["answers"], plain["answers"])) if plain else None
        runs.append(run)
        against_plain = f", {run['speedup']:.2f}x plain" if plain else ""
        same = f", {run['same_answers']}/{len(prompts)} answers as plain" if plain else ""
        print(f"draft {draft}: decode {run['decode_s']:.1f} s for {run['decoded']} tokens "
              f"({run['tok_per_s']:.1f} tok/s{against_plain}), "
              f"{run['decoded'] / max(run['passes'], 1):.2f} tokens per pass, {run['drafted']} drafted{same}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tier": args.tier, "model": model, "workload": args.workload,
                                         "examples": args.examples, "prompts": len(prompts),
                                         "runs": [{k: v for k, v in run.items() if k != "answers"} for run in runs]},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
