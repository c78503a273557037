"""Runtime helpers every stage uses: the per-replica model lock and iterating a sync generator
from a coroutine (how a talk turn streams and stops)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from deployments.common.runtime import ModelLock, in_threads


def test_model_lock_serialises_threads_and_reports_waits():
    waits, inside, most = [], [0], [0]
    lock = ModelLock(waits.append)

    def work():
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(waits) == 4 and max(waits) >= 0.04


def test_a_coroutine_waiting_for_the_lock_can_be_cancelled():
    lock = ModelLock()

    async def scenario():
        entered = []

        async def waiter():
            async with lock:
                entered.append(True)

        with lock:  # held by "another request"
            task = asyncio.ensure_future(waiter())
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        async with lock:  # free again, and the cancelled waiter never ran
            pass
        return entered

    assert asyncio.run(scenario()) == []


def test_in_threads_stops_the_source_after_the_piece_in_progress():
    made, closed = [], []

    def pieces():
        try:
            for i in range(100):
                time.sleep(0.01)
                made.append(i)
                yield i
        finally:
            closed.append(True)

    async def consume():
        got = []
        async for piece in in_threads(pieces()):
            got.append(piece)
            if len(got) == 3:
                break
        return got

    assert asyncio.run(consume()) == [0, 1, 2]
    assert closed == [True] and len(made) == 3


def test_in_threads_cancelled_mid_piece_closes_after_it():
    made, closed = [], []

    def pieces():
        try:
            for i in range(100):
                time.sleep(0.05)
                made.append(i)
                yield i
        finally:
            closed.append(True)

    async def scenario():
        async def consume():
            async for _ in in_threads(pieces()):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert closed == [True] and len(made) <= 4
