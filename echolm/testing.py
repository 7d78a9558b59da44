"""Test doubles for code built on EchoLM: no broker, database or model needed.

They honour the same contracts as the real adapters (``echolm.protocols``), so a user's stage,
router or admission hook can be tested against them and then run unchanged on the real thing:

- ``InMemoryHistoryStore``: the ``HistoryStore`` in a few dicts, with the SQL store's idempotency
  and cache-event semantics (and its extra methods: counts, ``responses_for``, status changes,
  supersede);
- ``HashingEmbedder``: deterministic, L2-normalised bag-of-words vectors, so texts sharing words are
  similar and identical texts identical, across processes and runs;
- ``StaticRouter``: always picks one tier;
- ``InMemoryExampleStatsStore``: the example usage statistics of the replay agent and eviction, over
  an ``InMemoryHistoryStore``, with the SQL store's exactly-once settling.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from echolm.domain import Example, RouteDecision
from echolm.protocols import CacheEvent, ExampleCandidate, ResponseLog, RoutingContext
from echolm.routing.route_context import route_context_from_json, route_context_to_json

EXAMPLE_STATUSES = ("active", "superseded", "evicted")


@dataclass(slots=True)
class _StoredExample:
    example: Example
    source_request_id: str
    embedding: np.ndarray
    status: str
    parent_id: int | None
    status_changed_at: datetime
    created_at: datetime


@dataclass(frozen=True, slots=True)
class _Event:
    seq: int
    op: str
    example_id: int


class InMemoryHistoryStore:
    """A ``HistoryStore`` kept in memory, with the same semantics as ``SqlHistoryStore``.

    Responses upsert by request id (the last write wins); examples are admitted once per
    (tenant, source request id); every cache change appends one event with a strictly increasing
    seq. Each method runs without awaiting, so concurrent tasks see each call as atomic.
    """

    def __init__(self) -> None:
        self._responses: dict[str, ResponseLog] = {}
        self._examples: dict[int, _StoredExample] = {}
        self._latest_by_source: dict[tuple[str, str], int] = {}
        self._events: list[_Event] = []
        self._next_example_id = 1
        self.closed = False

    async def start(self) -> None:
        """Nothing to connect to; present so code written for ``SqlHistoryStore`` runs unchanged."""

    async def aclose(self) -> None:
        self.closed = True

    # responses

    async def record_responses(self, logs: Sequence[ResponseLog]) -> None:
        for record in logs:
            self._responses[record.request_id] = _as_stored(record)

    async def logged_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        return {request_id for request_id in request_ids if request_id in self._responses}

    async def responses_for(self, request_ids: Sequence[str]) -> list[ResponseLog]:
        return [self._responses[r] for r in dict.fromkeys(request_ids) if r in self._responses]

    async def count_responses(self, tenant: str | None = None) -> int:
        return sum(1 for r in self._responses.values() if tenant is None or r.tenant == tenant)

    # examples

    async def admit_examples(self, candidates: Sequence[ExampleCandidate]) -> list[int]:
        ids: list[int] = []
        for candidate in candidates:
            key = (candidate.tenant, candidate.source_request_id)
            existing = self._latest_by_source.get(key)
            if existing is not None:
                ids.append(existing)
                continue
            embedding = np.asarray(candidate.embedding, dtype=np.float32).copy()
            if embedding.ndim != 1 or embedding.size == 0:
                raise ValueError(f"an example embedding must be a non-empty 1-d vector, got shape {embedding.shape}")
            example_id = self._new_example(
                Example(id=0, tenant=candidate.tenant, prompt=candidate.prompt, response=candidate.response,
                        model=candidate.model, tier=candidate.tier, quality=candidate.quality, version=1),
                source_request_id=candidate.source_request_id, embedding=embedding, parent_id=None)
            self._append_event("add", example_id)
            ids.append(example_id)
        return ids

    async def supersede_example(self, example_id: int, *, response: str, model: str, tier: str,
                                quality: float | None = None) -> int:
        old = self._examples.get(example_id)
        if old is None:
            raise KeyError(f"no example with id {example_id}")
        if old.status != "active":
            raise ValueError(f"example {example_id} is {old.status}; only active examples can be superseded")
        newest = self._examples[self._latest_by_source[(old.example.tenant, old.source_request_id)]]
        new_id = self._new_example(
            replace(old.example, response=response, model=model, tier=tier, quality=quality,
                    version=newest.example.version + 1),
            source_request_id=old.source_request_id, embedding=old.embedding.copy(), parent_id=example_id)
        old.status, old.status_changed_at = "superseded", datetime.now(UTC)
        self._append_event("remove", example_id)
        self._append_event("add", new_id)
        return new_id

    async def set_example_status(self, example_ids: Sequence[int], status: str) -> list[int]:
        if status not in EXAMPLE_STATUSES:
            raise ValueError(f"status must be one of {EXAMPLE_STATUSES}, got {status!r}")
        changed: list[int] = []
        for example_id in sorted({int(i) for i in example_ids}):
            stored = self._examples.get(example_id)
            if stored is None or stored.status == status:
                continue
            previous = stored.status
            stored.status, stored.status_changed_at = status, datetime.now(UTC)
            if status == "active":
                self._append_event("add", example_id)
            elif previous == "active":
                self._append_event("remove", example_id)
            changed.append(example_id)
        return changed

    async def examples_by_id(self, ids: Sequence[int]) -> list[Example]:
        return [self._examples[i].example for i in dict.fromkeys(int(i) for i in ids) if i in self._examples]

    async def count_examples(self, tenant: str | None = None, status: str | None = "active") -> int:
        return sum(1 for e in self._examples.values()
                   if (tenant is None or e.example.tenant == tenant) and (status is None or e.status == status))

    # cache events

    async def cache_events_since(self, seq: int, limit: int = 10_000, *, overlap: int = 0) -> list[CacheEvent]:
        lower = seq - max(overlap, 0)
        selected = [e for e in self._events if e.seq > lower][:max(limit, 0)]
        return [
            CacheEvent(seq=e.seq, op=e.op, example=self._examples[e.example_id].example,
                       embedding=self._examples[e.example_id].embedding.copy() if e.op == "add" else None)
            for e in selected
        ]

    def _new_example(self, example: Example, *, source_request_id: str, embedding: np.ndarray,
                     parent_id: int | None) -> int:
        example_id = self._next_example_id
        self._next_example_id += 1
        self._examples[example_id] = _StoredExample(
            example=replace(example, id=example_id), source_request_id=source_request_id, embedding=embedding,
            status="active", parent_id=parent_id, status_changed_at=datetime.now(UTC), created_at=datetime.now(UTC))
        self._latest_by_source[(example.tenant, source_request_id)] = example_id
        return example_id

    def _append_event(self, op: str, example_id: int) -> None:
        self._events.append(_Event(seq=len(self._events) + 1, op=op, example_id=example_id))


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _as_stored(record: ResponseLog) -> ResponseLog:
    """The record as the SQL store gives it back: plain lists and floats, timestamps in UTC."""
    return replace(
        record, messages=list(record.messages), example_ids=[int(i) for i in record.example_ids],
        example_similarities=[float(s) for s in record.example_similarities],
        route_score=None if record.route_score is None else float(record.route_score),
        timings={str(k): float(v) for k, v in record.timings.items()},
        submitted_at=_utc(record.submitted_at), finished_at=_utc(record.finished_at),
        route_context=route_context_from_json(route_context_to_json(record.route_context)),
    )


_TOKEN = re.compile(r"\w+")


class HashingEmbedder:
    """Deterministic bag-of-words embeddings: each lower-cased word adds +-1 to a hashed coordinate.

    Texts sharing most words get a high cosine similarity, unrelated texts one near 0, and the same
    text always the same vector (blake2b, not Python's per-process salted ``hash``). A text with no
    word characters maps to a fixed unit vector. Not a language model: synonyms are unrelated here.
    """

    def __init__(self, dimension: int = 256) -> None:
        if dimension < 2:
            raise ValueError(f"dimension must be at least 2, got {dimension}")
        self._dimension = dimension

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self._dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in _TOKEN.findall(text.lower()):
                digest = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
                vectors[row, digest % self._dimension] += 1.0 if (digest >> 63) & 1 else -1.0
            norm = float(np.linalg.norm(vectors[row]))
            if norm == 0.0:
                vectors[row, 0] = 1.0
            else:
                vectors[row] /= norm
        return vectors


class StaticRouter:
    """A ``Router`` that always picks ``tier``: for tests, and baselines such as "always large"."""

    def __init__(self, tier: str, *, use_examples: bool = True, score: float = 1.0) -> None:
        self.tier = tier
        self.use_examples = use_examples
        self.score = score

    def route(self, context: RoutingContext) -> RouteDecision:
        return RouteDecision(tier=self.tier, score=self.score, reason=f"static:{self.tier}",
                             use_examples=self.use_examples, scores={self.tier: self.score})


class InMemoryExampleStatsStore:
    """``echolm.history.example_stats_store.ExampleStatsStore`` in memory, over an ``InMemoryHistoryStore``.

    Same semantics as ``SqlExampleStatsStore``: usages recorded once per request id, settled once
    (``fold_usages``), replay rounds counted with ``replayed_stats``.
    """

    def __init__(self, history: InMemoryHistoryStore) -> None:
        from echolm.history.example_stats_store import ExampleStats, ExampleUsage

        self._history = history
        self.usages: dict[str, tuple[ExampleUsage, datetime, datetime | None]] = {}
        self.stats: dict[int, ExampleStats] = {}

    async def record_usages(self, usages: Sequence[Any]) -> int:
        new = 0
        for usage in usages:
            if usage.example_ids and usage.request_id not in self.usages:
                self.usages[usage.request_id] = (usage, datetime.now(UTC), None)
                new += 1
        return new

    async def settle_usages(self, policy: Any, quality_of: Any, *, settle_after: timedelta,
                            now: datetime | None = None) -> Any:
        from echolm.history.example_stats_store import SettleReport, fold_usages

        now = now or datetime.now(UTC)
        due = sorted(rid for rid, (_, at, settled) in self.usages.items() if settled is None and at <= now - settle_after)
        if not due:
            return SettleReport()
        qualities = dict(await quality_of([self.usages[rid][0] for rid in due]))
        for rid in due:
            usage, at, _ = self.usages[rid]
            self.usages[rid] = (usage, at, now)
        usages = [self.usages[rid][0] for rid in due]
        tenants = {i: e.example.tenant for i, e in self._history._examples.items()}
        changed = fold_usages([(u, qualities.get(u.request_id)) for u in usages], self.stats, tenants, policy, now)
        self.stats.update(changed)
        offloads = sum(1 for u in usages if u.offloaded
                       and qualities.get(u.request_id, policy.default_quality) >= policy.bad_quality_below)
        return SettleReport(len(usages), len(changed), offloads)

    async def gain_candidates(self, limit: int = 1000) -> list[Any]:
        active = [s for s in self.stats.values()
                  if s.uses > 0 and self._history._examples[s.example_id].status == "active"]
        active.sort(key=lambda s: (-s.gain, -s.uses, s.example_id))
        return active[:limit]

    async def stats_for(self, example_ids: Sequence[int]) -> dict[int, Any]:
        return {i: self.stats[i] for i in example_ids if i in self.stats}

    async def mark_replayed(self, example_id: int, new_example_id: int | None, *, score: float | None,
                            decay_per_hour: float = 0.9, now: datetime | None = None) -> None:
        from echolm.history.example_stats_store import ExampleStats, replayed_stats

        stored = self._history._examples.get(example_id)
        if stored is None:
            raise KeyError(f"no example with id {example_id}")
        old = self.stats.get(example_id, ExampleStats(example_id, stored.example.tenant))
        after = replayed_stats(old, new_example_id, score=score, decay_per_hour=decay_per_hour,
                               now=now or datetime.now(UTC))
        self.stats[after.example_id] = after

    async def eviction_candidates(self, tenant: str) -> list[Any]:
        from echolm.history.example_stats_store import EvictionCandidate

        out = []
        for example_id, stored in sorted(self._history._examples.items()):
            if stored.example.tenant != tenant or stored.status != "active":
                continue
            size = (len(stored.example.prompt.encode()) + len(stored.example.response.encode())
                    + stored.embedding.nbytes)
            stats = self.stats.get(example_id)
            value_at = stats.offload_updated_at if stats and stats.offload_updated_at else stored.created_at
            out.append(EvictionCandidate(example_id, size, stats.offload_value if stats else 0.0, value_at,
                                         stored.created_at))
        return out

    async def tenants(self) -> list[str]:
        return sorted({e.example.tenant for e in self._history._examples.values() if e.status == "active"})
