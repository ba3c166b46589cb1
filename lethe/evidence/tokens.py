"""API tokens: created for a role and a tenant, shown once, stored hashed, revocable, expiring.

A token reads `lethe_tok_<12 hex>_<secret>`. The `tok_<12 hex>` part is its id (public: it is
listed, and names the token in the ledger); only the SHA-256 of the secret is kept, and a
presented secret is compared with it in constant time. Creating and revoking go to the ledger.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from pydantic import Field
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.contracts import TENANT_PATTERN, Contract
from lethe.evidence import ledger
from lethe.evidence.store import api_tokens
from lethe.kernel.errors import LetheError

Role = Literal["dpo", "auditor", "service", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
TENANT_ROLES: tuple[Role, ...] = ("dpo", "service")
"""Roles that always act for one tenant; an auditor may have one or all, an admin has all."""
MAX_LIFETIME = timedelta(days=366)
LAST_USED_EVERY = timedelta(minutes=1)
"""How stale `last_used_at` may get: a token used every second is not written every second."""
_TOKEN = re.compile(r"^lethe_(tok_[0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_UNKNOWN_HASH = hashlib.sha256(b"no such token").hexdigest()


class TokenRefused(LetheError):
    """A token cannot be created as asked (role, tenant or lifetime); the message says why."""


class UnknownToken(LetheError):
    """No API token has this id."""


class ApiToken(Contract):
    """An API token as it is listed: never its secret."""

    id: str
    name: str = Field(min_length=1, max_length=200)
    role: Role
    tenant: str | None = None
    """The tenant it acts for; None: all tenants (an auditor's or an admin's)."""
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        """Not revoked and not expired."""
        return self.revoked_at is None and now < self.expires_at


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _token(row: object) -> ApiToken:
    fields = dict(row._mapping)  # type: ignore[attr-defined]
    fields.pop("secret_hash", None)
    for name in ("created_at", "expires_at", "revoked_at", "last_used_at"):
        fields[name] = _aware(fields[name])
    return ApiToken.model_validate(fields)


def check_grant(role: str, tenant: str | None, lifetime: timedelta) -> Role:
    """The role, if a token may be made for it with this tenant and lifetime; else TokenRefused."""
    if role not in ROLES:
        raise TokenRefused(f"role must be one of {', '.join(ROLES)}, not {role[:40]!r}")
    if role in TENANT_ROLES and tenant is None:
        raise TokenRefused(f"a {role} token acts for one tenant: give --tenant")
    if role == "admin" and tenant is not None:
        raise TokenRefused("an admin token acts for all tenants: leave out --tenant")
    if tenant is not None and not re.fullmatch(TENANT_PATTERN, tenant):
        raise TokenRefused(f"tenant {tenant[:60]!r} is not a tenant name")
    if not timedelta(minutes=1) <= lifetime <= MAX_LIFETIME:
        raise TokenRefused("a token lives from one minute to 366 days")
    return role


async def create(
    engine: AsyncEngine,
    *,
    name: str,
    role: str,
    tenant: str | None,
    lifetime: timedelta,
    created_by: str,
) -> tuple[ApiToken, str]:
    """Create a token; the token and its whole secret value, which is shown this once."""
    checked = check_grant(role, tenant, lifetime)
    now = datetime.now(UTC)
    token = ApiToken(
        id=f"tok_{secrets.token_hex(6)}",
        name=name,
        role=checked,
        tenant=tenant,
        created_by=created_by,
        created_at=now,
        expires_at=now + lifetime,
    )
    secret = secrets.token_urlsafe(32)
    async with engine.begin() as conn:
        await conn.execute(
            insert(api_tokens).values(**token.model_dump(), secret_hash=_hash(secret))
        )
    await ledger.append(
        engine,
        idempotency_key=f"{token.id}/created",
        request_id=token.id,
        subject_ref="-",
        actor=created_by,
        action="token.created",
        details={"role": checked, "tenant": tenant, "expires_at": token.expires_at.isoformat()},
    )
    return token, f"lethe_{token.id}_{secret}"


async def list_tokens(engine: AsyncEngine, *, include_revoked: bool = False) -> list[ApiToken]:
    """Tokens by creation time, revoked ones only if asked."""
    query = select(api_tokens).order_by(api_tokens.c.created_at)
    if not include_revoked:
        query = query.where(api_tokens.c.revoked_at.is_(None))
    async with engine.connect() as conn:
        return [_token(row) for row in await conn.execute(query)]


async def revoke(engine: AsyncEngine, token_id: str, *, by: str) -> ApiToken:
    """Revoke a token (twice is harmless) and record it in the ledger."""
    async with engine.begin() as conn:
        await conn.execute(
            update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        row = (await conn.execute(select(api_tokens).where(api_tokens.c.id == token_id))).first()
    if row is None:
        raise UnknownToken(f"no API token has the id {token_id[:60]!r}")
    await ledger.append(
        engine,
        idempotency_key=f"{token_id}/revoked",
        request_id=token_id,
        subject_ref="-",
        actor=by,
        action="token.revoked",
        details={"role": row.role, "tenant": row.tenant},
    )
    return _token(row)


def looks_like_token(presented: str) -> bool:
    """True if `presented` has the shape of a Lethe API token (not that it is valid)."""
    return _TOKEN.fullmatch(presented) is not None


async def authenticate(engine: AsyncEngine, presented: str) -> ApiToken | None:
    """The usable token whose secret this is, else None. The secret's hash is compared in
    constant time, and as long for an unknown id as for a known one."""
    match = _TOKEN.fullmatch(presented)
    token_id, secret = match.groups() if match else ("", presented)
    async with engine.connect() as conn:
        row = (await conn.execute(select(api_tokens).where(api_tokens.c.id == token_id))).first()
    stored = row.secret_hash if row is not None else _UNKNOWN_HASH
    matches = hmac.compare_digest(_hash(secret), stored)
    if row is None or not matches:
        return None
    token = _token(row)
    now = datetime.now(UTC)
    if not token.usable(now):
        return None
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_EVERY:
        async with engine.begin() as conn:
            await conn.execute(
                update(api_tokens).where(api_tokens.c.id == token.id).values(last_used_at=now)
            )
    return token
