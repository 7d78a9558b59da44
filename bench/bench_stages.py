"""Per-request overhead of EchoLM's critical-path stages before generation: embed, retrieve, route.

For each request: embed it alone with the real all-MiniLM-L6-v2 (what a lightly loaded embed stage
does; in float32 and in bfloat16, alternating request by request so both see the same machine
load), search the in-memory ``ExampleCache`` holding N examples of the request's tenant, and route
it with ``SimilarityRouter``; the total is the per-request sum. Also measured: the embedder's
batched throughput (what the embed stage sustains under load), the time to load N examples into
the cache (a retriever's cold start), and IVF recall@k against exact search on the same data.

The cache is filled from real text: a few thousand GSM8K and MBPP prompts are embedded, and N
vectors are made from them by adding Gaussian noise and re-normalising (copy-to-source cosine about
0.9), so the cache has the clustered structure of real embeddings (``--fill random`` uses
independent random unit vectors instead). Queries are other GSM8K/MBPP prompts, embedded for real.

Target (issue): embed + retrieve + route p50 < 15 ms per request at 100k examples on 2 cores.

    python bench/bench_stages.py --sizes 10000 100000 --queries 500 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echolm.datasets import load_gsm8k, load_mbpp  # noqa: E402
from echolm.domain import Example  # noqa: E402
from echolm.protocols import CacheEvent, RoutingContext  # noqa: E402
from echolm.retrieval.embedder import SentenceTransformerEmbedder  # noqa: E402
from echolm.retrieval.example_cache import ExampleCache  # noqa: E402
from echolm.retrieval.faiss_index import ivf_cluster_count  # noqa: E402
from echolm.routing.similarity import SimilarityRouter  # noqa: E402
from echolm.settings import Settings  # noqa: E402

TARGET_TOTAL_P50_MS = 15.0
TARGET_SIZE = 100_000
TENANT = "bench"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Noise scale per unit vector: a copy's cosine to its source is about 1 / sqrt(1 + NOISE**2) ~ 0.9.
NOISE = 0.5


def corpus(cache_dir: Path, seed: int) -> list[str]:
    """Real request texts: GSM8K questions and MBPP tasks in several languages (near-duplicates)."""
    texts = [item.prompt for item in load_gsm8k(cache_dir)]
    texts += [item.prompt for item in load_mbpp(cache_dir, ("python", "java", "rust", "go", "javascript", "cpp"))]
    random.Random(seed).shuffle(texts)
    return texts


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean())}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def fill_vectors(base: np.ndarray, n: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    d = base.shape[1]
    if mode == "random":
        vectors = rng.standard_normal((n, d), dtype=np.float32)
    elif n <= len(base):
        return base[:n].copy()
    else:
        sources = base[np.arange(n) % len(base)]
        noise = rng.standard_normal((n, d), dtype=np.float32) * (NOISE / np.sqrt(d))
        vectors = sources + noise
        vectors[: len(base)] = base  # the real vectors themselves are in the cache too
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def fill_cache(vectors: np.ndarray, texts: Sequence[str], ivf_min_examples: int,
               nprobe: int) -> tuple[ExampleCache, float]:
    cache = ExampleCache(vectors.shape[1], ivf_min_examples=ivf_min_examples, nprobe=nprobe)
    events = [CacheEvent(seq=i + 1, op="add", embedding=vectors[i],
                         example=Example(id=i + 1, tenant=TENANT, prompt=texts[i % len(texts)],
                                         response="(cached answer)", model="large", tier="large"))
              for i in range(len(vectors))]
    seconds, _ = timed(lambda: cache.apply(events))
    return cache, seconds


def embed_single(embedders: dict[str, SentenceTransformerEmbedder], queries: Sequence[str],
                 warmup: int) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Each query embedded alone by each embedder, alternating, so all see the same machine load.

    Returns the first embedder's vectors (used for retrieval) and per-embedder latencies.
    """
    for embedder in embedders.values():
        for text in queries[:warmup]:
            embedder.embed([text])
    vectors: list[np.ndarray] = []
    latencies: dict[str, list[float]] = {name: [] for name in embedders}
    for text in queries:
        for position, (name, embedder) in enumerate(embedders.items()):
            seconds, vector = timed(partial(embedder.embed, [text]))
            latencies[name].append(seconds)
            if position == 0:
                vectors.append(vector[0])
    return np.stack(vectors), latencies


def embed_throughput(embedder: SentenceTransformerEmbedder, texts: Sequence[str], batch_size: int) -> float:
    embedder.embed(texts[:batch_size])
    started = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        embedder.embed(texts[i:i + batch_size])
    return len(texts) / (time.perf_counter() - started)


def run_size(size: int, layout: str, base: np.ndarray, base_texts: Sequence[str], queries: np.ndarray,
             embed_latencies: dict[str, list[float]], settings: Settings, args: argparse.Namespace,
             exact_ids: dict[int, list[list[int]]]) -> list[dict[str, Any]]:
    """One cache of ``size`` examples in ``layout``: one row per embedder dtype."""
    rng = np.random.default_rng(args.seed + size)
    vectors = fill_vectors(base, size, args.fill, rng)
    ivf_min_examples = {"flat": 2**62, "ivf": 0, "auto": settings.ivf_min_examples}[layout]
    cache, fill_s = fill_cache(vectors, base_texts, ivf_min_examples, settings.ivf_nprobe)
    router = SimilarityRouter.from_settings(settings)
    k, min_similarity = settings.retrieve_top_k, settings.min_similarity

    for vector in queries[: args.warmup]:
        cache.search(TENANT, vector[None], k, min_similarity)
    retrieve, route, found = [], [], []
    offloaded = 0
    for i, vector in enumerate(queries):
        seconds, found_rows = timed(partial(cache.search, TENANT, vector[None], k, min_similarity))
        hits = found_rows[0]
        retrieve.append(seconds)
        found.append([h.example.id for h in hits])
        context = RoutingContext(request_id=f"q{i}", tenant=TENANT, prompt_chars=0, examples=hits, embedding=vector)
        seconds, decision = timed(partial(router.route, context))
        route.append(seconds)
        offloaded += decision.use_examples

    built = cache.layout(TENANT) or "empty"
    shared: dict[str, Any] = {
        "examples": size, "layout": built, "fill_s": round(fill_s, 2),
        "retrieve_ms": percentiles_ms(retrieve), "route_ms": percentiles_ms(route),
        "offloaded_fraction": offloaded / len(queries), "mean_hits": float(np.mean([len(f) for f in found])),
    }
    if built == "flat":
        exact_ids[size] = found
    elif size in exact_ids:
        exact = exact_ids[size]
        matched = sum(len(set(a) & set(b)) for a, b in zip(found, exact, strict=True))
        shared["recall_vs_exact"] = matched / max(1, sum(len(b) for b in exact))
    if built == "ivf":
        shared["nlist"] = ivf_cluster_count(size)
    rows = []
    for dtype, latencies in embed_latencies.items():
        total = [e + r + o for e, r, o in zip(latencies, retrieve, route, strict=True)]
        rows.append({**shared, "embed_dtype": dtype, "embed_ms": percentiles_ms(latencies),
                     "total_ms": percentiles_ms(total)})
    return rows


def print_table(rows: Sequence[dict[str, Any]], header: dict[str, Any]) -> None:
    print(f"\nper-request stage overhead, ms (p50 / p99) - {header['queries']} single requests, "
          f"{header['cpu_count']} CPU cores, torch threads {header['torch_threads']}, "
          f"load avg at start {header['load_avg_start']}")
    print(f"cache fill: {header['fill']}; k={header['k']}, min_similarity={header['min_similarity']}, "
          f"nprobe={header['nprobe']}")
    columns = f"{'examples':>9} {'layout':>6} {'embed dtype':>11} {'embed':>13} {'retrieve':>13} {'route':>13} " \
              f"{'total':>13} {'recall':>7} {'offload':>7} {'fill s':>7}"
    print(columns)
    print("-" * len(columns))
    def pair(row: dict[str, Any], key: str) -> str:
        return f"{row[key]['p50']:6.2f}/{row[key]['p99']:6.2f}"

    for row in rows:
        if "recall_vs_exact" in row:
            recall = f"{row['recall_vs_exact']:.3f}"
        else:
            recall = "exact" if row["layout"] == "flat" else "-"
        print(f"{row['examples']:>9,} {row['layout']:>6} {row['embed_dtype']:>11} {pair(row, 'embed_ms'):>13} "
              f"{pair(row, 'retrieve_ms'):>13} {pair(row, 'route_ms'):>13} {pair(row, 'total_ms'):>13} "
              f"{recall:>7} {row['offloaded_fraction']:>7.2f} {row['fill_s']:>7.2f}")
    print("recall: IVF top-k overlap with exact search on the same cache; offload: share routed small+examples;")
    print("fill s: applying N add events to an empty cache (a retriever's cold start, IVF training included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000],
                        help="cached examples (default 10000 100000)")
    parser.add_argument("--queries", type=int, default=500, help="single requests timed per size (default 500)")
    parser.add_argument("--layouts", nargs="+", choices=["flat", "ivf", "auto"], default=["flat", "ivf"],
                        help="index layouts to time: exact, IVF, or what settings choose (default flat ivf)")
    parser.add_argument("--fill", choices=["real", "random"], default="real",
                        help="real: noisy copies of embedded GSM8K/MBPP prompts; random: random unit vectors")
    parser.add_argument("--base-texts", type=int, default=3000, help="real texts embedded to fill the cache")
    parser.add_argument("--throughput-texts", type=int, default=1024, help="texts for the batched throughput")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls before each measurement")
    parser.add_argument("--embed-dtypes", nargs="+", choices=["float32", "bfloat16"],
                        default=["float32", "bfloat16"],
                        help="embedder compute dtypes to time (default both; the first embeds the cache)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the embedder (default: the embedder's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", nargs="?", type=Path, const=True, default=None,
                        help=f"also write the figures as JSON (default file under {RESULTS_DIR})")
    args = parser.parse_args()

    settings = Settings()
    load_start = os.getloadavg()[0]
    texts = corpus(settings.model_cache_dir, args.seed)
    queries_text = texts[: args.queries]
    base_texts = texts[args.queries: args.queries + args.base_texts]
    if len(queries_text) < args.queries or not base_texts:
        raise SystemExit(f"only {len(texts)} texts available; lower --queries or --base-texts")

    embedders = {dtype: SentenceTransformerEmbedder(settings.embedder_model, batch_size=settings.embed_batch_size,
                                                    num_threads=args.threads, dtype=dtype)
                 for dtype in args.embed_dtypes}
    reference = embedders[args.embed_dtypes[0]]
    load_s, _ = timed(lambda: [e.dimension for e in embedders.values()])
    print(f"embedders loaded in {load_s:.1f} s; embedding {len(base_texts)} cache texts ...", flush=True)
    base_s, base = timed(partial(reference.embed, base_texts))
    batch_sizes = sorted({settings.stage_batch_size, settings.embed_batch_size})
    throughput = {dtype: {bs: embed_throughput(e, texts[: args.throughput_texts], bs) for bs in batch_sizes}
                  for dtype, e in embedders.items()}
    queries, embed_latencies = embed_single(embedders, queries_text, args.warmup)

    rows: list[dict[str, Any]] = []
    exact_ids: dict[int, list[list[int]]] = {}
    for size in args.sizes:
        for layout in sorted(args.layouts, key=lambda name: name != "flat"):  # exact first: recall reference
            print(f"  {size:,} examples, {layout} ...", flush=True)
            rows += run_size(size, layout, base, base_texts, queries, embed_latencies, settings, args, exact_ids)

    import faiss
    import torch

    header = {
        "queries": args.queries, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
        "fill": f"{args.fill}: " + (f"{len(base_texts)} embedded GSM8K/MBPP prompts + noisy copies (cos ~0.9)"
                                     if args.fill == "real" else "random unit vectors"),
        "k": settings.retrieve_top_k, "min_similarity": settings.min_similarity, "nprobe": settings.ivf_nprobe,
        "embed_model": settings.embedder_model, "embed_dtypes": args.embed_dtypes,
    }
    print_table(rows, header)
    print(f"\nembedder batched throughput, texts/s ({args.throughput_texts} real prompts):")
    for dtype, rates in throughput.items():
        print(f"  {dtype:>9}: " + ", ".join(f"batch {bs}: {rate:.0f}" for bs, rate in rates.items()))
    print(f"  (cache fill: {len(base_texts)} texts at batch {settings.embed_batch_size}, "
          f"{args.embed_dtypes[0]}: {len(base_texts) / base_s:.0f} texts/s)")
    at_target = [r for r in rows if r["examples"] == TARGET_SIZE]
    for row in at_target:
        met = row["total_ms"]["p50"] < TARGET_TOTAL_P50_MS
        print(f"target: total p50 < {TARGET_TOTAL_P50_MS:.0f} ms at {TARGET_SIZE:,} examples "
              f"({row['layout']}, {row['embed_dtype']}): "
              f"{row['total_ms']['p50']:.2f} ms -> {'met' if met else 'NOT met'}")
    if os.getloadavg()[0] > (os.cpu_count() or 1) * 0.75:
        print("note: the machine was busy during the run (load average above); figures are pessimistic")

    if args.json is not None:
        default_path = RESULTS_DIR / f"bench_stages-{datetime.now():%Y%m%d-%H%M%S}.json"
        path = args.json if isinstance(args.json, Path) else default_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header, "rows": rows,
                                    "embed_throughput_texts_per_s": {
                                        d: {str(bs): r for bs, r in rates.items()} for d, rates in throughput.items()}},
                                   indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
