"""API tokens in a SQLite store: shown once, kept hashed, compared in constant time, refused
once expired or revoked, and created only for a role and tenant that fit."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from lethe.evidence import ledger, tokens
from lethe.evidence.store import api_tokens, engine_for


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    yield await engine_for(f"sqlite+aiosqlite:///{tmp_path / 'lethe.db'}")


async def _make(store: AsyncEngine, role: str = "dpo", tenant: str | None = "st-mary") -> str:
    _, secret = await tokens.create(
        store, name="t", role=role, tenant=tenant, lifetime=timedelta(days=1), created_by="x"
    )
    return secret


async def test_a_token_is_kept_as_a_hash_and_found_by_its_secret(store: AsyncEngine) -> None:
    secret = await _make(store)
    assert tokens.looks_like_token(secret)
    async with store.connect() as conn:
        rows = (await conn.execute(select(api_tokens))).all()
    assert len(rows) == 1
    kept = rows[0]._mapping
    assert secret not in str(dict(kept))
    assert kept["secret_hash"] == hashlib.sha256(secret.split("_", 3)[3].encode()).hexdigest()
    found = await tokens.authenticate(store, secret)
    assert found is not None and (found.role, found.tenant) == ("dpo", "st-mary")
    assert found.last_used_at is None  # as it was read; the use is written after
    assert [e.action for e in await ledger.entries(store)] == ["token.created"]


async def test_a_wrong_secret_an_unknown_id_and_garbage_are_refused(store: AsyncEngine) -> None:
    secret = await _make(store)
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    unknown = "lethe_tok_000000000000_" + secret.split("_", 3)[3]
    for presented in (wrong, unknown, "not a token", ""):
        assert await tokens.authenticate(store, presented) is None


async def test_every_secret_is_compared_in_constant_time(
    store: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = await _make(store)
    calls: list[tuple[str, str]] = []
    compare = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    await tokens.authenticate(store, secret)
    await tokens.authenticate(store, "lethe_tok_000000000000_" + "x" * 43)  # an unknown id
    await tokens.authenticate(store, "garbage")
    assert len(calls) == 3  # a known id, an unknown one and garbage all take one comparison


async def test_expired_and_revoked_tokens_are_refused(store: AsyncEngine) -> None:
    expired, revoked = await _make(store), await _make(store)
    async with store.begin() as conn:
        await conn.execute(
            update(api_tokens)
            .where(api_tokens.c.id == expired.split("_")[1] + "_" + expired.split("_")[2])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert await tokens.authenticate(store, expired) is None
    token_id = "_".join(revoked.split("_")[1:3])
    assert await tokens.authenticate(store, revoked) is not None
    gone = await tokens.revoke(store, token_id, by="admin")
    assert gone.revoked_at is not None
    assert await tokens.authenticate(store, revoked) is None
    assert token_id not in [t.id for t in await tokens.list_tokens(store)]
    assert token_id in [t.id for t in await tokens.list_tokens(store, include_revoked=True)]
    with pytest.raises(tokens.UnknownToken):
        await tokens.revoke(store, "tok_ffffffffffff", by="admin")


@pytest.mark.parametrize(
    ("role", "tenant", "days", "problem"),
    [
        ("dpo", None, 1, "acts for one tenant"),
        ("service", None, 1, "acts for one tenant"),
        ("admin", "st-mary", 1, "acts for all tenants"),
        ("root", None, 1, "role must be one of"),
        ("auditor", "St Mary", 1, "is not a tenant name"),
        ("auditor", None, 400, "from one minute to 366 days"),
    ],
)
def test_a_grant_that_does_not_fit_is_refused(
    role: str, tenant: str | None, days: int, problem: str
) -> None:
    with pytest.raises(tokens.TokenRefused, match=problem):
        tokens.check_grant(role, tenant, timedelta(days=days))
