"""Evaluation workloads: an example-cache part, a traffic part with realistic skew, and arrival times.

As in the paper, the data set is split in two: the **cache part** is answered once by the large model
and those answers seed the example cache; the **traffic part** is what the systems are measured on.
Traffic is skewed the way real traffic is: requests are drawn from near-duplicate *groups* with Zipf
popularity, so some groups are asked many times and some once. Arrival times (Poisson at a given rate)
are drawn separately, for the latency figures.

Workloads by data set:

* **GSM8K**: no two questions are near-duplicates; cache and traffic questions are disjoint (the
  paper's train/test split), traffic repeats popular questions.
* **GSM8K, numbers changed** (``gsm8k-numbers``): a group is one GSM8K problem. The cache holds the
  problem as published; traffic asks it again with other numbers (``number_variants``: the solution's
  annotated arithmetic re-run, so every variant has a known answer), each request with its own
  numbers, over the cached problems and unseen ones alike. A cached answer returned verbatim is
  wrong; used as an example it shows the way. Only problems whose arithmetic can be traced are used.
* **The same, asked for a program** (``gsm8k-numbers-program``): every request (cache and traffic)
  asks for a short Python program that prints the answer; the ``program-output`` verifier runs it in
  the sandbox. A cached program is then an example whose numbers the small model only has to swap.
* **MBPP**: a group is one programming task. The cache holds each cached task once, asked in Python
  or translated into another language (the data set ships 17: real near-duplicates). Traffic asks for
  Python only (so unit tests can judge every answer), with a different example test shown than the
  cached Python phrasing, and covers cached tasks and unseen ones alike.
* **MBPP, camelCase** (``mbpp-camel``): the same split, but the traffic asks for the function under
  its camelCase name (``similarElements`` for ``similar_elements``), in the shown test and the asserts
  alike: near-duplicates that differ in content, as when teams with other naming conventions ask for
  the same thing. A cached answer returned verbatim no longer passes; one used as an example still
  shows how to solve the task.
* **JSONL**: any file of ``{"prompt", "reference"}`` lines (optionally ``"answer"``: a number, or
  ``"tests"``: Python asserts, and ``"group"``); groups default to one per line.

Everything here is deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from echolm.datasets import TaskItem, load_gsm8k, load_gsm8k_docs, load_mbpp, parse_gsm8k
from echolm.evaluation.number_variants import Untraceable, vary

# Languages the MBPP cache part draws its non-Python phrasings from (popular ones, with readable code).
MBPP_CACHE_LANGUAGES = ("javascript", "java", "cpp", "go", "rust", "typescript")
DEFAULT_ZIPF_S = 1.1
BUILT_IN_WORKLOADS = ("gsm8k", "gsm8k-numbers", "gsm8k-numbers-program", "mbpp", "mbpp-camel")
# Appended to every GSM8K question (cache and traffic alike). Without it both models wrote long LaTeX
# derivations that 200 tokens cut before the answer (3 of the first 4 large-model answers, measured).
GSM8K_INSTRUCTION = "Solve it step by step, briefly. End with a line of the form: The answer is <number>."
# At 256 tokens 53% of Qwen2.5-Coder-1.5B's step-by-step answers were cut before their last line
# (measured on 40 questions); their median length is about 220 tokens.
GSM8K_MAX_TOKENS = 512
# gsm8k-numbers-program: the same problems asked for a program (program-of-thought, as PAL does), the
# form a coder model answers best; the verifier runs the program and reads the number it prints.
GSM8K_PROGRAM_INSTRUCTION = ("Write a short Python program that computes the answer and prints it as a "
                             "single number. Reply with the program only.")
# At 256, 4 of the first 11 Qwen2.5-Coder-0.5B answers to MBPP traffic were cut inside the self-test the
# model appends after a complete function (an unterminated line fails the whole program): a verbosity
# artefact of the cap, not a wrong solution (session 7; the 1.5B's answers average ~130 tokens).
MBPP_MAX_TOKENS = 512


@dataclass(frozen=True, slots=True)
class Workload:
    """One data set's evaluation workload.

    ``cache``: requests whose large-model answers seed the example cache, in a fixed random order
    (a cache of size ``n`` is the first ``n``: smaller caches are prefixes, so cache-size sweeps nest).
    ``traffic``: the requests served, in arrival order (repeats included). ``verifier`` is "numeric",
    "python-tests", or "none" (win rate then needs an LLM judge).
    """

    name: str
    cache: tuple[TaskItem, ...]
    traffic: tuple[TaskItem, ...]
    verifier: str
    max_tokens: int
    description: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def unique_traffic(self) -> list[TaskItem]:
        """Distinct traffic requests (by id) in first-arrival order: what has to be generated."""
        seen: dict[str, TaskItem] = {}
        for item in self.traffic:
            seen.setdefault(item.id, item)
        return list(seen.values())

    def limited(self, limit: int | None) -> Workload:
        """The same workload with at most ``limit`` traffic requests and cache entries (quick runs)."""
        if limit is None:
            return self
        return replace(self, cache=self.cache[:limit], traffic=self.traffic[:limit])


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Popularity of ranks 1..n under Zipf's law with exponent ``s`` (normalised to sum to 1)."""
    if n <= 0:
        raise ValueError("zipf_weights needs n >= 1")
    weights = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return weights / weights.sum()


def zipf_sample(population: Sequence[str], n: int, s: float, rng: random.Random) -> list[str]:
    """``n`` draws (with replacement) from ``population``, whose order is its popularity rank."""
    weights = zipf_weights(len(population), s)
    return rng.choices(list(population), weights=list(weights), k=n)


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Arrival times (seconds from 0) of ``n`` requests of a Poisson process at ``rate`` requests/s."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps)


def gsm8k_workload(items: Sequence[TaskItem], *, n_cache: int, n_pool: int, n_traffic: int,
                   zipf_s: float = DEFAULT_ZIPF_S, seed: int = 0, max_tokens: int = GSM8K_MAX_TOKENS) -> Workload:
    """Cache: ``n_cache`` random questions. Traffic: ``n_traffic`` Zipf draws over ``n_pool`` other questions."""
    rng = random.Random(seed)
    shuffled = [replace(item, prompt=f"{item.prompt}\n{GSM8K_INSTRUCTION}") for item in items]
    rng.shuffle(shuffled)
    if len(shuffled) < n_cache + n_pool:
        raise ValueError(f"GSM8K has {len(shuffled)} questions; {n_cache + n_pool} needed")
    cache, pool = shuffled[:n_cache], shuffled[n_cache:n_cache + n_pool]
    by_id = {item.id: item for item in pool}
    traffic = [by_id[i] for i in zipf_sample([p.id for p in pool], n_traffic, zipf_s, rng)]
    return Workload(
        name="gsm8k", cache=tuple(cache), traffic=tuple(traffic), verifier="numeric", max_tokens=max_tokens,
        description=(f"GSM8K test: {n_cache} questions in the cache part; traffic {n_traffic} requests, "
                     f"Zipf(s={zipf_s}) over {n_pool} other questions"),
        extra={"zipf_s": zipf_s, "pool": n_pool},
    )


def number_variant(item: TaskItem, solution: str, draw: int, seed: int,
                   instruction: str = GSM8K_INSTRUCTION) -> TaskItem:
    """Draw number ``draw`` of ``item`` with new numbers (deterministic); raises ``Untraceable``.

    ``item`` is a parsed GSM8K problem (its prompt the bare question), ``solution`` its raw answer.
    """
    variant = vary(item.prompt, solution, item.answer or "", random.Random(f"{seed}:{item.id}:{draw}"))
    return replace(item, id=f"{item.id}-n{draw}", prompt=f"{variant.question}\n{instruction}",
                   reference=variant.solution, answer=variant.answer)


def gsm8k_numbers_workload(docs: Sequence[dict[str, object]], *, n_cache: int, n_unseen: int, n_traffic: int,
                           zipf_s: float = DEFAULT_ZIPF_S, seed: int = 0,
                           max_tokens: int = GSM8K_MAX_TOKENS, as_program: bool = False) -> Workload:
    """Cache: ``n_cache`` GSM8K problems as published. Traffic: ``n_traffic`` Zipf draws over them and
    ``n_unseen`` others, each request the drawn problem with its own new numbers. ``as_program``: every
    request asks for a Python program that prints the answer (``gsm8k-numbers-program``); the split and
    the numbers are the same."""
    instruction = GSM8K_PROGRAM_INSTRUCTION if as_program else GSM8K_INSTRUCTION
    rng = random.Random(seed)
    items = parse_gsm8k(docs)  # type: ignore[arg-type]
    solutions = {item.id: str(doc["answer"]) for item, doc in zip(items, docs, strict=True)}
    traceable = []
    for item in items:
        try:
            number_variant(item, solutions[item.id], 1, seed)  # draw 1: the first request's numbers
        except Untraceable:
            continue
        traceable.append(item)
    rng.shuffle(traceable)
    if len(traceable) < n_cache + n_unseen:
        raise ValueError(f"GSM8K has {len(traceable)} problems whose numbers can be changed; "
                         f"{n_cache + n_unseen} needed")
    cache = [replace(item, prompt=f"{item.prompt}\n{instruction}") for item in traceable[:n_cache]]
    served = traceable[:n_cache + n_unseen]
    rng.shuffle(served)
    by_group = {item.group: item for item in served}
    asked: dict[str, dict[str, TaskItem]] = {}  # group -> prompt -> request
    traffic = []
    for group in zipf_sample([item.group for item in served], n_traffic, zipf_s, rng):
        seen = asked.setdefault(group, {})
        request = _fresh_variant(by_group[group], solutions[group], len(seen) + 1, seed, seen, instruction)
        seen[request.prompt] = request
        traffic.append(request)
    return Workload(
        name="gsm8k-numbers-program" if as_program else "gsm8k-numbers", cache=tuple(cache), traffic=tuple(traffic),
        verifier="program-output" if as_program else "numeric", max_tokens=max_tokens,
        description=(f"GSM8K test, numbers changed{', asked for a program' if as_program else ''}: {n_cache} "
                     "problems as published in the cache part; traffic "
                     f"{n_traffic} requests, Zipf(s={zipf_s}) over the {n_cache} cached and {n_unseen} unseen "
                     f"problems, each asked with its own numbers ({len(traceable)} of {len(items)} problems "
                     "have arithmetic that can be re-run)"),
        extra={"zipf_s": zipf_s, "unseen": n_unseen, "traceable": len(traceable)},
    )


def _fresh_variant(item: TaskItem, solution: str, draw: int, seed: int, seen: Mapping[str, TaskItem],
                   instruction: str = GSM8K_INSTRUCTION) -> TaskItem:
    """Variant ``draw``, or a later one when its numbers repeat an earlier request's (``seen``: prompt ->
    request); a problem with few valid numbers may run out, and then the earlier request repeats, as
    in real traffic."""
    for attempt in (draw, *range(draw + 1000, draw + 1050)):
        try:
            variant = number_variant(item, solution, attempt, seed, instruction)
        except Untraceable:  # these numbers found no whole answer; other draws may
            continue
        if variant.prompt not in seen:
            return replace(variant, id=f"{item.id}-n{draw}")
    if not seen:
        raise ValueError(f"{item.id}: no variant with a whole answer in 51 draws")
    return next(iter(seen.values()))


def _with_shown_test(item: TaskItem, index: int) -> TaskItem:
    """A Python MBPP task phrased with its ``index``-th assert as the shown example (another phrasing)."""
    if index == 0 or len(item.tests) <= index:
        return item
    shown = item.tests[0].splitlines()[-1]
    alternative = item.tests[index].splitlines()[-1]
    return replace(item, id=f"{item.id}-t{index}", prompt=item.prompt.replace(shown, alternative))


_SNAKE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+$")


def camel_case(name: str) -> str:
    """``similar_elements`` -> ``similarElements``; names without an underscore are returned as they are."""
    if not _SNAKE_NAME.match(name):
        return name
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _tested_functions(item: TaskItem) -> list[str]:
    """Top-level functions of the reference solution that the task's asserts call."""
    defined = re.findall(r"^def\s+(\w+)\s*\(", item.reference, re.MULTILINE)
    return [name for name in dict.fromkeys(defined) if any(re.search(rf"\b{name}\s*\(", t) for t in item.tests)]


def with_camel_case_names(item: TaskItem) -> TaskItem:
    """The task asking for its tested functions under camelCase names (prompt and asserts rewritten
    alike); unchanged when no tested function has a snake_case name."""
    renames = {name: camel_case(name) for name in _tested_functions(item) if camel_case(name) != name}
    if not renames:
        return item
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")(?=\s*\()")

    def rename(text: str) -> str:
        return pattern.sub(lambda m: renames[m.group(1)], text)

    return replace(item, id=f"{item.id}-camel", prompt=rename(item.prompt), tests=tuple(rename(t) for t in item.tests))


def mbpp_workload(python: Sequence[TaskItem], translations: Sequence[TaskItem], *, n_cache: int, n_unseen: int,
                  n_traffic: int, python_cache_share: float = 0.5, zipf_s: float = DEFAULT_ZIPF_S, seed: int = 0,
                  max_tokens: int = MBPP_MAX_TOKENS, camel_case_traffic: bool = False) -> Workload:
    """Cache: ``n_cache`` tasks, each in Python (share ``python_cache_share``) or another language.

    Traffic: ``n_traffic`` Zipf draws over the cached tasks plus ``n_unseen`` tasks not in the cache,
    in random popularity order, always asked in Python with the second assert shown (the cached Python
    phrasing shows the first), so that unit tests judge every answer. ``camel_case_traffic``: traffic
    asks for camelCase function names (``with_camel_case_names``); the split is the same.
    """
    rng = random.Random(seed)
    tasks = [t for t in python if len(t.tests) >= 2]
    rng.shuffle(tasks)
    if len(tasks) < n_cache + n_unseen:
        raise ValueError(f"MBPP has {len(tasks)} tasks with tests; {n_cache + n_unseen} needed")
    translated: dict[tuple[str, str | None], TaskItem] = {(t.group, t.language): t for t in translations}
    cache: list[TaskItem] = []
    for i, task in enumerate(tasks[:n_cache]):
        options = [lang for lang in MBPP_CACHE_LANGUAGES if (task.group, lang) in translated]
        in_python = rng.random() < python_cache_share or not options
        cache.append(task if in_python else translated[(task.group, rng.choice(options))])
    served = tasks[:n_cache + n_unseen]
    rng.shuffle(served)
    variants = {task.group: _with_shown_test(task, 1) for task in served}
    if camel_case_traffic:
        variants = {group: with_camel_case_names(task) for group, task in variants.items()}
    traffic = [variants[g] for g in zipf_sample([t.group for t in served], n_traffic, zipf_s, rng)]
    naming = ", function names asked in camelCase" if camel_case_traffic else ""
    return Workload(
        name="mbpp-camel" if camel_case_traffic else "mbpp", cache=tuple(cache), traffic=tuple(traffic),
        verifier="python-tests", max_tokens=max_tokens,
        description=(f"MBPP (codex_mbpp asserts + mt_mbpp translations): {n_cache} tasks in the cache part "
                     f"({python_cache_share:.0%} asked in Python, the rest in {', '.join(MBPP_CACHE_LANGUAGES)}); "
                     f"traffic {n_traffic} Python requests{naming}, Zipf(s={zipf_s}) over the {n_cache} cached "
                     f"and {n_unseen} unseen tasks"),
        extra={"zipf_s": zipf_s, "unseen": n_unseen, "python_cache_share": python_cache_share,
               "camel_case_traffic": camel_case_traffic},
    )


def jsonl_items(path: Path) -> list[TaskItem]:
    """Items of a ``{"prompt", "reference"[, "answer", "tests", "group", "id"]}`` JSONL file."""
    items = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "prompt" not in record or "reference" not in record:
            raise ValueError(f"{path}:{line_no}: a line needs 'prompt' and 'reference'")
        item_id = str(record.get("id", f"line-{line_no}"))
        tests = record.get("tests") or ()
        items.append(TaskItem(id=item_id, group=str(record.get("group", item_id)), prompt=str(record["prompt"]),
                              reference=str(record["reference"]),
                              answer=None if record.get("answer") is None else str(record["answer"]),
                              tests=tuple(tests), language=record.get("language")))
    return items


def jsonl_workload(items: Sequence[TaskItem], *, name: str, n_cache: int, n_traffic: int,
                   zipf_s: float = DEFAULT_ZIPF_S, seed: int = 0, max_tokens: int = 256) -> Workload:
    """Groups split between cache and traffic; traffic Zipf over the groups not in the cache part."""
    rng = random.Random(seed)
    groups: dict[str, list[TaskItem]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    order = list(groups)
    rng.shuffle(order)
    cache = [groups[g][0] for g in order[:n_cache]]
    pool = order[n_cache:] or order
    traffic = [rng.choice(groups[g]) for g in zipf_sample(pool, n_traffic, zipf_s, rng)]
    if all(item.tests for item in items):
        verifier = "python-tests"
    elif all(item.answer is not None for item in items):
        verifier = "numeric"
    else:
        verifier = "none"
    return Workload(name=name, cache=tuple(cache), traffic=tuple(traffic), verifier=verifier, max_tokens=max_tokens,
                    description=f"{name}: {len(cache)} cache requests; traffic {n_traffic}, Zipf(s={zipf_s})",
                    extra={"zipf_s": zipf_s})


def load_workload(name: str, cache_dir: Path, *, n_cache: int = 40, n_traffic: int = 40, seed: int = 0,
                  jsonl: Path | None = None) -> Workload:
    """The named workload ("gsm8k", "mbpp", or any name with ``jsonl``) with the default split shapes."""
    if jsonl is not None:
        return jsonl_workload(jsonl_items(jsonl), name=name, n_cache=n_cache, n_traffic=n_traffic, seed=seed)
    if name == "gsm8k":
        return gsm8k_workload(load_gsm8k(cache_dir), n_cache=n_cache, n_pool=n_traffic, n_traffic=n_traffic,
                              seed=seed)
    if name in ("gsm8k-numbers", "gsm8k-numbers-program"):
        return gsm8k_numbers_workload(load_gsm8k_docs(cache_dir), n_cache=n_cache, n_unseen=max(1, n_cache // 2),
                                      n_traffic=n_traffic, seed=seed, as_program=name == "gsm8k-numbers-program")
    if name in ("mbpp", "mbpp-camel"):
        items = load_mbpp(cache_dir, languages=("python", *MBPP_CACHE_LANGUAGES))
        python = [t for t in items if t.language == "python"]
        others = [t for t in items if t.language != "python"]
        return mbpp_workload(python, others, n_cache=n_cache, n_unseen=max(1, n_cache // 2), n_traffic=n_traffic,
                             seed=seed, camel_case_traffic=name == "mbpp-camel")
    raise ValueError(f"unknown workload {name!r}: use {', '.join(BUILT_IN_WORKLOADS)}, or pass a JSONL file")
