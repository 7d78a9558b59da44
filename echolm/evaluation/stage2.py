"""Stage 2 with a *trained* helpfulness proxy, as a deployment trains it, for the evaluation.

At cold start stage 2 keeps examples by similarity alone. A deployment then learns which examples
help from outcomes of requests served with them (judge verdicts, feedback) and refits the proxy
(``echolm selector fit``). The evaluation does the same with the verifier as the autorater:

* **labels**: every (request, example) pair the small model was served with on the ``small+nearest``
  and ``small+random`` arms, labelled with whether that answer passed;
* **training**: one ``HelpfulnessModel`` per near-duplicate group, fitted on the *other* groups'
  pairs only (leave one group out, like the evaluation's learned routers), so a request never learns
  from its own outcome or a near-duplicate's;
* **deployment guard**: as ``echolm selector fit`` does, the trained proxy replaces similarity only
  when it ranks held-out outcomes (20% of the training requests) better than similarity does;
  otherwise the group's requests keep the cold-start selection;
* **selection**: the project's ``ExampleSelector`` over the request's ``retrieve_top_k`` candidates
  with the trained model, a helpfulness threshold, the count guard ``k`` and the prompt budget. It may
  keep no example at all: the request then goes to the small model without examples.

The example quality feature is left unknown (``None``): the cache's answers are not verified in a
deployment either, unless a judge scored them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from echolm.domain import RetrievedExample
from echolm.evaluation.harness import MissingGenerations, WorkloadRun
from echolm.evaluation.quality import VerdictCache
from echolm.policy.helpfulness import HelpfulnessModel, HelpfulnessPair, holdout_aucs, trained_beats_similarity
from echolm.selection import ExampleSelector, SelectionPolicy

LEARNED_ARM = "small+learned"
TRAINING_ARMS = ("small+nearest", "small+random")
# Below this many labelled pairs the proxy stays at cold start (similarity), as in the pipeline.
MIN_TRAINING_PAIRS = 20


def labelled_pairs(run: WorkloadRun, verdicts: VerdictCache,
                   arms: Sequence[str] = TRAINING_ARMS) -> dict[str, list[tuple[HelpfulnessPair, bool]]]:
    """Per traffic request, its (request, example) pairs on ``arms`` with the served answer's verdict.

    Raises ``MissingGenerations`` while a training arm is not generated yet."""
    if run.cache_vectors is None:
        raise MissingGenerations(f"{run.workload.name}: the cache part's embeddings are not available")
    examples = run.examples()
    pairs: dict[str, list[tuple[HelpfulnessPair, bool]]] = {}
    for item in run.workload.unique_traffic:
        sims = run.table.row(item.id)
        rows = []
        for arm_name in arms:
            arm = run.arm_for(item, arm_name)
            passed = verdicts.verify(item, run.generation(item, arm).text, run.workload.verifier).passed
            rows.extend((HelpfulnessPair(request_vec=run.vectors[item.id], example_vec=run.cache_vectors[i],
                                         example_quality=None, response_chars=len(examples[i].response),
                                         similarity=float(sims[i])), passed)
                        for i in arm.examples)
        pairs[item.id] = rows
    return pairs


def learned_selections(run: WorkloadRun, verdicts: VerdictCache, *, threshold: float, max_count: int,
                       seed: int = 0, regularisation: float = 1.0,
                       cold_start_threshold: float | None = None) -> dict[str, tuple[int, ...]]:
    """Cache indices stage 2 keeps for each traffic request, with a proxy trained leave-one-group-out.

    Where the proxy does not pass the deployment guard, the cold-start rule (similarity >=
    ``cold_start_threshold``, default ``learning.selection_threshold``) selects instead."""
    pairs = labelled_pairs(run, verdicts)
    examples = run.examples()
    assert run.cache_vectors is not None  # checked by labelled_pairs
    dim = run.cache_vectors.shape[1]
    budget = run.settings.max_examples_prompt_chars
    cold_start = ExampleSelector(SelectionPolicy(
        run.settings.learning.selection_threshold if cold_start_threshold is None else cold_start_threshold,
        max_count, budget))
    items = run.workload.unique_traffic
    selections: dict[str, tuple[int, ...]] = {}
    for group in sorted({item.group for item in items}):
        training_items = [item for item in items if item.group != group]
        train = [(row, n) for n, item in enumerate(training_items) for row in pairs[item.id]]
        train_pairs = [pair for (pair, _), _ in train]
        train_labels = [label for (_, label), _ in train]
        model = HelpfulnessModel(dim, min_samples=MIN_TRAINING_PAIRS, regularisation=regularisation, seed=seed)
        model.fit(train_pairs, train_labels)
        trained_auc, similarity_auc = holdout_aucs(dim, train_pairs, train_labels, [n for _, n in train],
                                                   min_samples=MIN_TRAINING_PAIRS, regularisation=regularisation)
        deployed = model.fitted and trained_beats_similarity(trained_auc, similarity_auc)
        selector = ExampleSelector(SelectionPolicy(threshold, max_count, budget), model) if deployed else cold_start
        for item in (i for i in items if i.group == group):
            candidates = run.table.nearest(item.id, run.settings.retrieve_top_k)
            retrieved = [RetrievedExample(example=examples[i], similarity=sim) for i, sim in candidates]
            vectors = {examples[i].id: np.asarray(run.cache_vectors[i]) for i, _ in candidates}
            kept = selector.select(run.vectors[item.id], retrieved, vectors)
            selections[item.id] = tuple(sorted(r.example.id - 1 for r in kept))
    return selections
