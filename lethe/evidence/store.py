"""Lethe's own store: the ledger, legal holds, the forget-list, certificates, sweep reports and
bulk erasures' subjects, batches and Merkle leaves (SQLAlchemy Core).

A SQLite file by default, PostgreSQL in production. The tables change only through the
revisions in `lethe/evidence/migrations/` (a change here without one fails the tests); the
first use in a process brings the database to their head (`lethe.kernel.database`).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from lethe.kernel import database, tenancy
from lethe.kernel.errors import LetheError
from lethe.kernel.migrations import Schema

metadata = MetaData()

ledger = Table(
    "lethe_ledger",
    metadata,
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
    # The request's tenant; NULL for entries of no one tenant (key rotation, sweeps, holds on
    # all tenants) and for entries written before tenants were kept.
    Column("tenant", String(100)),
    # The audit query: a tenant's entries of an action over a period, newest first.
    Index("ix_lethe_ledger_tenant_action_at", "tenant", "action", "at"),
    Index("ix_lethe_ledger_tenant_at", "tenant", "at"),
    # Every tenant's entries newest first (an auditor of all tenants, the console's ledger page).
    Index("ix_lethe_ledger_at_seq", "at", "seq"),
)

ledger_head = Table(
    "lethe_ledger_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

holds = Table(
    "lethe_holds",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("matter", String(200), nullable=False),
    Column("scope", String(20), nullable=False),
    Column("value", String(200), nullable=False),
    Column("reason", Text, nullable=False),
    Column("placed_by", String(200), nullable=False),
    Column("placed_at", DateTime(timezone=True), nullable=False),
    Column("released_by", String(200)),
    Column("released_at", DateTime(timezone=True)),
    Column("tenant", String(100)),  # NULL: a hold on all tenants
)

forget_list = Table(
    "lethe_forget_list",
    metadata,
    Column("subject_ref", String(64), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("request_id", String(100), nullable=False),
    Column("systems", JSON, nullable=False),
    Column("erased_at", DateTime(timezone=True), nullable=False),
    Column("sealed_subject", Text, nullable=False),
)

certificates = Table(
    "lethe_certificates",
    metadata,
    Column("request_id", String(100), primary_key=True),
    Column("subject_ref", String(64), nullable=False, index=True),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("body", JSON, nullable=False),
    Column("tenant", String(100)),
)

sweep_reports = Table(
    "lethe_sweep_reports",
    metadata,
    Column("run_id", String(200), primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False, index=True),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("dry_run", Boolean, nullable=False),
    Column("body", JSON, nullable=False),
    Column("tenant", String(100)),  # NULL: a sweep spans tenants
)

api_tokens = Table(
    "lethe_api_tokens",
    metadata,
    Column("id", String(40), primary_key=True),  # the public part, "tok_<12 hex>"
    Column("name", String(200), nullable=False),
    Column("role", String(20), nullable=False),  # dpo | auditor | service | admin
    Column("tenant", String(100)),  # NULL: all tenants (auditor, admin)
    Column("secret_hash", String(64), nullable=False),  # SHA-256 hex of the secret
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("last_used_at", DateTime(timezone=True)),
)

bulk_subjects = Table(
    "lethe_bulk_subjects",
    metadata,
    Column("bulk_id", String(100), nullable=False),
    Column("seq", Integer, nullable=False, autoincrement=False),
    Column("subject_ref", String(64), nullable=False),
    Column("sealed", Text, nullable=False),
    Column("status", String(20), nullable=False),
    Column("detail", String(200), nullable=False),
    Column("batch", Integer),
    PrimaryKeyConstraint("bulk_id", "seq", name="pk_lethe_bulk_subjects"),
    UniqueConstraint("bulk_id", "subject_ref", name="uq_lethe_bulk_subjects_ref"),
    Index("ix_lethe_bulk_subjects_subject", "subject_ref"),  # a subject's bulk requests
)

bulk_batches = Table(
    "lethe_bulk_batches",
    metadata,
    Column("bulk_id", String(100), nullable=False),
    Column("phase", String(20), nullable=False),
    Column("batch", Integer, nullable=False, autoincrement=False),
    Column("size", Integer, nullable=False),
    Column("root", String(64), nullable=False),
    Column("ledger_hash", String(64), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("bulk_id", "phase", "batch", name="pk_lethe_bulk_batches"),
)

bulk_leaves = Table(
    "lethe_bulk_leaves",
    metadata,
    Column("bulk_id", String(100), nullable=False),
    Column("phase", String(20), nullable=False),
    Column("batch", Integer, nullable=False, autoincrement=False),
    Column("idx", Integer, nullable=False, autoincrement=False),
    Column("subject_ref", String(64), nullable=False),
    Column("step_id", String(200), nullable=False),
    Column("status", String(30), nullable=False),
    Column("affected", Integer, nullable=False),
    PrimaryKeyConstraint("bulk_id", "phase", "batch", "idx", name="pk_lethe_bulk_leaves"),
    Index("ix_lethe_bulk_leaves_subject", "bulk_id", "subject_ref"),
)

bulk_rechecks = Table(
    "lethe_bulk_rechecks",
    metadata,
    Column("bulk_id", String(100), nullable=False),
    Column("batch", Integer, nullable=False, autoincrement=False),
    Column("step_id", String(200), nullable=False),
    # The step's BatchStepOutcome for the batch: references, statuses, evidence; never ids.
    Column("outcome", JSON, nullable=False),
    Column("done", Boolean, nullable=False),
    PrimaryKeyConstraint("bulk_id", "batch", "step_id", name="pk_lethe_bulk_rechecks"),
)

schema = Schema(
    key="store",
    name="Lethe's store",
    tables=metadata,
    versions=Path(__file__).resolve().parent / "migrations",
    version_table="lethe_store_version",
    baseline="store_0001",
)

GENESIS_HASH = "0" * 64

TENANT_TABLES = (ledger, holds, certificates, sweep_reports, forget_list)
"""The tables whose rows belong to a tenant (PostgreSQL's row-level security covers them)."""


class OutOfScope(LetheError):
    """A write for another tenant (or for all tenants) under one tenant's scope."""


def visible(table: Table) -> ColumnElement[bool] | None:
    """The condition keeping `table`'s rows to the current tenant scope: None under the
    all-tenants scope or none; under a tenant's, its rows only (rows of no tenant are hidden),
    as PostgreSQL's row-level security does."""
    tenant = tenancy.tenant_only()
    return None if tenant is None else table.c.tenant == tenant


def owned(tenant: str | None, what: str) -> str | None:
    """The tenant a write of `what` is for: under a tenant's scope, that tenant (refused with
    OutOfScope when another, or all tenants, is asked); else `tenant` as given."""
    scope = tenancy.tenant_only()
    if scope is None:
        return tenant
    if tenant is not None and tenant != scope:
        raise OutOfScope(f"{what} for another tenant is refused under one tenant's scope")
    return scope


async def engine_for(url: str) -> AsyncEngine:
    """The store's engine for `url`, created once per process, its schema at its head."""
    return await database.engine_for(url, schema, _ensure_ledger_head)


async def _ensure_ledger_head(conn: AsyncConnection) -> None:
    """The ledger's head row (seq 0, the genesis hash), which every append updates and locks."""
    found = (await conn.execute(select(ledger_head.c.id).where(ledger_head.c.id == 1))).first()
    if found is None:
        try:
            async with conn.begin_nested():
                await conn.execute(insert(ledger_head).values(id=1, seq=0, hash=GENESIS_HASH))
        except IntegrityError:
            pass  # another process made it first
