"""Applying EchoLM's Alembic migrations from code (``echolm migrate``, the local batch runner, tests).

The migrations live in ``migrations/`` at the repository root, next to the ``echolm`` package: this
assumes the package runs from a checkout (``pip install -e .``, as the Makefile does). A wheel
install does not carry them; then ``MigrationsNotFound`` says so.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from echolm.history.store import (
    ensure_sqlite_directory,
    lock_for_migrations,
    make_engine,
    prepare_database,
    writer_engine,
)

# Migrations may rewrite whole tables; give them far longer than an ordinary statement.
MIGRATION_STATEMENT_TIMEOUT_S = 600.0


class MigrationsNotFound(FileNotFoundError):
    """The ``migrations/`` directory is not where an editable install puts it."""


DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def migrations_dir(directory: Path = DEFAULT_MIGRATIONS_DIR) -> Path:
    """``directory`` if it holds ``alembic.ini`` and ``env.py``; else ``MigrationsNotFound``."""
    if not (directory / "alembic.ini").is_file() or not (directory / "env.py").is_file():
        raise MigrationsNotFound(
            f"EchoLM's database migrations were not found at {directory} (no alembic.ini/env.py there). "
            "They ship in the source tree, not in the package: install EchoLM from a checkout with "
            "`pip install -e .` (the Makefile's `make setup` does)."
        )
    return directory


def alembic_config(database_url: str | None = None, directory: Path | None = None) -> Config:
    """An Alembic config for EchoLM's migrations; ``database_url`` overrides the settings' URL,
    ``directory`` the migrations' location (installs that are not editable: ``ECHOLM_MIGRATIONS_DIR``)."""
    directory = migrations_dir(directory or DEFAULT_MIGRATIONS_DIR)
    config = Config(str(directory / "alembic.ini"))
    config.set_main_option("script_location", str(directory))
    if database_url is not None:
        config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    """The newest revision in ``migrations/versions``."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise MigrationsNotFound(f"no migration revisions in {migrations_dir() / 'versions'}")
    return head


async def upgrade(database_url: str, revision: str = "head", directory: Path | None = None) -> None:
    """Migrate the database up to ``revision``; creates an SQLite file (and its directory) if missing.

    Safe to run from several processes at once: migrators wait for each other (a PostgreSQL
    advisory lock, SQLite's write lock), and later ones find the schema at head already.
    """
    await _run_command(database_url, "upgrade", revision, directory)


async def downgrade(database_url: str, revision: str) -> None:
    """Migrate the database down to ``revision`` ("base" drops everything EchoLM created)."""
    await _run_command(database_url, "downgrade", revision)


async def current_revision(database_url: str) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    engine = make_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current_revision)
    finally:
        await engine.dispose()


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _run_command(database_url: str, name: str, revision: str, directory: Path | None = None) -> None:
    config = alembic_config(database_url, directory)
    ensure_sqlite_directory(database_url)
    engine = make_engine(database_url, statement_timeout_s=MIGRATION_STATEMENT_TIMEOUT_S)
    try:
        await prepare_database(engine)
        async with writer_engine(engine).begin() as connection:
            await lock_for_migrations(connection)
            await connection.run_sync(_run_sync_command, config, name, revision)
    finally:
        await engine.dispose()


def _run_sync_command(connection: Connection, config: Config, name: str, revision: str) -> None:
    # env.py sees the connection and migrates on it, inside this transaction and this event loop.
    config.attributes["connection"] = connection
    getattr(command, name)(config, revision)
