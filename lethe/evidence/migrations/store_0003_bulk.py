"""Bulk erasure: its subjects (sealed, with their status), its batches (each one's Merkle root
and the ledger entry holding it), the batches' leaves (one per subject and step), and the steps
to verify again once the window has ended (Kafka's `pending_compaction`)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0003"
down_revision: str | None = "store_0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the bulk subjects, batches and leaves tables."""
    op.create_table(
        "lethe_bulk_subjects",
        sa.Column("bulk_id", sa.String(100), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("subject_ref", sa.String(64), nullable=False),
        sa.Column("sealed", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("detail", sa.String(200), nullable=False),
        sa.Column("batch", sa.Integer),
        sa.PrimaryKeyConstraint("bulk_id", "seq", name="pk_lethe_bulk_subjects"),
        sa.UniqueConstraint("bulk_id", "subject_ref", name="uq_lethe_bulk_subjects_ref"),
    )
    op.create_index("ix_lethe_bulk_subjects_subject", "lethe_bulk_subjects", ["subject_ref"])
    op.create_table(
        "lethe_bulk_batches",
        sa.Column("bulk_id", sa.String(100), nullable=False),
        sa.Column("phase", sa.String(20), nullable=False),
        sa.Column("batch", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("ledger_hash", sa.String(64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("bulk_id", "phase", "batch", name="pk_lethe_bulk_batches"),
    )
    op.create_table(
        "lethe_bulk_leaves",
        sa.Column("bulk_id", sa.String(100), nullable=False),
        sa.Column("phase", sa.String(20), nullable=False),
        sa.Column("batch", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("idx", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("subject_ref", sa.String(64), nullable=False),
        sa.Column("step_id", sa.String(200), nullable=False),
        sa.Column("status", sa.String(30), nullable=False),
        sa.Column("affected", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("bulk_id", "phase", "batch", "idx", name="pk_lethe_bulk_leaves"),
    )
    op.create_index("ix_lethe_bulk_leaves_subject", "lethe_bulk_leaves", ["bulk_id", "subject_ref"])
    op.create_table(
        "lethe_bulk_rechecks",
        sa.Column("bulk_id", sa.String(100), nullable=False),
        sa.Column("batch", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("step_id", sa.String(200), nullable=False),
        sa.Column("outcome", sa.JSON, nullable=False),
        sa.Column("done", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("bulk_id", "batch", "step_id", name="pk_lethe_bulk_rechecks"),
    )


def downgrade() -> None:
    """Drop the bulk tables, and every bulk erasure's subjects, batches and leaves in them."""
    op.drop_table("lethe_bulk_rechecks")
    op.drop_index("ix_lethe_bulk_leaves_subject", "lethe_bulk_leaves")
    op.drop_table("lethe_bulk_leaves")
    op.drop_table("lethe_bulk_batches")
    op.drop_index("ix_lethe_bulk_subjects_subject", "lethe_bulk_subjects")
    op.drop_table("lethe_bulk_subjects")
