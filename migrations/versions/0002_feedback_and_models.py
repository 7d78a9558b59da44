"""Quality feedback and learned model states.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

* ``feedback``: thumbs, pairwise preferences, scores and judge/verifier verdicts about logged
  responses, keyed by a content-derived (or given) ``feedback_id`` so redelivery is harmless.
* ``model_states``: versioned JSON states of learned models (helpfulness proxy, bandit router).

The types are spelled out here, not imported from the models, so this revision keeps describing the
schema as it was when it was written.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("feedback_id", sa.String(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("tier", sa.String(), nullable=True),
        sa.Column("other_request_id", sa.String(), nullable=True),
        sa.Column("other_tier", sa.String(), nullable=True),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("quality", sa.Double(), nullable=False),
        sa.Column("detail", JSON, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint("kind IN ('thumbs', 'pairwise', 'score', 'verifier')", name=op.f("ck_feedback_kind")),
        sa.CheckConstraint("quality >= 0 AND quality <= 1", name=op.f("ck_feedback_quality")),
        sa.PrimaryKeyConstraint("feedback_id", name=op.f("pk_feedback")),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"], unique=False)
    op.create_index("ix_feedback_other_request_id", "feedback", ["other_request_id"], unique=False)
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"], unique=False)

    op.create_table(
        "model_states",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name=op.f("pk_model_states")),
    )


def downgrade() -> None:
    op.drop_table("model_states")
    op.drop_index("ix_feedback_created_at", table_name="feedback")
    op.drop_index("ix_feedback_other_request_id", table_name="feedback")
    op.drop_index("ix_feedback_request_id", table_name="feedback")
    op.drop_table("feedback")
