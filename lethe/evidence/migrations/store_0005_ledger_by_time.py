"""The ledger read newest first by time: an index on (at, seq), for pages of every tenant's
entries (the tenant's own pages use the (tenant, action, at) and (tenant, at) indexes)."""

from __future__ import annotations

from alembic import op

revision = "store_0005"
down_revision: str | None = "store_0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the index."""
    op.create_index("ix_lethe_ledger_at_seq", "lethe_ledger", ["at", "seq"])


def downgrade() -> None:
    """Drop the index."""
    op.drop_index("ix_lethe_ledger_at_seq", "lethe_ledger")
