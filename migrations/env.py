"""Alembic environment for EchoLM, async (asyncpg / aiosqlite).

Two ways in:
- programmatically (``echolm.history.migrate``): the caller opens the connection inside its own event
  loop, takes the migration lock, and hands the connection over in ``config.attributes["connection"]``;
- the Alembic CLI (``alembic -c migrations/alembic.ini upgrade head``): this file makes the engine.
The URL is ``config.attributes["database_url"]``, else ``sqlalchemy.url`` from the ini file, else
``Settings().resolved_database_url`` (ECHOLM_DATABASE_URL, or SQLite under ECHOLM_DATA_DIR).
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from echolm.history.store import (
    ensure_sqlite_directory,
    lock_for_migrations,
    make_engine,
    prepare_database,
    writer_engine,
)
from echolm.history.tables import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    explicit = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if explicit:
        return str(explicit)
    from echolm.settings import Settings

    return Settings().resolved_database_url


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        # EchoLM's SQLite engine emits BEGIN itself (see echolm.history.store), so DDL is
        # transactional there too: a failed migration leaves nothing half-done.
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL instead of running it (``alembic upgrade head --sql``)."""
    url = database_url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"}, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    url = database_url()
    ensure_sqlite_directory(url)
    engine = make_engine(url, statement_timeout_s=600.0)
    try:
        await prepare_database(engine)
        async with writer_engine(engine).begin() as connection:
            await lock_for_migrations(connection)
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)  # only for the Alembic CLI: never reset an app's logging
    asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
