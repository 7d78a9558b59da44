"""Does the small model follow a worked solution of the same problem? One hint, several prompt layouts.

Takes the ``gsm8k-numbers`` workload (GSM8K problems asked again with other numbers; the same seed and
sizes as ``echolm eval``), keeps the distinct traffic requests whose original problem is in the cache
part, and asks the small tier each of them: alone, and with the original problem's published worked
solution (calculator annotations removed, ending "The answer is N.") as its one hint, in each layout
of ``echolm.prompting``. Answers are checked against the re-computed reference; greedy decoding, so a
re-run gives the same table on the same build.

    python bench/probe_hint_layouts.py                  # every arm, 20 requests (~7 min on 2 cores)
    python bench/probe_hint_layouts.py --arms alone,system --requests 40

``--hint-source large`` uses the large tier's own answer to the original problem as the hint instead
(what the cache holds in ``echolm eval``), generated once per problem.

Arm ``hints-first-plain`` is the default layout with ``HINT_GUIDANCE`` replaced by one sentence: it
separates the effect of the guidance text from the effect of where the hint sits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm import prompting  # noqa: E402
from echolm.datasets import gsm8k_solution_text, load_gsm8k_docs  # noqa: E402
from echolm.domain import ChatMessage, Example, GenerationParams, RetrievedExample  # noqa: E402
from echolm.evaluation.evaluate import eval_settings  # noqa: E402
from echolm.evaluation.workload import GSM8K_MAX_TOKENS, gsm8k_numbers_workload  # noqa: E402
from echolm.generation.factory import make_generator  # noqa: E402
from echolm.judging.verifiers import numeric_answer_match  # noqa: E402
from echolm.settings import Settings  # noqa: E402

ARMS = ("alone", "hints-first", "paper", "system", "hints-first-plain")
PLAIN_GUIDANCE = "Hints are for reference only."


def arm_messages(arm: str, prompt: str, hint: Example) -> list[ChatMessage]:
    request = [ChatMessage(role="user", content=prompt)]
    if arm == "alone":
        return request
    examples = [RetrievedExample(example=hint, similarity=0.95)]
    layout = "hints-first" if arm == "hints-first-plain" else arm
    with mock.patch.object(prompting, "HINT_GUIDANCE", PLAIN_GUIDANCE if arm == "hints-first-plain"
                           else prompting.HINT_GUIDANCE):
        return prompting.build_messages(request, examples, budget_chars=6_000, layout=layout)  # type: ignore[arg-type]


async def run(args: argparse.Namespace) -> None:
    settings = eval_settings(Settings(), timeout_s=900, threads=args.threads)
    docs = load_gsm8k_docs(settings.model_cache_dir)
    workload = gsm8k_numbers_workload(docs, n_cache=40, n_unseen=40, n_traffic=args.traffic, seed=args.seed)
    cached = {item.group: item for item in workload.cache}
    solutions = {f"gsm8k-{doc['id']}": str(doc["answer"]) for doc in docs}
    requests, seen = [], set()
    for item in workload.traffic:
        if item.group in cached and item.prompt not in seen:
            seen.add(item.prompt)
            requests.append(item)
    requests = requests[:args.requests]
    tier = next(t for t in settings.tiers if t.name == args.tier)
    generator = make_generator(tier, settings)
    params = GenerationParams(max_tokens=GSM8K_MAX_TOKENS)
    hints = {group: gsm8k_solution_text(solutions[group]) for group in {item.group for item in requests}}
    if args.hint_source == "large":
        large = make_generator(settings.largest_tier, settings)
        try:
            for group in sorted(hints):
                answer = await large.generate([ChatMessage(role="user", content=cached[group].prompt)], params,
                                              request_id=f"hint-{group}")
                hints[group] = answer.text
            right = sum(numeric_answer_match(hints[g], solutions[g]).passed for g in hints)
            print(f"large tier's answers as hints: {right}/{len(hints)} problems right", flush=True)
        finally:
            await large.aclose()
    print(f"{len(requests)} requests of the {args.traffic}-request traffic whose problem is cached; "
          f"tier {tier.name} ({tier.model})", flush=True)
    table = []
    try:
        for arm in args.arms.split(","):
            right = bare = tokens = 0
            started = time.monotonic()
            for item in requests:
                hint = Example(id=1, tenant="probe", prompt=cached[item.group].prompt,
                               response=hints[item.group], model=args.hint_source, tier="large")
                result = await generator.generate(arm_messages(arm, item.prompt, hint), params, request_id=item.id)
                right += numeric_answer_match(result.text, item.reference).passed
                bare += result.completion_tokens <= 12  # "The answer is N." and nothing else
                tokens += result.completion_tokens
            table.append((arm, right, bare, tokens / len(requests), time.monotonic() - started))
            print(f"  {arm:18s} {right:3d}/{len(requests)} right, {bare:3d} bare final lines, "
                  f"{tokens / len(requests):6.1f} tokens/answer", flush=True)
    finally:
        await generator.aclose()
    print("\n| arm | right | bare final lines | tokens/answer |\n|---|---|---|---|")
    for arm, right, bare, mean_tokens, _ in table:
        print(f"| {arm} | {right}/{len(requests)} | {bare} | {mean_tokens:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--requests", type=int, default=20, help="distinct requests to ask (default 20)")
    parser.add_argument("--traffic", type=int, default=40, help="traffic size of the workload (as echolm eval)")
    parser.add_argument("--tier", default="small")
    parser.add_argument("--hint-source", choices=["published", "large"], default="published",
                        help="the hint: GSM8K's published solution, or the large tier's answer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"unknown arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
