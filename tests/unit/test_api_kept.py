"""Answers kept for a moment: one call for concurrent readers, fresh after the moment, never a
failure kept, dropped on demand."""

from __future__ import annotations

import asyncio

import pytest

from lethe.api.kept import Kept


async def test_readers_at_once_share_one_call_and_a_later_one_calls_again() -> None:
    calls = 0

    async def status() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return calls

    kept: Kept[int] = Kept(0.2)
    answers = await asyncio.gather(*(kept.get("req-1", status) for _ in range(50)))
    assert answers == [1] * 50 and calls == 1
    assert await kept.get("req-2", status) == 2  # another key, its own call
    assert await kept.get("req-1", status) == 1  # still fresh
    await asyncio.sleep(0.25)
    assert await kept.get("req-1", status) == 3  # stale: asked again
    kept.forget("req-1")
    assert await kept.get("req-1", status) == 4
    kept.forget()
    assert await kept.get("req-2", status) == 5


async def test_a_failure_is_not_kept_and_a_cancelled_reader_does_not_cancel_the_call() -> None:
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.05)
        if attempts == 1:
            raise RuntimeError("down")
        return "up"

    kept: Kept[str] = Kept(60)
    with pytest.raises(RuntimeError):
        await kept.get("k", flaky)
    assert await kept.get("k", flaky) == "up"
    kept.forget()
    impatient = asyncio.create_task(kept.get("k", flaky))
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert await kept.get("k", flaky) == "up"  # the shared call went on
    assert attempts == 3


async def test_a_refreshed_answer_is_given_at_once_while_the_next_is_fetched() -> None:
    calls = 0
    slow = asyncio.Event()

    async def status() -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            await slow.wait()
        return calls

    kept: Kept[int] = Kept(0.05, refreshed_until=0.3)
    assert await kept.get("r", status) == 1
    await asyncio.sleep(0.1)  # stale, but young enough to be refreshed behind the readers
    assert await asyncio.gather(*(kept.get("r", status) for _ in range(20))) == [1] * 20
    assert calls == 2  # one refresh, however many readers
    slow.set()
    await asyncio.sleep(0.01)
    assert await kept.get("r", status) == 2  # the refresh landed
    await asyncio.sleep(0.35)  # past refreshed_until: readers wait for a fresh answer
    assert await kept.get("r", status) == 3
    kept.forget("r")  # a refresh that lands after a forget is not kept
    await asyncio.sleep(0.1)
    assert await kept.get("r", status) == 4
