"""``echolm demo``: the main job on the embedded default, on real data and real models.

1. Warm the cache: MBPP programming tasks (Python) answered by the large model (routed
   always-large); the log stage admits those answers as examples.
2. Batch new requests: the same kind of tasks asked for other languages (real near-duplicates:
   MBPP is translated into 17 languages) mixed with unseen tasks. The router offloads a request to
   the small model, with the cached answers as hints, when close examples exist.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from echolm.datasets import TaskItem, load_mbpp
from echolm.settings import Settings
from streams.local import run_local_batch

log = logging.getLogger(__name__)

HISTORY_LANGUAGE = "python"
REQUEST_LANGUAGES = ("javascript", "rust", "go")


def _batch_line(custom_id: str, prompt: str, max_tokens: int) -> str:
    return json.dumps({
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens},
    })


def demo_workload(cache_dir: Path, n_history: int, n_requests: int) -> tuple[list[TaskItem], list[TaskItem]]:
    """History: n_history Python tasks. Requests: their translations (about half) plus unseen tasks."""
    tasks = load_mbpp(cache_dir, languages=(HISTORY_LANGUAGE, *REQUEST_LANGUAGES))
    by_language: dict[str | None, dict[str, TaskItem]] = {}
    for task in tasks:
        by_language.setdefault(task.language, {})[task.group] = task
    python = by_language.get(HISTORY_LANGUAGE, {})
    groups = sorted(set(python).intersection(*(by_language.get(lang, {}) for lang in REQUEST_LANGUAGES)))
    if len(groups) < n_history + n_requests:
        raise ValueError(f"only {len(groups)} MBPP tasks exist in all demo languages")
    history = [python[g] for g in groups[:n_history]]
    n_similar = min(n_history, (n_requests + 1) // 2)
    similar = [by_language[REQUEST_LANGUAGES[i % len(REQUEST_LANGUAGES)]][g] for i, g in enumerate(groups[:n_similar])]
    unseen_groups = groups[n_history:n_history + n_requests - n_similar]
    unseen = [by_language[REQUEST_LANGUAGES[i % len(REQUEST_LANGUAGES)]][g] for i, g in enumerate(unseen_groups)]
    return history, similar + unseen


# Measured with MiniLM on this workload: a task and its translation score 0.60-0.77, unrelated
# tasks 0.15-0.45 (the Python prompts carry a test assert, which the translations lack).
DEMO_OFFLOAD_SIMILARITY = 0.55


def run_demo(settings: Settings, out_dir: Path, n_history: int, n_requests: int,
             max_tokens: int = 192, offload_min_similarity: float = DEMO_OFFLOAD_SIMILARITY) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    # The demo always starts from an empty cache and fresh outputs, so its figures mean the same each run.
    state = out_dir / "state"
    for stale in (out_dir / "history.out.jsonl", out_dir / "requests.out.jsonl", state / "echolm.db",
                  state / "echolm.db-wal", state / "echolm.db-shm"):
        stale.unlink(missing_ok=True)
    settings = settings.model_copy(update={"data_dir": state.resolve(), "database_url": None,
                                           "offload_min_similarity": offload_min_similarity})
    history, requests = demo_workload(settings.model_cache_dir, n_history, n_requests)
    history_in, requests_in = out_dir / "history.jsonl", out_dir / "requests.jsonl"
    history_in.write_text("".join(_batch_line(f"history-{t.id}", t.prompt, max_tokens) + "\n" for t in history))
    requests_in.write_text("".join(_batch_line(f"request-{t.id}", t.prompt, max_tokens) + "\n" for t in requests))

    log.info("phase 1/2: %d tasks answered by the large model to warm the example cache", len(history))
    warm = run_local_batch(settings.model_copy(update={"router_policy": "always-large"}), history_in,
                           out_dir / "history.out.jsonl")
    log.info("phase 2/2: %d new requests, routed by similarity to cached examples", len(requests))
    served = run_local_batch(settings, requests_in, out_dir / "requests.out.jsonl")

    result = served.to_dict()
    result["examples_cached_in_phase_1"] = warm.answered
    result["phase_1_wall_s"] = round(warm.wall_s, 1)
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    result["summary"] = str(out_dir / "summary.json")
    return result
