"""Example usage statistics for the replay agent and utility-aware eviction.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

Two tables, both keyed so that at-least-once delivery cannot double count:

* ``example_usages``: one row per logged response that was served with cached examples (the
  "processed marker", keyed by request id). Usages are folded into the statistics once ("settled"),
  after a delay that lets feedback or a judge verdict for that request arrive first.
* ``example_stats``: per example version, its potential gain G(e) (an EMA), uses since its last
  replay, decayed successful offloads (the eviction value) and replay bookkeeping.

The types are spelled out here, not imported from the models, so this revision keeps describing the
schema as it was when it was written.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "example_stats",
        sa.Column("example_id", ID, nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("uses", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("gain", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.Column("offload_value", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.Column("offload_updated_at", TIMESTAMP, nullable=True),
        sa.Column("replay_rounds", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_replayed_at", TIMESTAMP, nullable=True),
        sa.Column("last_replay_score", sa.Double(), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["example_id"], ["examples.id"],
                                name=op.f("fk_example_stats_example_id_examples")),
        sa.PrimaryKeyConstraint("example_id", name=op.f("pk_example_stats")),
    )
    op.create_index("ix_example_stats_tenant_gain", "example_stats", ["tenant", "gain"], unique=False)

    op.create_table(
        "example_usages",
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("tier", sa.String(), nullable=False),
        sa.Column("example_ids", JSON, nullable=False),
        sa.Column("offloaded", sa.Boolean(), nullable=False),
        sa.Column("quality", sa.Double(), nullable=True),
        sa.Column("recorded_at", TIMESTAMP, nullable=False),
        sa.Column("settled_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_example_usages")),
    )
    op.create_index("ix_example_usages_settled_at_recorded_at", "example_usages", ["settled_at", "recorded_at"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_example_usages_settled_at_recorded_at", table_name="example_usages")
    op.drop_table("example_usages")
    op.drop_index("ix_example_stats_tenant_gain", table_name="example_stats")
    op.drop_table("example_stats")
