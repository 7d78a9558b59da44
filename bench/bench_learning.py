"""Costs of the learned parts on this machine: what they add per request, and how long training takes.

* stage 2 (``selection.ExampleSelector.select``) per request with ``--candidates`` candidates: cold start
  (similarity) and with a trained helpfulness proxy;
* the bandit router's ``route`` per request (context vector, MLP utilities, measured costs, load bias);
* ``TierUtilityModel.fit`` (router bootstrap) and ``partial_fit`` (one online step) on N samples;
* ``HelpfulnessModel.fit`` on N pairs.

Embeddings are random unit vectors of the real width (384, MiniLM): these are costs, not quality.

    python bench/bench_learning.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np

from echolm.domain import Example, RetrievedExample
from echolm.policy.bandit import ExampleFeatures, context_vector
from echolm.policy.helpfulness import HelpfulnessModel, HelpfulnessPair
from echolm.protocols import RoutingContext
from echolm.routing.bandit_router import LoadAwareBanditRouter, new_state
from echolm.selection import ExampleSelector, SelectionPolicy
from echolm.settings import Settings, TierSettings

DIM = 384


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def per_call_ms(call, repeats: int) -> float:
    call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--samples", type=int, default=2000, help="router training samples / helpfulness pairs")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    settings = Settings(tiers=[TierSettings(name="small", backend="echo", model="s", relative_cost=1.0),
                               TierSettings(name="large", backend="echo", model="l", relative_cost=3.0,
                                            use_examples=False)],
                        bandit={"epsilon": 0.05, "compare_rate": 0.0})
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                               "candidates": args.candidates, "samples": args.samples, "epochs": args.epochs}

    # Stage 2.
    request = unit_rows(rng, 1)[0]
    example_vecs = unit_rows(rng, args.candidates)
    candidates = [RetrievedExample(Example(i, "t", f"question {i} " * 10, f"answer {i} " * 40, "m", "large", 0.8),
                                   float(0.5 + 0.04 * i)) for i in range(args.candidates)]
    vectors = {i: example_vecs[i] for i in range(args.candidates)}
    cold = ExampleSelector(SelectionPolicy(0.5, 5, 6000))
    results["stage2_cold_ms_per_request"] = round(per_call_ms(lambda: cold.select(request, candidates, vectors), 300), 4)
    pairs = [HelpfulnessPair(a, b, 0.8, 400) for a, b in zip(unit_rows(rng, args.samples), unit_rows(rng, args.samples))]
    labels = rng.integers(0, 2, size=args.samples)
    model = HelpfulnessModel(DIM)
    started = time.perf_counter()
    model.fit(pairs, labels)
    results["helpfulness_fit_s"] = round(time.perf_counter() - started, 3)
    learned = ExampleSelector(SelectionPolicy(0.5, 5, 6000), model)
    results["stage2_learned_ms_per_request"] = round(per_call_ms(lambda: learned.select(request, candidates, vectors),
                                                                 300), 4)

    # Router.
    state = new_state(settings, DIM)
    contexts = np.stack([context_vector(v, ExampleFeatures(3, 0.9, 0.8, 0.7, 0.8), DIM) for v in unit_rows(rng, args.samples)])
    tiers = [("small", "large")[i % 2] for i in range(args.samples)]
    rewards = rng.normal(size=args.samples).tolist()
    started = time.perf_counter()
    state.bandit.model.fit(contexts, tiers, rewards, epochs=args.epochs)
    results["router_fit_s"] = round(time.perf_counter() - started, 3)
    results["router_parameters"] = state.bandit.model.n_parameters
    batch = slice(0, 64)
    results["router_online_step_ms_64"] = round(per_call_ms(
        lambda: state.bandit.model.partial_fit(contexts[batch], tiers[batch], rewards[batch]), 20), 3)
    router = LoadAwareBanditRouter(settings, state, loads=lambda: {"large": 1.5})
    context = RoutingContext("r", "t", 200, candidates[:5], request)
    results["route_ms_per_request"] = round(per_call_ms(lambda: router.route(context), 300), 4)

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:<34} {value}")


if __name__ == "__main__":
    main()
