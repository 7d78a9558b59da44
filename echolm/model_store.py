"""Learned model states in the database (table ``model_states``, migration 0002), as JSON, never pickle.

Each ``save`` adds a version (1, 2, ...) of a named model (``helpfulness``, ``router``); workers poll
``latest_version`` (one indexed read) and load the state only when the number changed, so a model
trained by ``echolm selector fit`` or ``echolm router fit`` reaches running workers without a restart.
Old versions beyond ``keep`` are deleted on save.

``ModelWatcher`` is that polling loop's state: when to look again and which version is loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select

from echolm.history.store import SqlHistoryStore
from echolm.history.tables import ModelStateRow, utc_now

log = logging.getLogger(__name__)

HELPFULNESS_MODEL = "helpfulness"
ROUTER_MODEL = "router"


@dataclass(frozen=True, slots=True)
class StoredModel:
    name: str
    version: int
    state: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime


class ModelStore:
    """Versioned JSON model states on a ``SqlHistoryStore``'s engine."""

    def __init__(self, history: SqlHistoryStore) -> None:
        self._history = history

    async def save(self, name: str, state: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
                   *, keep: int = 5) -> int:
        """Store ``state`` as the next version of ``name``; returns that version."""
        text = json.dumps(state, separators=(",", ":"), allow_nan=False)
        async with self._history._write() as connection:  # noqa: SLF001 - same package, shared engine
            newest = (await connection.execute(
                select(func.max(ModelStateRow.version)).where(ModelStateRow.name == name))).scalar_one()
            version = int(newest or 0) + 1
            await connection.execute(self._history._insert(ModelStateRow).values(  # noqa: SLF001
                name=name, version=version, state=text, metrics=dict(metrics or {}), created_at=utc_now()))
            await connection.execute(delete(ModelStateRow).where(ModelStateRow.name == name,
                                                                 ModelStateRow.version <= version - keep))
        return version

    async def latest_version(self, name: str) -> int | None:
        async with self._history._read() as connection:  # noqa: SLF001
            value = (await connection.execute(
                select(func.max(ModelStateRow.version)).where(ModelStateRow.name == name))).scalar_one()
        return None if value is None else int(value)

    async def load(self, name: str, version: int | None = None) -> StoredModel | None:
        """The newest (or the given) version of ``name``; None if there is none."""
        query = select(ModelStateRow.__table__).where(ModelStateRow.name == name)
        query = query.where(ModelStateRow.version == version) if version is not None else \
            query.order_by(ModelStateRow.version.desc()).limit(1)
        async with self._history._read() as connection:  # noqa: SLF001
            row = (await connection.execute(query)).first()
        if row is None:
            return None
        return StoredModel(row.name, int(row.version), json.loads(row.state), dict(row.metrics or {}),
                           row.created_at)


@dataclass
class ModelWatcher:
    """Reloads a named model when a newer version is stored, at most every ``interval_s`` seconds.

    ``apply`` receives each newly loaded ``StoredModel``; a failure to read or apply is logged and
    retried at the next interval, and the model in use stays as it was.
    """

    name: str
    apply: Callable[[StoredModel], None]
    interval_s: float = 10.0
    timeout_s: float = 10.0
    loaded_version: int | None = None
    _next_check: float = field(default=0.0, repr=False)

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self._next_check

    async def poll(self, store: ModelStore, *, force: bool = False) -> bool:
        """Look for a newer version if due (or ``force``); returns whether one was applied."""
        if not force and not self.due():
            return False
        self._next_check = time.monotonic() + self.interval_s
        try:
            version = await asyncio.wait_for(store.latest_version(self.name), self.timeout_s)
            if version is None or version == self.loaded_version:
                return False
            stored = await asyncio.wait_for(store.load(self.name, version), self.timeout_s)
            if stored is None:
                return False
            self.apply(stored)
        except Exception:
            log.exception("loading model %s failed; keeping version %s", self.name, self.loaded_version)
            return False
        self.loaded_version = stored.version
        log.info("model %s: version %d loaded", self.name, stored.version)
        return True
