"""Index the responses by tier and finish time.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

Two periodic queries select one tier's recent responses: the replay agent's idle check
(``tier_busy_seconds``: the tier's responses finished in the last ``replay.load_window_s``, every
``replay.interval_s``) and the route workers' cost refresh (``generation_timings``: the tier's newest
500 answers, every ``bandit.cost_refresh_interval_s``). The only index on ``responses`` led with
``tenant``, so both scanned the whole table, a cost that grows with the history. (Found while looking
for the all-in-one worker's latency creep under sustained load; at 12,000 rows it was not that creep's
cause, see docs/benchmarks.md, "Sustained load", but at production history sizes it would be.)
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_responses_tier_finished_at", "responses", ["tier", "finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_responses_tier_finished_at", table_name="responses")
