"""The history schema: response logs, the example cache and its change log.

Portable across PostgreSQL (asyncpg) and SQLite (aiosqlite). Alembic (``migrations/``) owns the
schema; these models are what the code reads and writes, and a test checks that the migrations
produce exactly them. New tables (feedback, router state) arrive with new migrations.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

EXAMPLE_STATUSES = ("active", "superseded", "evicted")
CACHE_EVENT_OPS = ("add", "remove")

# Named constraints: Alembic's SQLite batch mode can only alter constraints that have names.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite keeps no offset, so values are normalised to UTC on the way in and marked UTC on the way
    out; naive datetimes are taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# 64-bit ids on PostgreSQL; SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")

# JSONB on PostgreSQL (indexable, compact); plain JSON text elsewhere.
PortableJSON = JSON().with_variant(JSONB(), "postgresql")


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ResponseRow(Base):
    """One finished request (answered or failed): written once per request id, replaced on re-delivery."""

    __tablename__ = "responses"
    __table_args__ = (
        Index("ix_responses_tenant_finished_at", "tenant", "finished_at"),
        Index("ix_responses_tier_finished_at", "tier", "finished_at"),
    )

    request_id: Mapped[str] = mapped_column(String, primary_key=True)
    tenant: Mapped[str] = mapped_column(String)
    custom_id: Mapped[str | None] = mapped_column(String)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(PortableJSON)
    prompt_text: Mapped[str] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    tier: Mapped[str | None] = mapped_column(String)
    model: Mapped[str | None] = mapped_column(String)
    example_ids: Mapped[list[int]] = mapped_column(PortableJSON)
    example_similarities: Mapped[list[float]] = mapped_column(PortableJSON)
    route_reason: Mapped[str | None] = mapped_column(Text)
    route_score: Mapped[float | None] = mapped_column(Double)
    timings: Mapped[dict[str, float]] = mapped_column(PortableJSON)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    cached_prompt_tokens: Mapped[int | None] = mapped_column(Integer)  # of prompt_tokens, from a prefix cache
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String)
    error_message: Mapped[str | None] = mapped_column(Text)
    submitted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime] = mapped_column(UtcDateTime)
    logged_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    # What the router saw and computed (``domain.RouteContext`` as JSON, migration 0004); NULL in rows
    # logged before, which the learners then rebuild.
    route_context: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)


class ExampleRow(Base):
    """One version of a cache entry. A replay upgrade adds version n+1 with ``parent_id`` = version n."""

    __tablename__ = "examples"
    __table_args__ = (
        UniqueConstraint("tenant", "source_request_id", "version"),
        Index("ix_examples_tenant_status", "tenant", "status"),
        CheckConstraint(f"status IN {EXAMPLE_STATUSES!r}", name="status"),
        # Ids key the retrievers' vector indexes: SQLite must never hand out a used id again.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String)
    source_request_id: Mapped[str] = mapped_column(String)
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String)
    tier: Mapped[str] = mapped_column(String)
    quality: Mapped[float | None] = mapped_column(Double)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    parent_id: Mapped[int | None] = mapped_column(Id, ForeignKey("examples.id"))
    status: Mapped[str] = mapped_column(String, default="active", server_default="active")
    embedding: Mapped[bytes] = mapped_column(LargeBinary, doc="float32 vector, native byte order")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    status_changed_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class CacheEventRow(Base):
    """Append-only log of cache changes; retrievers follow it by ``seq`` to keep their indexes current."""

    __tablename__ = "cache_events"
    __table_args__ = (
        CheckConstraint(f"op IN {CACHE_EVENT_OPS!r}", name="op"),
        Index("ix_cache_events_example_id", "example_id"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    op: Mapped[str] = mapped_column(String)
    example_id: Mapped[int] = mapped_column(Id, ForeignKey("examples.id"))
    tenant: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class ExampleStatsRow(Base):
    """Usage statistics of one example version (migration 0003): what replay and eviction decide on.

    ``gain`` is G(e), an EMA over uses of (1 - quality) x normalised cost (``policy.replay.GainTracker``);
    ``uses`` counts uses since the last replay; ``offload_value`` is the number of successful offloads
    the example enabled, decayed x0.9 per hour, as of ``offload_updated_at``. A replayed example's
    new version inherits ``offload_value`` and ``replay_rounds`` + 1. No row means never used.
    """

    __tablename__ = "example_stats"
    __table_args__ = (Index("ix_example_stats_tenant_gain", "tenant", "gain"),)

    example_id: Mapped[int] = mapped_column(Id, ForeignKey("examples.id"), primary_key=True, autoincrement=False)
    tenant: Mapped[str] = mapped_column(String)
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    gain: Mapped[float] = mapped_column(Double, default=0.0, server_default=text("0"))
    offload_value: Mapped[float] = mapped_column(Double, default=0.0, server_default=text("0"))
    offload_updated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    replay_rounds: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_replayed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_replay_score: Mapped[float | None] = mapped_column(Double)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class ExampleUsageRow(Base):
    """One response served with cached examples, recorded once per request id (the processed marker);
    folded into ``example_stats`` once, when settled (migration 0003)."""

    __tablename__ = "example_usages"
    __table_args__ = (Index("ix_example_usages_settled_at_recorded_at", "settled_at", "recorded_at"),)

    request_id: Mapped[str] = mapped_column(String, primary_key=True)
    tenant: Mapped[str] = mapped_column(String)
    tier: Mapped[str] = mapped_column(String)
    example_ids: Mapped[list[int]] = mapped_column(PortableJSON)
    offloaded: Mapped[bool] = mapped_column(Boolean)
    quality: Mapped[float | None] = mapped_column(Double)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    settled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


FEEDBACK_KINDS = ("thumbs", "pairwise", "score", "verifier")


class FeedbackRow(Base):
    """One quality signal about a logged response (migration 0002): a user's thumbs up/down, a pairwise
    preference, a scalar score, or a judge's or verifier's verdict.

    ``quality`` is the signal normalised to [0, 1] for the response of ``request_id`` (on ``tier`` when
    the request was answered by several tiers); for a pairwise row the other side
    (``other_request_id`` / ``other_tier``) has quality ``1 - quality``. ``score`` keeps the raw value
    (+1/-1, the judge's -3..+3, the user's number). ``feedback_id`` makes redelivery harmless.
    """

    __tablename__ = "feedback"
    __table_args__ = (
        Index("ix_feedback_request_id", "request_id"),
        Index("ix_feedback_other_request_id", "other_request_id"),
        Index("ix_feedback_created_at", "created_at"),
        CheckConstraint(f"kind IN {FEEDBACK_KINDS!r}", name="kind"),
        CheckConstraint("quality >= 0 AND quality <= 1", name="quality"),
    )

    feedback_id: Mapped[str] = mapped_column(String, primary_key=True)
    request_id: Mapped[str] = mapped_column(String)
    tenant: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String)
    source: Mapped[str] = mapped_column(String)
    tier: Mapped[str | None] = mapped_column(String)
    other_request_id: Mapped[str | None] = mapped_column(String)
    other_tier: Mapped[str | None] = mapped_column(String)
    score: Mapped[float] = mapped_column(Double)
    quality: Mapped[float] = mapped_column(Double)
    detail: Mapped[dict[str, Any] | None] = mapped_column(PortableJSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class ModelStateRow(Base):
    """A learned model's state as JSON text (migration 0002): the helpfulness proxy, the router.

    Every save adds a version; workers poll the newest version number and reload when it changes.
    Plain JSON (never pickle), so a state can be read, diffed and restored by hand.
    """

    __tablename__ = "model_states"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(PortableJSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
