"""The history store: response logs and the example cache (PostgreSQL, or SQLite embedded).

``SqlHistoryStore`` (``echolm.history.store``) implements ``echolm.protocols.HistoryStore``;
``echolm.history.migrate`` applies the Alembic migrations in ``migrations/``; the schema is in
``echolm.history.tables``.
"""
