"""Retention sweep reports: one row per sweep (or dry run), its report as JSON."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0002"
down_revision: str | None = "store_0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the sweep reports table."""
    op.create_table(
        "lethe_sweep_reports",
        sa.Column("run_id", sa.String(200), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dry_run", sa.Boolean, nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
    )
    op.create_index("ix_lethe_sweep_reports_started_at", "lethe_sweep_reports", ["started_at"])


def downgrade() -> None:
    """Drop the sweep reports table, and every report in it."""
    op.drop_index("ix_lethe_sweep_reports_started_at", "lethe_sweep_reports")
    op.drop_table("lethe_sweep_reports")
