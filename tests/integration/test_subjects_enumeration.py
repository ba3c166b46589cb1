"""Finding every subject of a tenant (tenant offboarding) in the stack's PostgreSQL and Redis.

One schema for the module holds members of two tenants (the same ids in both), their visits
(found through a join path), a single-tenant table with integer ids and a table without a tenant
column; Redis holds keys of both tenants under prefixes. Each test reads pages the way
offboarding does and compares them with what was written.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, insert, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.schema import CreateSchema, DropSchema

from lethe.activities.cache import SCAN_COUNT, glob_escape
from lethe.activities.cache_subjects import InvalidCursor, redis_subjects
from lethe.activities.clients import Clients
from lethe.activities.common import SchemaMismatch
from lethe.activities.connector import UnsupportedStep
from lethe.activities.sql_subjects import sql_subjects
from lethe.activities.subject_pages import InvalidTenant
from lethe.classification.datamap import (
    KafkaTopicLocator,
    RedisLocator,
    SqlJoin,
    SqlTableLocator,
)
from lethe.contracts import Subject, SubjectsPage, SubjectsQuery
from lethe.kernel.subjects import tag_for
from tests.steps import step

TENANT = "st-mary"
OTHER = "st-john"
MEMBERS = 2500
"""St Mary's members: three pages of 1000."""
ODD_ID = "o'brien\"%_\\x"
"""An id with quotes, LIKE wildcards and a backslash: it must come back as it was."""
TOO_LONG = "x" * 300
UNPRINTABLE = "m-00100\x01"
"""Ids no subject can have (longer than 256 characters; a control character): left out."""
COLUMNS = {"email": "user.contact.email"}


@dataclass
class Clinic:
    """The module's schema."""

    schema: str
    url: str

    async def ids_in_order(self, tenant: str) -> list[str]:
        """The tenant's distinct member ids as the database orders them."""
        engine = create_async_engine(self.url)
        async with engine.connect() as conn:
            found = await conn.execute(
                text(
                    f'SELECT DISTINCT member_no FROM "{self.schema}".members '
                    "WHERE tenant = :t ORDER BY member_no"
                ),
                {"t": tenant},
            )
            ids = [row[0] for row in found]
        await engine.dispose()
        return ids

    def name(self, table: str) -> str:
        """The schema-qualified name the data map uses."""
        return f"{self.schema}.{table}"


def member_id(n: int) -> str:
    """St Mary's n-th member id (also St John's, for the first ones)."""
    return f"m-{n:05d}"


@pytest.fixture(scope="module")
async def clinic(sql_url: str) -> AsyncIterator[Clinic]:
    """Members of two tenants with emails (some blank, some on a second row), their visits,
    integer-keyed patients of one tenant, and a table without a tenant column."""
    schema = f"lethe_subj_{uuid.uuid4().hex[:12]}"
    metadata = MetaData(schema=schema)
    members = Table(
        "members",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("member_no", Text, nullable=False),
        Column("tenant", String(40), nullable=False),
        Column("email", String(200)),
    )
    visits = Table(
        "visits",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("member_row", Integer, nullable=False),
        Column("notes", String(200)),
    )
    patients = Table(
        "patients",
        metadata,
        Column("patient_id", Integer, primary_key=True),
        Column("email", String(200)),
    )
    rows: list[dict[str, Any]] = []
    for n in range(MEMBERS):
        rows.append(
            {"member_no": member_id(n), "tenant": TENANT, "email": f"{member_id(n)}@mary.example"}
        )
    for n in range(0, MEMBERS, 7):  # a second row for some: one subject still, one email
        rows.append({"member_no": member_id(n), "tenant": TENANT, "email": "   "})
    for n in range(300):  # St John's: the same ids, another tenant
        rows.append({"member_no": member_id(n), "tenant": OTHER, "email": f"{n}@john.example"})
    rows.append({"member_no": "j-only", "tenant": OTHER, "email": None})
    rows.append({"member_no": "blank", "tenant": TENANT, "email": ""})
    rows.append({"member_no": "blank", "tenant": TENANT, "email": None})
    rows.append({"member_no": "two-emails", "tenant": TENANT, "email": "z@mary.example"})
    rows.append({"member_no": "two-emails", "tenant": TENANT, "email": "a@mary.example"})
    rows.append({"member_no": ODD_ID, "tenant": TENANT, "email": "odd@mary.example"})
    rows.append({"member_no": TOO_LONG, "tenant": TENANT, "email": None})
    rows.append({"member_no": UNPRINTABLE, "tenant": TENANT, "email": None})
    for index, row in enumerate(rows, 1):
        row["id"] = index
    engine = create_async_engine(sql_url)
    async with engine.begin() as conn:
        await conn.execute(CreateSchema(schema))
        await conn.run_sync(metadata.create_all)
        await conn.execute(insert(members), rows)
        # Visits of St Mary's members 0..99 (two each) and of St John's 0..9.
        mary = [r["id"] for r in rows if r["tenant"] == TENANT][:100]
        john = [r["id"] for r in rows if r["tenant"] == OTHER][:10]
        visit_rows = [
            {"id": i, "member_row": m, "notes": "visit"}
            for i, m in enumerate([*mary, *mary, *john], 1)
        ]
        await conn.execute(insert(visits), visit_rows)
        await conn.execute(
            insert(patients), [{"patient_id": n, "email": f"p{n}@x"} for n in range(1, 16)]
        )
    yield Clinic(schema, sql_url)
    async with engine.begin() as conn:
        await conn.execute(DropSchema(schema, cascade=True))
    await engine.dispose()


def query(
    locator: SqlTableLocator | RedisLocator,
    *,
    after: str | None = None,
    limit: int = 1000,
    tenant: str = TENANT,
) -> SubjectsQuery:
    """A query for one page of `tenant`'s subjects in `locator`."""
    return SubjectsQuery(
        request_id="req-offboard", tenant=tenant, step=step(locator), after=after, limit=limit
    )


async def every_page(
    clients: Clients, locator: SqlTableLocator, *, limit: int = 1000, tenant: str = TENANT
) -> list[SubjectsPage]:
    """Every page of the tenant's subjects, following `next_after`."""
    pages: list[SubjectsPage] = []
    after: str | None = None
    while True:
        page = await sql_subjects(clients, query(locator, after=after, limit=limit, tenant=tenant))
        pages.append(page)
        if page.next_after is None:
            return pages
        assert len(pages) < 100, "the pages do not end"
        after = page.next_after


def members(clinic: Clinic, **more: Any) -> SqlTableLocator:
    """The members table's locator (emails mapped as identities unless told otherwise)."""
    fields: dict[str, Any] = {
        "table": clinic.name("members"),
        "subject_column": "member_no",
        "tenant_column": "tenant",
        "columns": COLUMNS,
        "identities": {"email": "email"},
    }
    return SqlTableLocator(**(fields | more))


def ids(pages: list[SubjectsPage]) -> list[str]:
    """The subject ids of every page, in page order."""
    return [s.subject_id for page in pages for s in page.subjects]


async def test_every_subject_of_the_tenant_comes_once_across_pages(
    clients: Clients, clinic: Clinic
) -> None:
    in_order = await clinic.ids_in_order(TENANT)
    assert len(in_order) == MEMBERS + 5
    pages = await every_page(clients, members(clinic))
    found = ids(pages)
    # 2,505 ids in three pages of 1000, 1000 and 505; the two no subject can have left out.
    assert [len(p.subjects) for p in pages] == [999, 1000, 504]
    assert found == [i for i in in_order if i not in (TOO_LONG, UNPRINTABLE)]
    assert len(set(found)) == len(found) == MEMBERS + 3
    assert {member_id(n) for n in range(MEMBERS)} | {"blank", "two-emails", ODD_ID} == set(found)
    assert all(s.tenant == TENANT for p in pages for s in p.subjects)
    assert [p.next_after for p in pages] == [in_order[999], in_order[1999], None]


async def test_another_tenant_gets_only_its_own(clients: Clients, clinic: Clinic) -> None:
    pages = await every_page(clients, members(clinic), tenant=OTHER)
    assert ids(pages) == ["j-only", *(member_id(n) for n in range(300))]
    by_id = {s.subject_id: s for p in pages for s in p.subjects}
    assert by_id[member_id(5)].identities == {"email": "5@john.example"}


async def test_identities_come_from_the_mapped_column_blanks_skipped(
    clients: Clients, clinic: Clinic
) -> None:
    by_id = {
        s.subject_id: s for p in await every_page(clients, members(clinic)) for s in p.subjects
    }
    assert by_id[member_id(0)].identities == {"email": "m-00000@mary.example"}  # not its "   "
    assert by_id[member_id(8)].identities == {"email": "m-00008@mary.example"}
    assert by_id["blank"].identities == {}
    assert by_id["two-emails"].identities == {"email": "a@mary.example"}  # the least, each time
    unmapped = await sql_subjects(clients, query(members(clinic, identities={}), limit=5))
    assert [s.identities for s in unmapped.subjects] == [{}] * 5


async def test_an_id_with_quotes_and_wildcards_comes_back_intact(
    clients: Clients, clinic: Clinic
) -> None:
    found = ids(await every_page(clients, members(clinic)))
    assert ODD_ID in found
    # Paging after it works too (it is bound, never spliced into the statement).
    after = await sql_subjects(clients, query(members(clinic), after=ODD_ID, limit=10))
    assert all(s.subject_id > ODD_ID for s in after.subjects)
    before = found[found.index(ODD_ID) - 1]
    page = await sql_subjects(clients, query(members(clinic), after=before, limit=1))
    assert [s.subject_id for s in page.subjects] == [ODD_ID]
    assert page.next_after == ODD_ID


async def test_an_id_no_subject_can_have_is_left_out_and_paging_goes_on(
    clients: Clients, clinic: Clinic
) -> None:
    # The unprintable id sorts right after m-00100: a page of one holds nothing but goes on.
    page = await sql_subjects(clients, query(members(clinic), after=member_id(100), limit=1))
    assert page.subjects == [] and page.next_after == UNPRINTABLE
    following = await sql_subjects(clients, query(members(clinic), after=page.next_after, limit=1))
    assert [s.subject_id for s in following.subjects] == [member_id(101)]


async def test_a_join_path_table_gives_the_subjects_of_its_rows(
    clients: Clients, clinic: Clinic
) -> None:
    visits = SqlTableLocator(
        table=clinic.name("visits"),
        via=[SqlJoin(column="member_row", table=clinic.name("members"), references="id")],
        subject_column="member_no",
        tenant_column="tenant",
        columns={"notes": "user.health_and_medical"},
    )
    pages = await every_page(clients, visits, limit=30)
    assert ids(pages) == [member_id(n) for n in range(100)]  # two visits each, listed once
    assert [len(p.subjects) for p in pages] == [30, 30, 30, 10]
    john = await every_page(clients, visits, tenant=OTHER)
    assert ids(john) == [member_id(n) for n in range(10)]


async def test_integer_ids_page_in_number_order_and_come_back_as_strings(
    clients: Clients, clinic: Clinic
) -> None:
    patients = SqlTableLocator(
        table=clinic.name("patients"),
        subject_column="patient_id",
        columns=COLUMNS,
        identities={"email": "email"},
    )
    pages = await every_page(clients, patients, limit=4)
    assert ids(pages) == [str(n) for n in range(1, 16)]  # 9 before 10: the column's order
    assert [p.next_after for p in pages] == ["4", "8", "12", None]
    assert pages[0].subjects[0] == Subject(
        tenant=TENANT, subject_id="1", identities={"email": "p1@x"}
    )


async def test_a_table_without_tenant_column_is_all_the_tenants(
    clients: Clients, clinic: Clinic
) -> None:
    # Only a system holding one tenant may lack the column (the data map refuses it otherwise).
    untenanted = members(clinic, tenant_column=None)
    found = ids(await every_page(clients, untenanted, limit=5000))
    assert len(found) == MEMBERS + 4  # St John's ids are St Mary's too (but one): each once


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"subject_column": "member_nr"}, r"no column 'member_nr' \(the subject column\)"),
        ({"tenant_column": "tenant_id"}, r"no column 'tenant_id' \(the tenant column\)"),
        ({"identities": {"email": "mail"}}, r"no column 'mail' \(the column of identity 'email'\)"),
        ({"table": "nowhere"}, r"has no table 'nowhere'"),
    ],
)
async def test_what_the_map_names_and_the_database_lacks_is_named(
    clients: Clients, clinic: Clinic, change: dict[str, Any], named: str
) -> None:
    with pytest.raises(SchemaMismatch, match=named) as caught:
        await sql_subjects(clients, query(members(clinic, **change)))
    assert "m-0" not in str(caught.value)


async def test_a_dropped_column_is_seen_after_the_description_was_kept(
    clients: Clients, clinic: Clinic, sql_url: str
) -> None:
    engine = create_async_engine(sql_url)
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE TABLE "{clinic.schema}".brief (m text, e text)'))
        await conn.execute(text(f"INSERT INTO \"{clinic.schema}\".brief VALUES ('a', 'x@y')"))
    brief = SqlTableLocator(
        table=clinic.name("brief"),
        subject_column="m",
        columns=COLUMNS,
        identities={"email": "e"},
    )
    first = await sql_subjects(clients, query(brief))
    assert [s.identities for s in first.subjects] == [{"email": "x@y"}]
    async with engine.begin() as conn:
        await conn.execute(text(f'ALTER TABLE "{clinic.schema}".brief DROP COLUMN e'))
    await engine.dispose()
    with pytest.raises(SchemaMismatch, match=r"no column 'e' \(the column of identity 'email'\)"):
        await sql_subjects(clients, query(brief))


async def test_only_sql_steps_and_real_tenants_are_read(clients: Clients, clinic: Clinic) -> None:
    topic = KafkaTopicLocator(topic="t", key_template="{subject_id}", categories=["user"])
    with pytest.raises(UnsupportedStep):
        await sql_subjects(clients, SubjectsQuery(request_id="r", tenant=TENANT, step=step(topic)))
    with pytest.raises(InvalidTenant):
        await sql_subjects(clients, query(members(clinic), tenant="Not A Tenant"))


async def test_reading_subjects_changes_no_row(
    clients: Clients, clinic: Clinic, sql_url: str
) -> None:
    engine = create_async_engine(sql_url)

    async def every_row() -> list[Any]:
        async with engine.connect() as conn:
            return [
                (
                    await conn.execute(
                        text(f'SELECT *, xmin::text FROM "{clinic.schema}".{name} ORDER BY id')
                    )
                ).all()
                for name in ("members", "visits")
            ]

    before = await every_row()
    await every_page(clients, members(clinic))
    assert await every_row() == before  # the same rows, never rewritten (xmin unchanged)
    await engine.dispose()


# --- Redis -------------------------------------------------------------------------------------

CACHED = 2500
"""St Mary's subjects with cached sessions: three pages of 1000, or more."""


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[tuple[Redis, str]]:
    """A client of the stack's Redis and a key prefix of this test's own (removed afterwards)."""
    prefix = f"test-subjects:{uuid.uuid4().hex[:10]}"
    client = Redis.from_url(redis_url)
    yield client, prefix
    try:
        keys = [key async for key in client.scan_iter(match=f"{glob_escape(prefix)}:*")]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


async def every_redis_page(
    clients: Clients, locator: RedisLocator, *, limit: int = 1000, tenant: str = TENANT
) -> list[SubjectsPage]:
    """Every page of the tenant's subjects in a cache, following the SCAN cursor."""
    pages: list[SubjectsPage] = []
    after: str | None = None
    while True:
        page = await redis_subjects(
            clients, query(locator, after=after, limit=limit, tenant=tenant)
        )
        pages.append(page)
        if page.next_after is None:
            return pages
        assert len(pages) < 1000, "the pages do not end"
        after = page.next_after


async def test_a_cache_gives_every_subject_of_the_tenant_over_pages(
    clients: Clients, cache: tuple[Redis, str]
) -> None:
    client, prefix = cache
    sessions = {f"{prefix}:session:{TENANT}:{member_id(n)}": b"s" for n in range(CACHED)}
    sessions |= {f"{prefix}:session:{OTHER}:{member_id(n)}": b"s" for n in range(300)}
    sessions[f"{prefix}:session:{OTHER}:john-only"] = b"s"
    await client.mset(sessions)
    locator = RedisLocator(
        patterns=[f"{prefix}:session:{{tenant}}:{{subject_id}}"], categories=["user.account"]
    )
    pages = await every_redis_page(clients, locator)
    found = ids(pages)
    # A page stops once it holds the limit (a SCAN call's keys are taken whole).
    assert len(pages) >= 3 and all(len(p.subjects) <= 1000 + SCAN_COUNT for p in pages)
    assert all(len(p.subjects) >= 1000 for p in pages[:-1])
    assert set(found) == {member_id(n) for n in range(CACHED)}
    assert all(p.subjects == sorted(p.subjects, key=lambda s: s.subject_id) for p in pages)
    assert all(len({s.subject_id for s in p.subjects}) == len(p.subjects) for p in pages)
    assert all(s.tenant == TENANT and s.identities == {} for p in pages for s in p.subjects)
    john = ids(await every_redis_page(clients, locator, tenant=OTHER, limit=50))
    assert set(john) == {member_id(n) for n in range(300)} | {"john-only"}


async def test_keys_not_matching_the_template_exactly_are_skipped(
    clients: Clients, cache: tuple[Redis, str]
) -> None:
    client, prefix = cache
    odd = "a*b[c]?d\\e"  # glob characters and a backslash: read back intact
    await client.mset(
        {
            f"{prefix}:patient:{TENANT}:p-1:profile": b"v",
            f"{prefix}:patient:{TENANT}:p-1:visits": b"v",  # the same subject: once
            # Ambiguous under `:*`: read as the shortest id (p-3), whose purge matches the key.
            f"{prefix}:patient:{TENANT}:p-3:x:profile": b"v",
            f"{prefix}:patient:{TENANT}:{odd}:profile": b"v",
            f"{prefix}:patient:{TENANT}:p-2": b"v",  # no :<suffix>: not the template's key
            f"{prefix}:patient:{TENANT}::profile": b"v",  # an empty id
            f"{prefix}:patient:{OTHER}:p-9:profile": b"v",  # another tenant's
            f"{prefix}:patient:{TENANT}-x:p-8:profile": b"v",  # a tenant named alike
            f"{prefix}:visit:{TENANT}:p-6": b"v",  # another prefix, no pattern names it
            f"{prefix}:patient:{TENANT}:{'x' * 300}:profile": b"v",  # no subject has that id
        }
    )
    await client.set(f"{prefix}:patient:{TENANT}:".encode() + b"\xff\xfe:profile", b"v")
    locator = RedisLocator(
        patterns=[
            f"{prefix}:patient:{{tenant}}:{{subject_id}}:*",
            f"{prefix}:by-ref:{{subject_ref}}",  # no subject id in it: tells no subject
        ],
        categories=["user"],
    )
    page = await redis_subjects(clients, query(locator, limit=100))
    assert [s.subject_id for s in page.subjects] == sorted(["p-1", "p-3", odd])
    assert page.next_after is None


async def test_patterns_under_prefixes_and_references_of_the_tenant(
    clients: Clients, cache: tuple[Redis, str]
) -> None:
    client, prefix = cache
    mine, theirs = tag_for(TENANT, "p-5"), tag_for(OTHER, "p-5")
    await client.mset(
        {
            f"{prefix}:a:{TENANT}:p-4": b"v",
            f"{prefix}:a:{TENANT}:p:9": b"v",  # an id with the separator, whole: nothing follows
            f"{prefix}:b:{mine}:p-5": b"v",  # the tenant's reference of p-5
            f"{prefix}:b:{theirs}:p-6": b"v",  # another tenant's reference (of p-5): not p-6's
            f"{prefix}:b:{mine}:p-7": b"v",  # a reference that is not p-7's
            f"{prefix}:c:{TENANT}:x@y.example:p-8": b"v",  # an identity in the key
        }
    )
    locator = RedisLocator(
        patterns=[
            f"{prefix}:a:{{tenant}}:{{subject_id}}",
            f"{prefix}:b:{{subject_ref}}:{{subject_id}}",
            f"{prefix}:c:{{tenant}}:{{identity.email}}:{{subject_id}}",
        ],
        categories=["user"],
    )
    found: list[str] = []
    after: str | None = None
    while True:  # one page, unless other keys in the stack's Redis make the scan longer
        page = await redis_subjects(clients, query(locator, after=after, limit=100))
        found += [s.subject_id for s in page.subjects]
        if (after := page.next_after) is None:
            break
    assert sorted(set(found)) == ["p-4", "p-5", "p-8", "p:9"]  # a later page may repeat one


async def test_a_redis_page_refuses_what_is_no_cursor(clients: Clients, redis_url: str) -> None:
    locator = RedisLocator(patterns=["s:{tenant}:{subject_id}"], categories=["user"])
    with pytest.raises(InvalidCursor):
        await redis_subjects(clients, query(locator, after="m-00001"))
    with pytest.raises(UnsupportedStep):
        await redis_subjects(clients, query(members(Clinic("s", "u"))))
