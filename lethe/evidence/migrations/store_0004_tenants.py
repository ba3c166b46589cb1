"""Tenants in Lethe's store: a `tenant` column on the ledger, holds, certificates and sweep
reports (the forget-list has one), the ledger's audit indexes, the API tokens table, and on
PostgreSQL row-level security on the tenant's tables.

NULL is "not one tenant's" (key rotation, retention sweeps, holds on all tenants): such rows are
seen only under the all-tenants scope. Certificates take their tenant from their body, tenant
holds from their value; ledger entries written before stay NULL (their hash covers no tenant).
The policy lets a session see the rows of the tenant in its `lethe.tenant` setting, or all of
them when it is `*`, and none when it is unset. It is not forced: the tables' owner (the
workers' role) sees every row; the API connects as another role (`lethe db grant-api`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0004"
down_revision: str | None = "store_0003"
branch_labels: str | None = None
depends_on: str | None = None

ADDED = ("lethe_ledger", "lethe_holds", "lethe_certificates", "lethe_sweep_reports")
ISOLATED = (*ADDED, "lethe_forget_list")
POLICY = "lethe_tenant_isolation"
VISIBLE = (
    "(current_setting('lethe.tenant', true) = '*' "
    "OR tenant = current_setting('lethe.tenant', true))"
)


def upgrade() -> None:
    """Add the tenant columns (filled where known), the indexes, the tokens table, the policies."""
    for table in ADDED:
        op.add_column(table, sa.Column("tenant", sa.String(100)))
    op.create_index("ix_lethe_ledger_tenant_action_at", "lethe_ledger", ["tenant", "action", "at"])
    op.create_index("ix_lethe_ledger_tenant_at", "lethe_ledger", ["tenant", "at"])
    _backfill()
    op.create_table(
        "lethe_api_tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("tenant", sa.String(100)),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
    )
    if op.get_bind().dialect.name == "postgresql":
        for table in ISOLATED:
            op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
            op.execute(f"CREATE POLICY {POLICY} ON {table} USING {VISIBLE} WITH CHECK {VISIBLE}")


def _backfill() -> None:
    """Certificates' tenant from their body, tenant holds' from their value."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE lethe_certificates SET tenant = body->>'tenant'")
    else:
        op.execute("UPDATE lethe_certificates SET tenant = json_extract(body, '$.tenant')")
    op.execute("UPDATE lethe_holds SET tenant = value WHERE scope = 'tenant'")


def downgrade() -> None:
    """Drop the policies, the tokens table (every token in it), the indexes and the columns."""
    if op.get_bind().dialect.name == "postgresql":
        for table in ISOLATED:
            op.execute(f"DROP POLICY IF EXISTS {POLICY} ON {table}")
            op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    op.drop_table("lethe_api_tokens")
    op.drop_index("ix_lethe_ledger_tenant_at", "lethe_ledger")
    op.drop_index("ix_lethe_ledger_tenant_action_at", "lethe_ledger")
    for table in ADDED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")
