"""Shared fixtures of the integration tests. Keep each group together, under its own header."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import URL, make_url

# Workers in these tests serve a few dozen requests: skip the embedder's per-shape warm-up (~7 s a
# start), which keeps a long-running worker's memory level; test_embedder.py tests it directly.
os.environ.setdefault("ECHOLM_EMBEDDER_WARM_UP_SHAPES", "false")

# ---------------------------------------------------------------------------------------------
# PostgreSQL (history store). The server of the development/CI machine: 127.0.0.1:5432, trust
# auth. ECHOLM_TEST_POSTGRES_URL names an admin URL (a database the tests may connect to in order
# to CREATE/DROP their own); every test session works in fresh databases it drops at the end.
# Tests that need PostgreSQL are skipped, with the reason, only when the server is unreachable.
# ---------------------------------------------------------------------------------------------

POSTGRES_URL_ENV = "ECHOLM_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
POSTGRES_CONNECT_TIMEOUT_S = 5.0


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _postgres_admin(admin: URL, *statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(_asyncpg_dsn(admin), timeout=POSTGRES_CONNECT_TIMEOUT_S)
    try:
        for statement in statements:
            await connection.execute(statement, timeout=60)
    finally:
        await connection.close(timeout=5)


@pytest.fixture(scope="session")
def postgres_admin_url() -> URL:
    """The admin URL; skips the test if no PostgreSQL server answers there."""
    admin = make_url(os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_ADMIN_URL))
    try:
        asyncio.run(_postgres_admin(admin, "SELECT 1"))
    except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
        pytest.skip(f"PostgreSQL unreachable at {admin.render_as_string()} ({type(exc).__name__}: {exc}); "
                    f"start it or set {POSTGRES_URL_ENV}")
    return admin


@contextmanager
def _fresh_postgres_database(admin: URL) -> Iterator[str]:
    name = f"echolm_test_{secrets.token_hex(6)}"
    asyncio.run(_postgres_admin(admin, f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_postgres_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_postgres_url(postgres_admin_url: URL) -> Iterator[str]:
    """URL of a new, empty database (no schema) ``echolm_test_<hex>``, dropped after the test."""
    with _fresh_postgres_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: URL) -> Iterator[str]:
    """A PostgreSQL database migrated to head, shared by the whole test session."""
    from echolm.history.migrate import upgrade

    with _fresh_postgres_database(postgres_admin_url) as url:
        asyncio.run(upgrade(url))
        yield url


def _echolm_tables() -> list[str]:
    from echolm.history.tables import Base

    return sorted(Base.metadata.tables)


@pytest.fixture
def clean_postgres_url(postgres_url: str) -> str:
    """The session's migrated database with every EchoLM table (history, examples and their statistics,
    feedback, model states) emptied and the ids restarted."""
    asyncio.run(_postgres_admin(make_url(postgres_url),
                                f"TRUNCATE {', '.join(_echolm_tables())} RESTART IDENTITY CASCADE"))
    return postgres_url


# ---------------------------------------------------------------------------------------------
# A migrated, empty history database on each backend: a fresh SQLite file, and the session's
# PostgreSQL database emptied. A module that needs another shape defines its own ``database_url``.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        from echolm.history.migrate import upgrade

        url = f"sqlite+aiosqlite:///{tmp_path / 'echolm.db'}"
        asyncio.run(upgrade(url))
        return url
    return str(request.getfixturevalue("clean_postgres_url"))


@pytest.fixture
async def history(database_url: str) -> AsyncIterator[object]:
    """A started ``SqlHistoryStore`` on ``database_url``, closed after the test."""
    from echolm.history.store import SqlHistoryStore

    store = SqlHistoryStore(database_url)
    await store.start()
    yield store
    await store.aclose()
