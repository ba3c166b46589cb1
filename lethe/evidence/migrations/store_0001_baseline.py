"""Lethe's store as it was before migrations: ledger, ledger head, holds, forget-list, certificates.

`TABLES` is frozen: a database made by `create_all` before migrations holds exactly these and is
stamped at this revision instead of being made again.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, Text

revision = "store_0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

TABLES = MetaData()

Table(
    "lethe_ledger",
    TABLES,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(100), nullable=False, index=True),
    Column("subject_ref", String(64), nullable=False, index=True),
    Column("actor", String(200), nullable=False),
    Column("action", String(100), nullable=False),
    Column("system", String(100)),
    Column("details", JSON, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("idempotency_key", String(300), nullable=False, unique=True),
)

Table(
    "lethe_ledger_head",
    TABLES,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

Table(
    "lethe_holds",
    TABLES,
    Column("id", String(40), primary_key=True),
    Column("matter", String(200), nullable=False),
    Column("scope", String(20), nullable=False),
    Column("value", String(200), nullable=False),
    Column("reason", Text, nullable=False),
    Column("placed_by", String(200), nullable=False),
    Column("placed_at", DateTime(timezone=True), nullable=False),
    Column("released_by", String(200)),
    Column("released_at", DateTime(timezone=True)),
)

Table(
    "lethe_forget_list",
    TABLES,
    Column("subject_ref", String(64), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("request_id", String(100), nullable=False),
    Column("systems", JSON, nullable=False),
    Column("erased_at", DateTime(timezone=True), nullable=False),
    Column("sealed_subject", Text, nullable=False),
)

Table(
    "lethe_certificates",
    TABLES,
    Column("request_id", String(100), primary_key=True),
    Column("subject_ref", String(64), nullable=False, index=True),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("body", JSON, nullable=False),
)


def upgrade() -> None:
    """Make the store's tables exactly as `create_all` made them before migrations."""
    TABLES.create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    """Drop the store's tables, and everything in them."""
    TABLES.drop_all(op.get_bind(), checkfirst=False)
