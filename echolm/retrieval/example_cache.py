"""The retriever's in-memory copy of the example cache, kept in sync with the history store.

The history store is the source of truth; it appends a ``CacheEvent`` (add/remove, with a
monotonically assigned ``seq``) for every change. A retriever replays those events into one
``FaissIndex`` per tenant plus an id -> ``Example`` map. Each tenant has its own index, so a search
can never return another tenant's example, whatever the vectors.

Replaying is idempotent and order-tolerant: an event is applied only if its ``seq`` is newer than
the last event applied for the same example, so re-applying an event, or receiving an older one
late, changes nothing. Sequence numbers may become visible out of order (PostgreSQL assigns them
before commit) and may have permanent holes (rolled-back transactions), so ``sync_from`` remembers
holes in the sequence it has seen and re-reads from the oldest one, for at most ``overlap`` events
and ``gap_ttl_s`` seconds; below that point (``floor``) events count as applied.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from echolm.domain import Example, RetrievedExample
from echolm.protocols import CacheEvent, HistoryStore
from echolm.retrieval.faiss_index import FaissIndex
from echolm.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one ``apply`` call changed."""

    added: int
    removed: int
    ignored: int


class ExampleCache:
    """Per-tenant vector indexes over cached examples, fed by the history store's cache events."""

    def __init__(self, dimension: int, *, ivf_min_examples: int = 200_000, nprobe: int = 8,
                 overlap: int = 1_000, gap_ttl_s: float = 30.0) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {dimension}")
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {overlap}")
        self.dimension = dimension
        self.ivf_min_examples = ivf_min_examples
        self.nprobe = nprobe
        self.overlap = overlap
        self.gap_ttl_s = gap_ttl_s
        self._indexes: dict[str, FaissIndex] = {}
        self._examples: dict[int, Example] = {}
        # seq of the newest event applied per example id: live ones, and removed ones (tombstones,
        # so that a late 'add' cannot resurrect them; pruned once they fall below the floor).
        self._live_seq: dict[int, int] = {}
        self._tombstones: dict[int, int] = {}
        self._last_seq = 0
        self._floor = 0
        # Holes in the seq numbers seen so far: seq -> monotonic time it was first noticed.
        self._gaps: dict[int, float] = {}
        self._apply_lock = threading.Lock()
        self._sync_lock: asyncio.Lock | None = None

    @classmethod
    def from_settings(cls, dimension: int, settings: Settings) -> ExampleCache:
        return cls(dimension, ivf_min_examples=settings.ivf_min_examples, nprobe=settings.ivf_nprobe)

    # -- reading -------------------------------------------------------------------------------

    def search(self, tenant: str, vectors: np.ndarray, k: int,
               min_similarity: float = -1.0) -> list[list[RetrievedExample]]:
        """For each row of ``vectors`` (n, d): up to ``k`` of ``tenant``'s examples with cosine
        similarity >= ``min_similarity``, most similar first."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ValueError(f"vectors must have shape (n, {self.dimension}), got {vectors.shape}")
        index = self._indexes.get(tenant)
        if index is None or k <= 0 or len(index) == 0:
            return [[] for _ in range(len(vectors))]
        similarities, ids = index.search(vectors, k)
        results: list[list[RetrievedExample]] = []
        for row_similarities, row_ids in zip(similarities.tolist(), ids.tolist(), strict=True):
            hits = []
            for similarity, example_id in zip(row_similarities, row_ids, strict=True):
                if example_id < 0 or similarity < min_similarity:
                    continue
                example = self._examples.get(example_id)
                # An id may vanish between the index search and this lookup (a concurrent remove);
                # the tenant check is a second fence behind the per-tenant indexes.
                if example is None or example.tenant != tenant:
                    continue
                hits.append(RetrievedExample(example=example, similarity=min(1.0, similarity)))
            results.append(hits)
        return results

    def get(self, example_id: int) -> Example | None:
        return self._examples.get(example_id)

    def __len__(self) -> int:
        return len(self._examples)

    def size(self, tenant: str) -> int:
        index = self._indexes.get(tenant)
        return len(index) if index is not None else 0

    def layout(self, tenant: str) -> str | None:
        """'flat' (exact) or 'ivf' for a tenant's index; None if the tenant has none."""
        index = self._indexes.get(tenant)
        return index.layout if index is not None else None

    def tenants(self) -> list[str]:
        return sorted(t for t, index in list(self._indexes.items()) if len(index))

    @property
    def last_seq(self) -> int:
        """Highest event seq seen."""
        return self._last_seq

    @property
    def floor(self) -> int:
        """Events with seq <= floor are treated as applied; ``sync_from`` never reads below it."""
        return self._floor

    # -- writing -------------------------------------------------------------------------------

    def apply(self, events: Sequence[CacheEvent]) -> ApplyResult:
        """Apply cache events (any order, duplicates allowed): the newest event per example wins.

        Blocking (an index may re-train its clusters); async callers use ``sync_from`` or a thread.
        An invalid event (an add without an embedding of the right width, an unknown op) is logged
        and skipped rather than stopping the events behind it.
        """
        with self._apply_lock:
            newest: dict[int, CacheEvent] = {}
            ignored = 0
            for event in sorted(events, key=lambda e: e.seq):
                self._last_seq = max(self._last_seq, event.seq)
                example_id = event.example.id
                if event.seq <= self._floor or event.seq <= self._newest_applied(example_id):
                    ignored += 1
                    continue
                newest[example_id] = event
            removals: dict[str, list[int]] = {}
            additions: dict[str, list[tuple[Example, np.ndarray]]] = {}
            for example_id, event in newest.items():
                current = self._examples.get(example_id)
                if event.op == "add":
                    vector = self._valid_vector(event)
                    if vector is None:
                        ignored += 1
                        self._record_seq(example_id, event.seq, live=current is not None)
                        continue
                    if current is not None and current.tenant != event.example.tenant:
                        removals.setdefault(current.tenant, []).append(example_id)
                    additions.setdefault(event.example.tenant, []).append((event.example, vector))
                elif event.op == "remove":
                    if current is not None:
                        removals.setdefault(current.tenant, []).append(example_id)
                else:
                    log.error("cache event %d has unknown op %r; skipped", event.seq, event.op)
                    ignored += 1
                    self._record_seq(example_id, event.seq, live=current is not None)
                    continue
                self._record_seq(example_id, event.seq, live=event.op == "add")
            removed = self._remove(removals, newest)
            added = self._add(additions)
        return ApplyResult(added=added, removed=removed, ignored=ignored)

    def _newest_applied(self, example_id: int) -> int:
        return self._live_seq.get(example_id) or self._tombstones.get(example_id, 0)

    def _record_seq(self, example_id: int, seq: int, *, live: bool) -> None:
        if live:
            self._live_seq[example_id] = seq
            self._tombstones.pop(example_id, None)
        else:
            self._tombstones[example_id] = seq
            self._live_seq.pop(example_id, None)

    def _valid_vector(self, event: CacheEvent) -> np.ndarray | None:
        if event.embedding is None:
            log.error("cache event %d adds example %d without an embedding; skipped", event.seq, event.example.id)
            return None
        vector = np.asarray(event.embedding, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dimension or not np.isfinite(vector).all():
            log.error("cache event %d: example %d has an invalid embedding (shape %s, dimension %d); skipped",
                      event.seq, event.example.id, vector.shape, self.dimension)
            return None
        return vector

    def _remove(self, removals: dict[str, list[int]], newest: dict[int, CacheEvent]) -> int:
        removed = 0
        for tenant, ids in removals.items():
            self._indexes[tenant].remove(np.asarray(ids, dtype=np.int64))
            for example_id in ids:
                # Index first, map second: a concurrent search never finds an id it cannot resolve.
                example = self._examples.get(example_id)
                if example is not None and example.tenant == tenant:
                    if newest[example_id].op == "remove":
                        del self._examples[example_id]
                        removed += 1
        return removed

    def _add(self, additions: dict[str, list[tuple[Example, np.ndarray]]]) -> int:
        added = 0
        for tenant, items in additions.items():
            index = self._indexes.get(tenant)
            if index is None:
                index = FaissIndex(self.dimension, self.ivf_min_examples, self.nprobe)
                self._indexes[tenant] = index
            for example, _ in items:
                # Map first, index second (see _remove).
                self._examples[example.id] = example
            ids = np.fromiter((example.id for example, _ in items), dtype=np.int64, count=len(items))
            index.add(ids, np.stack([vector for _, vector in items]))
            added += len(items)
        return added

    # -- following the history store -----------------------------------------------------------

    async def sync_from(self, history: HistoryStore, *, overlap: int | None = None, limit: int = 10_000,
                        timeout_s: float = 60.0) -> int:
        """Pull and apply every cache event not applied yet; returns how many changed the cache.

        Cold start is the same call on an empty cache (it reads from seq 0, ``limit`` at a time).
        ``overlap`` bounds how far back (in seqs) holes in the sequence are re-read; default:
        the constructor's. Each history call is bounded by ``timeout_s``.
        """
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        window = self.overlap if overlap is None else overlap
        changed = 0
        async with self._sync_lock:
            cursor = self._resume_point(window)
            while True:
                events = await asyncio.wait_for(history.cache_events_since(cursor, limit), timeout_s)
                if not events:
                    break
                previous_high = self._last_seq
                result = await asyncio.to_thread(self.apply, events)
                changed += result.added + result.removed
                self._track_gaps(previous_high, [e.seq for e in events], window)
                cursor = max(e.seq for e in events)
                if len(events) < limit:
                    break
            self._advance_floor(window)
        return changed

    def _resume_point(self, window: int) -> int:
        """Where the next read starts: just below the oldest open hole, else after the newest event."""
        self._expire_gaps(window)
        if self._gaps:
            return max(self._floor, min(self._gaps) - 1)
        return self._last_seq

    def _track_gaps(self, previous_high: int, seqs: Sequence[int], window: int) -> None:
        now = time.monotonic()
        seen = set(seqs)
        for seq in seen:
            self._gaps.pop(seq, None)
        high = max(seen)
        # Only holes inside the re-read window are worth remembering (bounds this loop too).
        start = max(previous_high + 1, self._floor + 1, high - window)
        for seq in range(start, high):
            if seq not in seen:
                self._gaps.setdefault(seq, now)

    def _expire_gaps(self, window: int) -> None:
        now = time.monotonic()
        oldest_kept = self._last_seq - window
        for seq, noticed in list(self._gaps.items()):
            if seq <= oldest_kept or now - noticed > self.gap_ttl_s:
                del self._gaps[seq]

    def _advance_floor(self, window: int) -> None:
        self._expire_gaps(window)
        floor = min(self._gaps) - 1 if self._gaps else self._last_seq
        if floor <= self._floor:
            return
        self._floor = floor
        # Tombstones at or below the floor can go: no event that old will be applied any more.
        with self._apply_lock:
            for example_id in [i for i, seq in self._tombstones.items() if seq <= floor]:
                del self._tombstones[example_id]
