"""Runtime helpers every stage uses: the per-replica model lock and iterating a sync generator
from a coroutine (how a talk turn streams and stops)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from deployments.common.runtime import ModelLock, in_threads


def test_model_lock_serialises_threads_and_reports_waits():
    waits, inside, most, ran_on = [], [0], [0], set()
    lock = ModelLock(waits.append)

    def work():
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        ran_on.add(threading.get_ident())
        time.sleep(0.02)
        inside[0] -= 1

    threads = [threading.Thread(target=lock.run, args=(work,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(waits) == 4 and max(waits) >= 0.04
    assert ran_on == {lock.thread_id} and lock.thread_id not in {t.ident for t in threads}


def test_model_lock_runs_coroutines_work_on_its_thread_and_returns_results_and_errors():
    lock = ModelLock()

    async def scenario():
        ident = await lock.arun(threading.get_ident)
        with pytest.raises(ZeroDivisionError):
            await lock.arun(lambda: 1 / 0)
        return ident, await lock.arun(lambda a, b=0: a + b, 2, b=3)

    assert asyncio.run(scenario()) == (lock.thread_id, 5)
    assert not lock.locked()  # an error releases it


def test_model_lock_work_that_calls_more_model_work_runs_it_at_once():
    lock = ModelLock()
    assert lock.run(lambda: lock.run(lambda: threading.get_ident())) == lock.thread_id  # no deadlock


def test_model_lock_carries_the_callers_grad_mode():
    lock = ModelLock()
    with torch.no_grad():
        assert lock.run(torch.is_grad_enabled) is False
    assert lock.run(torch.is_grad_enabled) is True


def test_a_coroutine_waiting_for_the_lock_can_be_cancelled():
    lock = ModelLock()
    release = threading.Event()

    async def scenario():
        entered = []
        holder = asyncio.ensure_future(asyncio.to_thread(lock.run, release.wait))  # "another request"
        while not lock.locked():
            await asyncio.sleep(0.005)
        task = asyncio.ensure_future(lock.arun(entered.append, True))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await holder
        await lock.arun(lambda: None)  # free again, and the cancelled waiter never ran
        return entered

    assert asyncio.run(scenario()) == []


def test_a_cancelled_caller_keeps_the_lock_until_its_work_is_done():
    """Work that started is not interrupted, and nothing else enters the model before it ends."""
    lock = ModelLock()
    order = []

    def slow():
        time.sleep(0.1)
        order.append("slow done")

    async def scenario():
        task = asyncio.ensure_future(lock.arun(slow))
        await asyncio.sleep(0.03)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # returns only once the work is done
        order.append("caller cancelled")
        await lock.arun(order.append, "next")

    asyncio.run(scenario())
    assert order == ["slow done", "caller cancelled", "next"]


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
