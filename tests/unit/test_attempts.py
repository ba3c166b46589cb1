"""`lethe.activities.attempts.Journal`: what a retry learns from earlier attempts' heartbeats."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from temporalio.testing import ActivityEnvironment

from lethe.activities.attempts import Journal
from lethe.classification.datamap import KeysLocator
from lethe.contracts import Evidence
from tests.steps import decision, step, step_request

NOW = datetime(2026, 11, 1, tzinfo=UTC)
REQUEST = step_request(
    step(
        KeysLocator(categories=["user.contact"]),
        action="shred",
        decisions=[decision("delete", rule="r")],
    ),
    subject_ref="0" * 32,
    started=NOW,
)


async def _attempt(
    attempt: int, details: list[Any], *, found: int = 2, made: int | None = 2
) -> tuple[Journal, list[Any]]:
    """Run one attempt that plans `found`, then (unless `made` is None) removes `made`."""
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt, heartbeat_details=details)
    env.on_heartbeat = lambda *sent: beats.extend(sent)

    async def run() -> Journal:
        journal = Journal.resume(REQUEST)
        await journal.plan(versions=found)
        if made is not None:
            journal.erased(versions_destroyed=made)
        return journal

    return await env.run(run), beats


async def test_a_first_attempt_counts_and_says_nothing_of_earlier_ones() -> None:
    journal, beats = await _attempt(1, [])
    assert (journal.earlier, journal.total("versions_destroyed"), journal.affected()) == (
        None,
        2,
        2,
    )
    assert journal.evidence() == {}
    assert [b["lethe_effect"]["stage"] for b in beats] == ["planned", "erased"]


async def test_a_retry_after_a_recorded_attempt_counts_both() -> None:
    _, beats = await _attempt(1, [])
    journal, _ = await _attempt(2, beats[-1:], found=1, made=1)
    assert journal.earlier == "recorded"
    assert journal.total("versions_destroyed") == 3
    assert journal.evidence() == {
        "first_attempt_evidence": "recorded",
        "earlier_attempts": 1,
        "retry_versions_destroyed": 1,
    }


async def test_a_plan_without_its_result_is_reported_and_carried_to_later_attempts() -> None:
    _, beats = await _attempt(1, [], made=None)  # lost during the effect
    second, second_beats = await _attempt(2, beats[-1:], found=0, made=None)
    expected: Evidence = {
        "first_attempt_evidence": "planned",
        "earlier_attempts": 1,
        "earlier_found_versions": 2,
    }
    assert second.evidence() == expected
    assert second.total("versions_destroyed") is None  # not known, not made up
    # The second attempt is lost too: the third still knows what the first had found.
    third, _ = await _attempt(3, second_beats[-1:], found=0, made=0)
    assert third.evidence() == {
        **expected,
        "earlier_attempts": 2,
        "retry_versions_destroyed": 0,
    }
    assert third.affected() == 2


async def test_attempts_that_left_nothing_are_lost_and_a_foreign_record_is_ignored() -> None:
    _, beats = await _attempt(1, [])
    other = [{**beats[-1], "lethe_effect": {**beats[-1]["lethe_effect"], "step": "other/0"}}]
    journal, _ = await _attempt(3, other, found=0, made=0)
    assert journal.earlier == "lost"
    assert journal.evidence()["earlier_attempts"] == 2
    assert journal.total("versions_destroyed") is None
    assert journal.affected() == 0
    # Attempt 3 with attempt 1's record: attempt 2 left nothing.
    journal, _ = await _attempt(3, beats[-1:], found=0, made=0)
    assert (journal.earlier, journal.lost) == ("lost", 1)


async def test_an_attempt_that_failed_before_its_effect_says_so() -> None:
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *sent: beats.extend(sent)

    async def failing() -> None:
        Journal.resume(REQUEST).failed()

    await env.run(failing)
    journal, _ = await _attempt(2, beats)
    assert journal.earlier == "recorded"
    assert journal.total("versions_destroyed") == 2


def test_outside_an_activity_nothing_is_sent_and_verify_finds_the_erase_journal() -> None:
    journal = Journal.resume(REQUEST)
    journal.erased(versions_destroyed=1)
    assert Journal.current(REQUEST) is journal
    other = REQUEST.model_copy(update={"request_id": "req-2"})
    assert Journal.current(other) is None
