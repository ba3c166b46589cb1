"""The key store as it was before migrations: KEK versions and state, data keys, codec keys,
shredded subjects.

`TABLES` is frozen: a database made by `create_all` before migrations holds exactly these and is
stamped at this revision instead of being made again.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import BigInteger, Column, DateTime, Integer, LargeBinary, MetaData, String, Table

revision = "keys_0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

TABLES = MetaData()

Table(
    "lethe_kek_versions",
    TABLES,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("material", LargeBinary),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("retired_at", DateTime(timezone=True)),
    Column("rotation_id", String(100), unique=True),
)

Table(
    "lethe_kek_state",
    TABLES,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("min_decrypt_version", Integer, nullable=False),
)

Table(
    "lethe_data_keys",
    TABLES,
    Column("subject_ref", String(32), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("tenant", String(100), nullable=False),
    Column("kek_version", Integer, nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("encryptions", BigInteger, nullable=False),
)

Table(
    "lethe_codec_keys",
    TABLES,
    Column("key_id", String(64), primary_key=True),
    Column("material", LargeBinary),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("retired_at", DateTime(timezone=True)),
)

Table(
    "lethe_shredded_subjects",
    TABLES,
    Column("subject_ref", String(32), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("shredded_at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(100), nullable=False),
    Column("versions_destroyed", Integer, nullable=False),
)


def upgrade() -> None:
    """Make the key store's tables exactly as `create_all` made them before migrations."""
    TABLES.create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    """Drop the key store's tables, and every key in them (which shreds everything)."""
    TABLES.drop_all(op.get_bind(), checkfirst=False)
