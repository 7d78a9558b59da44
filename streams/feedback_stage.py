"""The ``feedback`` stage: stores feedback from the feedback topic in the history's ``feedback`` table.

Producers (``echolm feedback``, user code) put one ``echolm.feedback.FeedbackInput`` JSON per event,
keyed by request id. Storing is idempotent per ``feedback_id``, so redelivery is harmless; database
writes are retried until they succeed (the batch is acknowledged only after). An event that is not
valid feedback is logged and counted, then skipped: there is nobody to answer it to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from prometheus_client import Counter

from echolm.feedback import FeedbackInput, describe_error
from echolm.history.feedback_store import FeedbackStore
from echolm.history.store import SqlHistoryStore
from echolm.settings import Settings
from streams.app import _Wiring, register_stage
from streams.stages import Outgoing

log = logging.getLogger(__name__)

FEEDBACK_RECEIVED = Counter("echolm_feedback_received_total", "Valid feedback events received", ["kind"])
FEEDBACK_STORED = Counter("echolm_feedback_stored_total", "Feedback rows stored (not seen before)")
FEEDBACK_REJECTED = Counter("echolm_feedback_rejected_total", "Feedback events that were not valid feedback")


def decode_feedback(key: str | None, raw: bytes) -> FeedbackInput | None:
    """A feedback event, or None (logged) when it is not valid feedback."""
    from pydantic import ValidationError

    try:
        return FeedbackInput.model_validate_json(raw)
    except ValidationError as exc:
        problem = describe_error(exc)
    except UnicodeDecodeError:
        problem = "not UTF-8"
    log.warning("skipping invalid feedback event key=%s: %s", key, problem)
    FEEDBACK_REJECTED.inc()
    return None


class FeedbackStage:
    """Stores a batch of feedback; retries the database until it answers."""

    name = "feedback"

    def __init__(self, settings: Settings, store: FeedbackStore, max_backoff_s: float = 10.0) -> None:
        self._settings = settings
        self._store = store
        self._max_backoff_s = max_backoff_s

    async def process(self, records: Sequence[FeedbackInput]) -> list[Outgoing]:
        items = [r.to_feedback() for r in records]
        delay = 0.2
        while True:
            try:
                new = await self._store.record_feedback(items)
                break
            except Exception as exc:
                log.warning("history unavailable (%s: %s); retrying feedback in %.1fs", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
        for item in items:
            FEEDBACK_RECEIVED.labels(item.kind).inc()
        FEEDBACK_STORED.inc(new)
        if new:
            log.info("stored %d new feedback rows (%d received)", new, len(items))
        return []


@register_stage("feedback")
def wire(w: _Wiring) -> None:
    async def handle(records: list[FeedbackInput]) -> list[Outgoing]:
        async def build() -> FeedbackStage:
            history = await w.services.history()
            assert isinstance(history, SqlHistoryStore), "the feedback stage needs the SQL history store"
            return FeedbackStage(w.settings, FeedbackStore(history))

        stage = await w._stage("feedback", build)  # noqa: SLF001 - the wiring's own stage cache
        return await stage.process(records)

    w.agent(w.settings.topics.feedback, "feedback", decode_feedback, handle)
