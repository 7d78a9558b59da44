"""Record how many of a response's prompt tokens came from the tier's prefix cache.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

The llama.cpp tiers reuse the KV state of earlier prompts that start alike (``prefix_cache_mb``), and
vLLM and OpenAI-compatible servers report their own prefix-cache hits. The router's measured token costs
(``echolm.routing.costs.fit_token_rates``) fit seconds on prefilled and decoded tokens: counting reused
prompt tokens as prefilled made prefill look cheap and skewed the decode rate. Null: not reported
(rows written before this revision, or a backend that does not say).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("responses", sa.Column("cached_prompt_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("responses", "cached_prompt_tokens")
