"""The history store on SQLAlchemy: PostgreSQL (asyncpg) in production, SQLite (aiosqlite) embedded.

Several processes share one database (a log stage writing, retrievers polling the cache events), so
both backends are set up for it: PostgreSQL with a pre-pinged connection pool and statement
timeouts; SQLite in WAL mode (readers never block the writer) with a busy timeout, and write
transactions that take the write lock up front (``BEGIN IMMEDIATE``) so that they wait for another
process's writer instead of failing with "database is locked" half-way through.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Row, case, event, func, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from echolm.domain import ChatMessage, Example
from echolm.history.tables import EXAMPLE_STATUSES, CacheEventRow, ExampleRow, ResponseRow, utc_now
from echolm.protocols import CacheEvent, ExampleCandidate, ResponseLog
from echolm.routing.route_context import route_context_from_json, route_context_to_json

# Transaction-scoped PostgreSQL advisory lock keys (arbitrary constants, unique to EchoLM).
CACHE_EVENTS_LOCK_KEY = 0x6563686F01  # serialises cache event appends: seq order = commit order
MIGRATIONS_LOCK_KEY = 0x6563686F02  # one migrating process at a time

# Bound parameters per IN (...) list: well under SQLite's and asyncpg's limits.
_IN_CHUNK = 500
_WRITE_OPTION = "echolm_write_transaction"

T = TypeVar("T")


def make_engine(database_url: str, *, connect_timeout_s: float = 10.0, statement_timeout_s: float = 60.0,
                busy_timeout_s: float = 30.0, pool_size: int = 5) -> AsyncEngine:
    """An async engine configured for EchoLM's access pattern on PostgreSQL or SQLite.

    Must be called inside the event loop that will use it (asyncpg connections belong to one loop).
    Every wait is bounded: connecting, each statement (PostgreSQL), lock waits (SQLite busy timeout)
    and waiting for a pooled connection.
    """
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "postgresql":
        return create_async_engine(
            url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size, pool_timeout=30,
            pool_recycle=1800,
            connect_args={"timeout": connect_timeout_s, "command_timeout": statement_timeout_s,
                          "server_settings": {"application_name": "echolm"}},
        )
    if backend == "sqlite":
        ensure_sqlite_directory(database_url)
        engine = create_async_engine(url, pool_timeout=30, connect_args={"timeout": busy_timeout_s})
        _configure_sqlite(engine, busy_timeout_s)
        return engine
    raise ValueError(f"unsupported database {backend!r} in {url.render_as_string()}: use PostgreSQL or SQLite")


def ensure_sqlite_directory(database_url: str) -> None:
    """Create the directory of a SQLite database file (no-op for other backends and in-memory ones)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    if url.database.startswith("file:"):  # URI filenames: leave them to the user
        return
    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _configure_sqlite(engine: AsyncEngine, busy_timeout_s: float) -> None:
    # SQLAlchemy takes over BEGIN from the sqlite3 driver, so that reads run in real snapshot
    # transactions and writes can ask for the write lock first (see the SQLite dialect docs).
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


async def prepare_database(engine: AsyncEngine, *, timeout_s: float = 30.0) -> None:
    """One-time setup of a database, before its first use: switches an SQLite file to WAL mode.

    WAL is a property of the file, so it is set once, not per connection. Switching needs an
    exclusive lock and SQLite does not wait for that one (no busy handler), so processes racing to
    create a new file retry here, yielding to the event loop, until ``timeout_s``.
    """
    if engine.dialect.name != "sqlite":
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            async with engine.connect() as connection:
                # The raw driver connection: SQLAlchemy would wrap the PRAGMA in BEGIN, where it cannot run.
                driver = (await connection.get_raw_connection()).driver_connection
                assert driver is not None
                async with driver.execute("PRAGMA journal_mode") as cursor:
                    row = await cursor.fetchone()
                if row is not None and str(row[0]).lower() in ("wal", "memory"):
                    return
                async with driver.execute("PRAGMA journal_mode = WAL") as cursor:
                    await cursor.fetchone()
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() > deadline:
                raise
        await asyncio.sleep(0.05)


def writer_engine(engine: AsyncEngine) -> AsyncEngine:
    """The same engine (same pool), marked so that its transactions take the SQLite write lock first."""
    return engine.execution_options(**{_WRITE_OPTION: True})


async def lock_for_migrations(connection: AsyncConnection) -> None:
    """Make concurrent migrators wait for each other (PostgreSQL; SQLite's write lock already does)."""
    if connection.dialect.name == "postgresql":
        await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATIONS_LOCK_KEY})


def _chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _unique(items: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(items))


def _embedding_bytes(vector: np.ndarray) -> bytes:
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"an example embedding must be a non-empty 1-d vector, got shape {array.shape}")
    return array.tobytes()


def _embedding_array(blob: bytes | memoryview | None) -> np.ndarray | None:
    if blob is None:
        return None
    return np.frombuffer(bytes(blob), dtype=np.float32).copy()


def _example_from_row(row: Row[Any]) -> Example:
    return Example(id=row.id, tenant=row.tenant, prompt=row.prompt, response=row.response, model=row.model,
                   tier=row.tier, quality=row.quality, version=row.version)


_EXAMPLE_COLUMNS = (ExampleRow.id, ExampleRow.tenant, ExampleRow.prompt, ExampleRow.response, ExampleRow.model,
                    ExampleRow.tier, ExampleRow.quality, ExampleRow.version)


def _response_values(record: ResponseLog, logged_at: datetime) -> dict[str, Any]:
    # Everything into plain JSON types: numpy scalars and tuples would not serialise.
    return {
        "request_id": record.request_id,
        "tenant": record.tenant,
        "custom_id": record.custom_id,
        "messages": [{"role": m.role, "content": m.content} for m in record.messages],
        "prompt_text": record.prompt_text,
        "response": record.response,
        "tier": record.tier,
        "model": record.model,
        "example_ids": [int(i) for i in record.example_ids],
        "example_similarities": [float(s) for s in record.example_similarities],
        "route_reason": record.route_reason,
        "route_score": None if record.route_score is None else float(record.route_score),
        "timings": {str(k): float(v) for k, v in record.timings.items()},
        "prompt_tokens": record.prompt_tokens,
        "cached_prompt_tokens": record.cached_prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "error_code": record.error_code,
        "error_message": record.error_message,
        "submitted_at": record.submitted_at,
        "finished_at": record.finished_at,
        "logged_at": logged_at,
        "route_context": route_context_to_json(record.route_context),
    }


def _response_from_row(row: Row[Any]) -> ResponseLog:
    return ResponseLog(
        request_id=row.request_id, tenant=row.tenant, custom_id=row.custom_id,
        messages=[ChatMessage(role=m["role"], content=m["content"]) for m in row.messages],
        prompt_text=row.prompt_text, response=row.response, tier=row.tier, model=row.model,
        example_ids=list(row.example_ids), example_similarities=list(row.example_similarities),
        route_reason=row.route_reason, route_score=row.route_score, timings=dict(row.timings),
        prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens, error_code=row.error_code,
        error_message=row.error_message, submitted_at=row.submitted_at, finished_at=row.finished_at,
        route_context=route_context_from_json(row.route_context), cached_prompt_tokens=row.cached_prompt_tokens,
    )


class SqlHistoryStore:
    """The ``HistoryStore`` on PostgreSQL or SQLite. The schema must exist: run ``echolm migrate``
    (``echolm.history.migrate.upgrade``) first.

    The engine is created lazily, in the event loop of the first call (or of ``start()``): engines
    made outside the loop that uses them break. One store therefore serves one event loop.

    Cache event ordering: ``cache_events_since(cursor)`` is exact, i.e. a poller that advances its
    cursor to the last seq it saw never skips an event. This is not automatic on PostgreSQL, where
    sequence values are handed out at insert time but become visible at commit, so a transaction
    holding seq 10 can commit after another one holding seq 11 has been read. Every event append
    therefore takes a transaction-scoped advisory lock (``CACHE_EVENTS_LOCK_KEY``) before drawing its
    seqs, which makes seq order equal commit order; it is held only from the event insert to the
    commit. SQLite has a single writer, so the order holds there by construction. Rows written to
    ``cache_events`` by anything other than this class lose that guarantee; for that case
    ``cache_events_since(..., overlap=n)`` re-reads the last ``n`` seqs so the caller can de-duplicate
    by seq.
    """

    def __init__(self, database_url: str, *, connect_timeout_s: float = 10.0, statement_timeout_s: float = 60.0,
                 busy_timeout_s: float = 30.0, pool_size: int = 5) -> None:
        self.database_url = database_url
        self._engine_args = {"connect_timeout_s": connect_timeout_s, "statement_timeout_s": statement_timeout_s,
                             "busy_timeout_s": busy_timeout_s, "pool_size": pool_size}
        self._engine: AsyncEngine | None = None
        self._writer: AsyncEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prepared = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the engine in the running loop and check that the database answers."""
        async with self._read() as connection:
            await connection.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        """Close every pooled connection. Safe to call twice, or without a start."""
        engine, self._engine, self._writer, self._loop = self._engine, None, None, None
        self._prepared = False
        if engine is not None:
            await engine.dispose()

    def _get_engine(self) -> AsyncEngine:
        loop = asyncio.get_running_loop()
        if self._engine is None:
            self._engine = make_engine(self.database_url, **self._engine_args)  # type: ignore[arg-type]
            self._writer = writer_engine(self._engine)
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("SqlHistoryStore was started in another event loop; create one store per loop")
        return self._engine

    @property
    def _dialect(self) -> str:
        return self._get_engine().dialect.name

    async def _ready_engine(self) -> AsyncEngine:
        engine = self._get_engine()
        if not self._prepared:
            await prepare_database(engine, timeout_s=float(self._engine_args["busy_timeout_s"]))
            self._prepared = True
        return engine

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with (await self._ready_engine()).connect() as connection:
            yield connection

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        await self._ready_engine()
        assert self._writer is not None
        async with self._writer.begin() as connection:
            yield connection

    def _insert(self, table: type[Any]) -> Any:
        if self._dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    # ------------------------------------------------------------------ responses

    async def record_responses(self, logs: Sequence[ResponseLog]) -> None:
        """Idempotent upsert keyed by request id: a second write of a request id replaces the row.

        Within one call the last record of a request id wins. Rows are written in request-id order
        so that concurrent writers lock rows in the same order and cannot deadlock.
        """
        if not logs:
            return
        now = utc_now()
        latest = {record.request_id: _response_values(record, now) for record in logs}
        values = [latest[key] for key in sorted(latest)]
        statement = self._insert(ResponseRow)
        replace = {key: statement.excluded[key] for key in values[0] if key != "request_id"}
        statement = statement.on_conflict_do_update(index_elements=[ResponseRow.request_id], set_=replace)
        async with self._write() as connection:
            await connection.execute(statement, values)

    async def logged_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        """The subset of ``request_ids`` already in the history."""
        found: set[str] = set()
        async with self._read() as connection:
            for chunk in _chunks(_unique(request_ids)):
                result = await connection.execute(
                    select(ResponseRow.request_id).where(ResponseRow.request_id.in_(chunk)))
                found.update(result.scalars())
        return found

    async def responses_for(self, request_ids: Sequence[str]) -> list[ResponseLog]:
        """The recorded responses, in the order asked for; unknown ids are left out."""
        by_id: dict[str, ResponseLog] = {}
        async with self._read() as connection:
            for chunk in _chunks(_unique(request_ids)):
                result = await connection.execute(
                    select(ResponseRow.__table__).where(ResponseRow.request_id.in_(chunk)))
                for row in result:
                    by_id[row.request_id] = _response_from_row(row)
        return [by_id[key] for key in _unique(request_ids) if key in by_id]

    async def count_responses(self, tenant: str | None = None) -> int:
        query = select(func.count()).select_from(ResponseRow)
        if tenant is not None:
            query = query.where(ResponseRow.tenant == tenant)
        async with self._read() as connection:
            return int((await connection.execute(query)).scalar_one())

    # ------------------------------------------------------------------ examples

    async def admit_examples(self, candidates: Sequence[ExampleCandidate]) -> list[int]:
        """Insert examples with an 'add' cache event each; returns their ids in candidate order.

        Idempotent per (tenant, source request id): re-admitting returns the id of the entry's latest
        version and appends no event, whatever that entry's status now is (an evicted entry stays
        evicted). Duplicates within one call get the same id.
        """
        if not candidates:
            return []
        now = utc_now()
        first_by_key: dict[tuple[str, str], ExampleCandidate] = {}
        for candidate in candidates:
            first_by_key.setdefault((candidate.tenant, candidate.source_request_id), candidate)
        values = [
            {"tenant": c.tenant, "source_request_id": c.source_request_id, "prompt": c.prompt,
             "response": c.response, "model": c.model, "tier": c.tier,
             "quality": None if c.quality is None else float(c.quality), "version": 1, "parent_id": None,
             "status": "active", "embedding": _embedding_bytes(c.embedding), "created_at": now,
             "status_changed_at": now, "uses": 0}
            for _, c in sorted(first_by_key.items())  # fixed lock order across concurrent writers
        ]
        ids: dict[tuple[str, str], int] = {}
        async with self._write() as connection:
            inserted: list[tuple[int, str]] = []
            for value in values:
                # One statement per row: "ON CONFLICT DO NOTHING ... RETURNING" tells us which rows are new.
                statement = (self._insert(ExampleRow).values(**value)
                             .on_conflict_do_nothing(index_elements=["tenant", "source_request_id", "version"])
                             .returning(ExampleRow.id))
                new_id = (await connection.execute(statement)).scalar_one_or_none()
                if new_id is not None:
                    ids[(value["tenant"], value["source_request_id"])] = new_id
                    inserted.append((new_id, value["tenant"]))
            missing = [key for key in first_by_key if key not in ids]
            ids.update(await self._latest_versions(connection, missing))
            await self._append_events(connection, [("add", example_id, tenant) for example_id, tenant in inserted])
        return [ids[(c.tenant, c.source_request_id)] for c in candidates]

    async def _latest_versions(self, connection: AsyncConnection,
                               keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        by_tenant: dict[str, list[str]] = {}
        for tenant, source in keys:
            by_tenant.setdefault(tenant, []).append(source)
        found: dict[tuple[str, str], tuple[int, int]] = {}
        for tenant, sources in by_tenant.items():
            for chunk in _chunks(sources):
                result = await connection.execute(
                    select(ExampleRow.source_request_id, ExampleRow.version, ExampleRow.id)
                    .where(ExampleRow.tenant == tenant, ExampleRow.source_request_id.in_(chunk)))
                for source, version, example_id in result:
                    if (tenant, source) not in found or version > found[(tenant, source)][0]:
                        found[(tenant, source)] = (version, example_id)
        return {key: example_id for key, (_, example_id) in found.items()}

    async def supersede_example(self, example_id: int, *, response: str, model: str, tier: str,
                                quality: float | None = None) -> int:
        """Replace an active example by a better answer to the same prompt (a replay upgrade).

        Adds version n+1 (same tenant, source request, prompt and embedding; ``parent_id`` = the old
        id), marks the old version 'superseded', and appends 'remove' (old) and 'add' (new) events,
        all in one transaction. Returns the new id. Raises ``KeyError`` for an unknown id and
        ``ValueError`` if the example is not active.
        """
        now = utc_now()
        async with self._write() as connection:
            old = (await connection.execute(
                select(ExampleRow.__table__).where(ExampleRow.id == example_id).with_for_update())).first()
            if old is None:
                raise KeyError(f"no example with id {example_id}")
            if old.status != "active":
                raise ValueError(f"example {example_id} is {old.status}; only active examples can be superseded")
            newest = (await connection.execute(
                select(func.max(ExampleRow.version))
                .where(ExampleRow.tenant == old.tenant, ExampleRow.source_request_id == old.source_request_id)
            )).scalar_one()
            new_id = (await connection.execute(
                self._insert(ExampleRow).values(
                    tenant=old.tenant, source_request_id=old.source_request_id, prompt=old.prompt,
                    response=response, model=model, tier=tier, quality=quality, version=newest + 1,
                    parent_id=old.id, status="active", embedding=old.embedding, created_at=now,
                    status_changed_at=now, uses=0,
                ).returning(ExampleRow.id))).scalar_one()
            await connection.execute(update(ExampleRow).where(ExampleRow.id == old.id)
                                     .values(status="superseded", status_changed_at=now))
            await self._append_events(connection, [("remove", old.id, old.tenant), ("add", new_id, old.tenant)])
        return int(new_id)

    async def set_example_status(self, example_ids: Sequence[int], status: str) -> list[int]:
        """Set the status of examples; returns the ids that actually changed.

        Leaving 'active' appends a 'remove' event, (re-)entering it an 'add' event, in the same
        transaction. Ids already in ``status`` and unknown ids are ignored.
        """
        if status not in EXAMPLE_STATUSES:
            raise ValueError(f"status must be one of {EXAMPLE_STATUSES}, got {status!r}")
        ids = sorted({int(i) for i in example_ids})
        if not ids:
            return []
        now = utc_now()
        changed: list[tuple[int, str, str]] = []
        async with self._write() as connection:
            for chunk in _chunks(ids):
                # FOR UPDATE: two concurrent evictions of one example must not both emit 'remove'.
                result = await connection.execute(
                    select(ExampleRow.id, ExampleRow.tenant, ExampleRow.status)
                    .where(ExampleRow.id.in_(chunk), ExampleRow.status != status)
                    .order_by(ExampleRow.id).with_for_update())
                rows = list(result)
                if not rows:
                    continue
                await connection.execute(update(ExampleRow).where(ExampleRow.id.in_([r.id for r in rows]))
                                         .values(status=status, status_changed_at=now))
                changed.extend((r.id, r.tenant, r.status) for r in rows)
            op = "add" if status == "active" else "remove"
            await self._append_events(connection, [(op, example_id, tenant) for example_id, tenant, old in changed
                                                   if status == "active" or old == "active"])
        return [example_id for example_id, _, _ in changed]

    async def examples_by_id(self, ids: Sequence[int]) -> list[Example]:
        """The examples with these ids, in the order asked for (any status); unknown ids are left out."""
        wanted = _unique(int(i) for i in ids)
        by_id: dict[int, Example] = {}
        async with self._read() as connection:
            for chunk in _chunks(wanted):
                result = await connection.execute(select(*_EXAMPLE_COLUMNS).where(ExampleRow.id.in_(chunk)))
                for row in result:
                    by_id[row.id] = _example_from_row(row)
        return [by_id[i] for i in wanted if i in by_id]

    async def count_examples(self, tenant: str | None = None, status: str | None = "active") -> int:
        """Number of examples of a tenant (all tenants: None) with a status (any status: None)."""
        query = select(func.count()).select_from(ExampleRow)
        if tenant is not None:
            query = query.where(ExampleRow.tenant == tenant)
        if status is not None:
            query = query.where(ExampleRow.status == status)
        async with self._read() as connection:
            return int((await connection.execute(query)).scalar_one())

    # ------------------------------------------------------------------ cache events

    async def _append_events(self, connection: AsyncConnection, events: Sequence[tuple[str, int, str]]) -> None:
        """Append (op, example id, tenant) events; the only writer of ``cache_events`` (see the class doc)."""
        if not events:
            return
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CACHE_EVENTS_LOCK_KEY})
        now = utc_now()
        await connection.execute(
            self._insert(CacheEventRow),
            [{"op": op, "example_id": example_id, "tenant": tenant, "created_at": now}
             for op, example_id, tenant in events],
        )

    async def cache_events_since(self, seq: int, limit: int = 10_000, *, overlap: int = 0) -> list[CacheEvent]:
        """Events with ``seq > seq - overlap``, in seq order, at most ``limit``.

        Each carries the example's current row; 'add' events also carry its embedding (float32),
        'remove' events None. With ``overlap`` > 0 already-seen events come again: de-duplicate by seq.
        """
        if limit <= 0:
            return []
        lower = seq - max(overlap, 0)
        query = (
            select(CacheEventRow.seq, CacheEventRow.op, *_EXAMPLE_COLUMNS,
                   case((CacheEventRow.op == "add", ExampleRow.embedding), else_=None).label("embedding"))
            .join(ExampleRow, ExampleRow.id == CacheEventRow.example_id)
            .where(CacheEventRow.seq > lower)
            .order_by(CacheEventRow.seq)
            .limit(limit)
        )
        async with self._read() as connection:
            result = await connection.execute(query)
            return [CacheEvent(seq=row.seq, op=row.op, example=_example_from_row(row),
                               embedding=_embedding_array(row.embedding)) for row in result]
