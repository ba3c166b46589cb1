"""A tenant's subjects read from a SQLite file: the same pages as on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert

from lethe.activities.clients import Clients
from lethe.activities.sql_subjects import sql_subjects
from lethe.classification.datamap import SqlJoin, SqlTableLocator
from lethe.contracts import SubjectsQuery
from tests.steps import step

metadata = MetaData()
members = Table(
    "members",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("member_no", Integer, nullable=False),
    Column("tenant", String(20), nullable=False),
    Column("email", String(200)),
)
visits = Table(
    "visits",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("member_row", Integer, nullable=False),
)


@pytest.fixture
async def clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Clients]:
    """Clients of a SQLite file with members 1..12 of st-mary (emails of 1..6) and 1..3 of
    st-john, and visits of st-mary's members 2 and 11."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'clinic.db'}"
    monkeypatch.setenv("CLINIC_DB_URL", url)
    async with Clients() as opened:
        async with opened.sql_engine(url).begin() as conn:
            await conn.run_sync(metadata.create_all)
            rows = [
                {"member_no": n, "tenant": "st-mary", "email": f"{n}@x" if n <= 6 else " "}
                for n in range(1, 13)
            ] + [{"member_no": n, "tenant": "st-john", "email": None} for n in range(1, 4)]
            await conn.execute(insert(members), [{"id": i, **r} for i, r in enumerate(rows, 1)])
            await conn.execute(
                insert(visits), [{"id": 1, "member_row": 2}, {"id": 2, "member_row": 11}]
            )
        yield opened


def query(locator: SqlTableLocator, after: str | None, tenant: str = "st-mary") -> SubjectsQuery:
    """A page of five of the tenant's subjects after `after`."""
    located = step(locator, system="clinic-db", connection="CLINIC_DB_URL")
    return SubjectsQuery(request_id="r", tenant=tenant, step=located, after=after, limit=5)


MEMBERS = SqlTableLocator(
    table="members",
    subject_column="member_no",
    tenant_column="tenant",
    columns={"email": "user.contact.email"},
    identities={"email": "email"},
)


async def test_pages_of_integer_ids_with_identities(clients: Clients) -> None:
    pages, after = [], None
    while True:
        page = await sql_subjects(clients, query(MEMBERS, after))
        pages.append(page)
        if (after := page.next_after) is None:
            break
    assert [[s.subject_id for s in p.subjects] for p in pages] == [
        ["1", "2", "3", "4", "5"],
        ["6", "7", "8", "9", "10"],
        ["11", "12"],
    ]
    assert pages[0].subjects[2].identities == {"email": "3@x"}
    assert pages[1].subjects[1].identities == {}  # a blank email is no identity
    john = await sql_subjects(clients, query(MEMBERS, None, tenant="st-john"))
    assert [s.subject_id for s in john.subjects] == ["1", "2", "3"] and john.next_after is None


async def test_a_join_path_on_sqlite(clients: Clients) -> None:
    located = SqlTableLocator(
        table="visits",
        via=[SqlJoin(column="member_row", table="members", references="id")],
        subject_column="member_no",
        tenant_column="tenant",
        columns={"member_row": "user"},
    )
    page = await sql_subjects(clients, query(located, None))
    assert [s.subject_id for s in page.subjects] == ["2", "11"]
