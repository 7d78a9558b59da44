"""The router's context at routing time, logged with each response.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

``responses.route_context`` (JSON, JSONB on PostgreSQL; nullable): what the router saw and computed
when it chose a tier (``echolm.domain.RouteContext``: mu_i, S_i, C_i, the loads, the example features,
exploration, the router state's version). Rows logged before this revision keep NULL there; the
learners rebuild their context as they did before. Adding a nullable column rewrites nothing, on
either backend.

The types are spelled out here, not imported from the models, so this revision keeps describing the
schema as it was when it was written.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.add_column("responses", sa.Column("route_context", JSON, nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite copies the table without the column (PostgreSQL drops it in place).
    with op.batch_alter_table("responses") as batch:
        batch.drop_column("route_context")
