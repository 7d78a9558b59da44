"""Quality feedback in the history (table ``feedback``, migration 0002), and the reads learners need.

Every quality signal is one ``Feedback`` row about a logged response: a user's thumbs up/down, a
pairwise preference, a scalar score, or a verdict of the judge stage. ``quality`` is the signal in
[0, 1] for the response of ``request_id`` (its ``tier`` when a request was answered by several tiers);
a pairwise row also says something about the other side (``other_request_id`` / ``other_tier``),
whose quality is ``1 - quality``. ``outcomes_from_feedback`` turns rows into per-(request, tier)
outcomes, the labels of the helpfulness proxy and the bandit router.

``FeedbackStore`` shares a ``SqlHistoryStore``'s engine (same event loop, same SQLite write-lock
discipline), like the other stores in this package.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import or_, select

from echolm.domain import DECODE_TIMING, PREFILL_TIMING, RouteContext
from echolm.history.store import SqlHistoryStore
from echolm.history.tables import ExampleRow, FeedbackRow, ResponseRow, utc_now
from echolm.routing.route_context import route_context_from_json

_IN_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Feedback:
    """One stored quality signal (see the module docstring for the meaning of the fields)."""

    feedback_id: str
    request_id: str
    kind: str
    source: str
    score: float
    quality: float
    tenant: str = "default"
    tier: str | None = None
    other_request_id: str | None = None
    other_tier: str | None = None
    detail: Mapping[str, Any] | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.quality <= 1.0:
            raise ValueError(f"quality must be in [0, 1], got {self.quality}")

    @property
    def pairwise(self) -> bool:
        return self.kind == "pairwise"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The mean quality of one request's answer on one tier, over ``n`` signals."""

    request_id: str
    tier: str
    quality: float
    n: int


@dataclass(frozen=True, slots=True)
class GenerationTiming:
    """Tokens and generation seconds of one logged answer (what the token cost model is fitted on)."""

    tier: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    # The backend's own split of ``seconds`` (prefill until the first token, decode after), where logged.
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    cached_prompt_tokens: int = 0  # prompt tokens the tier's prefix cache supplied (not in prompt_tokens)


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """What the learners read of a logged response."""

    request_id: str
    tenant: str
    prompt_text: str
    tier: str | None
    example_ids: tuple[int, ...]
    example_similarities: tuple[float, ...]
    timings: Mapping[str, float]
    prompt_tokens: int | None
    completion_tokens: int | None
    route_reason: str | None
    submitted_at: datetime
    finished_at: datetime
    response: str | None = None
    route_context: RouteContext | None = None


@dataclass(frozen=True, slots=True)
class StoredExample:
    """An example version with what the learners need: its request embedding and when it appeared."""

    id: int
    tenant: str
    source_request_id: str
    quality: float | None
    prompt: str
    response: str
    model: str
    tier: str
    created_at: datetime
    embedding: np.ndarray = field(repr=False)

    @property
    def response_chars(self) -> int:
        return len(self.response)


def outcomes_from_feedback(rows: Iterable[Feedback], tier_of: Mapping[str, str | None]) -> list[Outcome]:
    """Per (request id, tier): the mean quality over every signal about that answer.

    A row without a tier is about the answer logged for its request (``tier_of``); a pairwise row also
    gives its other side ``1 - quality``. Signals whose tier cannot be known are skipped.
    """
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        tier = row.tier or tier_of.get(row.request_id)
        if tier:
            sums[(row.request_id, tier)].append(row.quality)
        if row.pairwise:
            other_request = row.other_request_id or row.request_id
            other_tier = row.other_tier or tier_of.get(other_request)
            if other_tier:
                sums[(other_request, other_tier)].append(1.0 - row.quality)
    return [Outcome(request_id, tier, sum(values) / len(values), len(values))
            for (request_id, tier), values in sorted(sums.items())]


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _feedback_values(item: Feedback, now: datetime) -> dict[str, Any]:
    return {
        "feedback_id": item.feedback_id, "request_id": item.request_id, "tenant": item.tenant,
        "kind": item.kind, "source": item.source, "tier": item.tier,
        "other_request_id": item.other_request_id, "other_tier": item.other_tier,
        "score": float(item.score), "quality": float(item.quality),
        "detail": None if item.detail is None else dict(item.detail),
        "created_at": item.created_at or now,
    }


def _feedback_from_row(row: Any) -> Feedback:
    return Feedback(
        feedback_id=row.feedback_id, request_id=row.request_id, kind=row.kind, source=row.source,
        score=row.score, quality=row.quality, tenant=row.tenant, tier=row.tier,
        other_request_id=row.other_request_id, other_tier=row.other_tier, detail=row.detail,
        created_at=row.created_at,
    )


def _logged_from_row(row: Any) -> LoggedRequest:
    return LoggedRequest(
        request_id=row.request_id, tenant=row.tenant, prompt_text=row.prompt_text, tier=row.tier,
        example_ids=tuple(int(i) for i in row.example_ids),
        example_similarities=tuple(float(s) for s in row.example_similarities),
        timings=dict(row.timings), prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
        route_reason=row.route_reason, submitted_at=row.submitted_at, finished_at=row.finished_at,
        response=row.response, route_context=route_context_from_json(row.route_context),
    )


_LOGGED_COLUMNS = (ResponseRow.request_id, ResponseRow.tenant, ResponseRow.prompt_text, ResponseRow.tier,
                   ResponseRow.example_ids, ResponseRow.example_similarities, ResponseRow.timings,
                   ResponseRow.prompt_tokens, ResponseRow.completion_tokens, ResponseRow.route_reason,
                   ResponseRow.submitted_at, ResponseRow.finished_at, ResponseRow.response, ResponseRow.route_context)


class FeedbackStore:
    """Feedback rows and the history reads of the learners, on a ``SqlHistoryStore``'s engine."""

    def __init__(self, history: SqlHistoryStore) -> None:
        self._history = history

    async def record_feedback(self, items: Sequence[Feedback]) -> int:
        """Insert feedback; a ``feedback_id`` already stored is left as it is. Returns how many were new."""
        if not items:
            return 0
        now = utc_now()
        unique = {item.feedback_id: item for item in items}
        new = 0
        async with self._history._write() as connection:  # noqa: SLF001 - same package, shared engine
            for key in sorted(unique):  # fixed lock order across concurrent writers
                statement = (self._history._insert(FeedbackRow)  # noqa: SLF001
                             .values(**_feedback_values(unique[key], now))
                             .on_conflict_do_nothing(index_elements=["feedback_id"])
                             .returning(FeedbackRow.feedback_id))
                if (await connection.execute(statement)).scalar_one_or_none() is not None:
                    new += 1
        return new

    async def feedback_about(self, request_ids: Sequence[str]) -> list[Feedback]:
        """Every row about these requests, on either side of a pairwise comparison; oldest first."""
        found: dict[str, Feedback] = {}
        wanted = list(dict.fromkeys(request_ids))
        async with self._history._read() as connection:  # noqa: SLF001
            for chunk in _chunks(wanted):
                result = await connection.execute(
                    select(FeedbackRow.__table__).where(
                        or_(FeedbackRow.request_id.in_(chunk), FeedbackRow.other_request_id.in_(chunk))))
                for row in result:
                    found[row.feedback_id] = _feedback_from_row(row)
        return sorted(found.values(), key=lambda f: (f.created_at or utc_now(), f.feedback_id))

    async def recent_feedback(self, limit: int = 50_000, *, since: datetime | None = None) -> list[Feedback]:
        """The newest ``limit`` rows (created after ``since``, when given), oldest first."""
        query = select(FeedbackRow.__table__).order_by(FeedbackRow.created_at.desc(),
                                                       FeedbackRow.feedback_id).limit(limit)
        if since is not None:
            query = query.where(FeedbackRow.created_at > since)
        async with self._history._read() as connection:  # noqa: SLF001
            rows = [_feedback_from_row(row) for row in await connection.execute(query)]
        return rows[::-1]

    async def count_feedback(self, source: str | None = None) -> int:
        from sqlalchemy import func

        query = select(func.count()).select_from(FeedbackRow)
        if source is not None:
            query = query.where(FeedbackRow.source == source)
        async with self._history._read() as connection:  # noqa: SLF001
            return int((await connection.execute(query)).scalar_one())

    async def outcomes(self, rows: Sequence[Feedback]) -> list[Outcome]:
        """``outcomes_from_feedback`` with the tiers of the logged responses looked up."""
        ids = [r.request_id for r in rows] + [r.other_request_id for r in rows if r.other_request_id]
        return outcomes_from_feedback(rows, await self.tiers_of(ids))

    async def quality_for(self, request_ids: Sequence[str]) -> dict[str, float]:
        """Request id -> mean quality of its logged answer, for those with feedback (replay's quality lookup)."""
        rows = await self.feedback_about(request_ids)
        tiers = await self.tiers_of(request_ids)
        wanted = set(request_ids)
        return {o.request_id: o.quality for o in outcomes_from_feedback(rows, tiers)
                if o.request_id in wanted and o.tier == tiers.get(o.request_id)}

    async def tiers_of(self, request_ids: Sequence[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        async with self._history._read() as connection:  # noqa: SLF001
            for chunk in _chunks(list(dict.fromkeys(request_ids))):
                result = await connection.execute(
                    select(ResponseRow.request_id, ResponseRow.tier).where(ResponseRow.request_id.in_(chunk)))
                found.update({request_id: tier for request_id, tier in result})
        return found

    async def logged_requests(self, request_ids: Sequence[str]) -> dict[str, LoggedRequest]:
        found: dict[str, LoggedRequest] = {}
        async with self._history._read() as connection:  # noqa: SLF001
            for chunk in _chunks(list(dict.fromkeys(request_ids))):
                result = await connection.execute(select(*_LOGGED_COLUMNS).where(ResponseRow.request_id.in_(chunk)))
                found.update({row.request_id: _logged_from_row(row) for row in result})
        return found

    async def recent_requests(self, limit: int = 10_000, *, answered_only: bool = True) -> list[LoggedRequest]:
        """The newest ``limit`` logged responses, oldest first (calibration replays them)."""
        query = select(*_LOGGED_COLUMNS).order_by(ResponseRow.finished_at.desc()).limit(limit)
        if answered_only:
            query = query.where(ResponseRow.error_code.is_(None))
        async with self._history._read() as connection:  # noqa: SLF001
            rows = [_logged_from_row(row) for row in await connection.execute(query)]
        return rows[::-1]

    async def generation_timings(self, tier: str, limit: int = 500) -> list[GenerationTiming]:
        """Tokens and generate-stage seconds of the newest ``limit`` answers of ``tier``; the prompt tokens
        counted are the prefilled ones (those the tier's prefix cache supplied cost no prefill)."""
        query = (select(ResponseRow.prompt_tokens, ResponseRow.completion_tokens, ResponseRow.timings,
                        ResponseRow.cached_prompt_tokens)
                 .where(ResponseRow.tier == tier, ResponseRow.error_code.is_(None),
                        ResponseRow.prompt_tokens.is_not(None), ResponseRow.completion_tokens.is_not(None))
                 .order_by(ResponseRow.finished_at.desc()).limit(limit))
        async with self._history._read() as connection:  # noqa: SLF001
            result = await connection.execute(query)
            return [GenerationTiming(tier, int(p) - int(cached or 0), int(c), float(t["generate"]),
                                     _seconds(t.get(PREFILL_TIMING)), _seconds(t.get(DECODE_TIMING)), int(cached or 0))
                    for p, c, t, cached in result if isinstance(t, dict) and "generate" in t]

    async def examples(self, ids: Sequence[int] | None = None, *, tenant: str | None = None,
                       include_inactive: bool = True, min_id: int = 0, limit: int = 200_000) -> list[StoredExample]:
        """Examples with their embeddings: by id, or (``ids`` None) every one of ``tenant`` with an id above
        ``min_id``, in id order, up to ``limit``."""
        columns = (ExampleRow.id, ExampleRow.tenant, ExampleRow.source_request_id, ExampleRow.quality,
                   ExampleRow.prompt, ExampleRow.response, ExampleRow.model, ExampleRow.tier, ExampleRow.created_at,
                   ExampleRow.embedding)
        out: list[StoredExample] = []

        def convert(row: Any) -> StoredExample:
            return StoredExample(id=row.id, tenant=row.tenant, source_request_id=row.source_request_id,
                                 quality=row.quality, prompt=row.prompt, response=row.response, model=row.model,
                                 tier=row.tier, created_at=row.created_at,
                                 embedding=np.frombuffer(bytes(row.embedding), dtype=np.float32).copy())

        async with self._history._read() as connection:  # noqa: SLF001
            if ids is not None:
                for chunk in _chunks(sorted({int(i) for i in ids})):
                    out.extend(convert(r) for r in await connection.execute(
                        select(*columns).where(ExampleRow.id.in_(chunk))))
                return out
            query = select(*columns).where(ExampleRow.id > min_id).order_by(ExampleRow.id).limit(limit)
            if tenant is not None:
                query = query.where(ExampleRow.tenant == tenant)
            if not include_inactive:
                query = query.where(ExampleRow.status == "active")
            out.extend(convert(r) for r in await connection.execute(query))
        return out

    async def example_embeddings(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Example id -> its request's embedding (float32); unknown ids are left out."""
        found: dict[int, np.ndarray] = {}
        async with self._history._read() as connection:  # noqa: SLF001
            for chunk in _chunks(sorted({int(i) for i in ids})):
                result = await connection.execute(
                    select(ExampleRow.id, ExampleRow.embedding).where(ExampleRow.id.in_(chunk)))
                for example_id, blob in result:
                    found[int(example_id)] = np.frombuffer(bytes(blob), dtype=np.float32).copy()
        return found
