"""The ``learn`` stage: keeps the learned models current from new feedback, off the critical path.

A leader-only timer (one learner however many workers run the stage):

* every ``learning.online_interval_s``: feedback stored since the last step updates the stored router
  online (``learning.update_router_online``: plain-SGD steps on the new (context, tier, reward)
  triples, pairwise verdicts into the Thompson prior) and stores a new version, which route workers
  load without a restart. Nothing happens before ``echolm router fit`` stored a first router.
* every ``learning.selector_refit_interval_s``: the helpfulness proxy is retrained and the stage-2
  threshold re-chosen from all sampled outcomes (``learning.fit_selector``); retrievers reload it.

Each step runs in a thread with its own event loop and database engine, so model fitting never
blocks the worker's agents. Feedback is read with an overlap (rows can become visible out of
``created_at`` order) and de-duplicated by id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from echolm.settings import Settings
from streams.app import _Wiring, register_stage

log = logging.getLogger(__name__)

OVERLAP = timedelta(minutes=2)


@dataclass
class LearnerState:
    """What the learner remembers between steps."""

    cursor: datetime | None = None
    seen: dict[str, datetime] = field(default_factory=dict)
    next_selector_fit: float = 0.0
    example_history: Any = None


async def learn_step(settings: Settings, embedder: Any, learner: LearnerState, *, now: float | None = None) -> dict[str, Any]:
    """One step (module docstring); returns what it did."""
    from echolm.history.feedback_store import FeedbackStore
    from echolm.history.store import SqlHistoryStore
    from echolm.learning import ExampleHistory, fit_selector, update_router_online
    from echolm.model_store import ModelStore

    now = time.monotonic() if now is None else now
    history = SqlHistoryStore(settings.resolved_database_url)
    report: dict[str, Any] = {}
    try:
        store, models = FeedbackStore(history), ModelStore(history)
        since = None if learner.cursor is None else learner.cursor - OVERLAP
        rows = [r for r in await store.recent_feedback(20_000, since=since) if r.feedback_id not in learner.seen]
        if rows:
            if learner.example_history is None:
                learner.example_history = ExampleHistory()
            update = await update_router_online(store, models, embedder, settings, rows,
                                                example_history=learner.example_history)
            report["router"] = {"rows": update.rows, "samples": update.samples, "version": update.version}
            for row in rows:
                if row.created_at is not None:
                    learner.seen[row.feedback_id] = row.created_at
            learner.cursor = max(learner.seen.values(), default=learner.cursor)
            if learner.cursor is not None:
                horizon = learner.cursor - 2 * OVERLAP
                learner.seen = {k: v for k, v in learner.seen.items() if v >= horizon}
        if now >= learner.next_selector_fit:
            learner.next_selector_fit = now + settings.learning.selector_refit_interval_s
            fit = await fit_selector(store, models, embedder, settings)
            report["selector"] = fit.summary()
    finally:
        await history.aclose()
    return report


@register_stage("learn")
def wire(w: _Wiring) -> None:
    learner = LearnerState()
    # The first selector refit waits one interval: `echolm selector fit` exists for an immediate one.
    learner.next_selector_fit = time.monotonic() + w.settings.learning.selector_refit_interval_s

    @w.timer(w.settings.learning.online_interval_s, on_leader=True)
    async def learn() -> None:
        embedder = await w.services.embedder()
        try:
            report = await asyncio.to_thread(lambda: asyncio.run(learn_step(w.settings, embedder, learner)))
        except Exception:
            log.exception("learning step failed; the stored models stay as they are")
            return
        if report:
            log.info("learning step: %s", report)
