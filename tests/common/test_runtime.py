"""Runtime helpers every stage uses: the per-replica model lock and iterating a sync generator
from a coroutine (how a talk turn streams and stops)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from deployments.common.runtime import ModelLock, in_threads

HOLD_S = 0.05  # how long the first call keeps the lock once the other three are queued behind it


def test_model_lock_serialises_threads_and_reports_waits():
    """Four threads ask at once: one call runs at a time, on the lock's thread, and each call that
    queued behind the first reports a wait of at least the time the test kept it queued (a floor
    the test sets, not a speed: a slow machine only makes the waits longer)."""
    waits, inside, most, ran_on = [], [0], [0], set()
    lock = ModelLock(waits.append)
    entered, release = threading.Event(), threading.Event()

    def work(hold: bool = False):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        ran_on.add(threading.get_ident())
        if hold:
            entered.set()
            release.wait()
        inside[0] -= 1

    threads = [threading.Thread(target=lock.run, args=(work, True))]
    threads[0].start()
    entered.wait()
    threads += [threading.Thread(target=lock.run, args=(work,)) for _ in range(3)]
    for t in threads[1:]:
        t.start()
    while lock._busy < 4:  # the three have queued (each took its queueing time before counting)
        time.sleep(0.001)
    time.sleep(HOLD_S)
    release.set()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(waits) == 4 and min(waits[1:]) >= HOLD_S, waits
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
    started, finish = threading.Event(), threading.Event()

    def slow():
        started.set()
        finish.wait()
        order.append("slow done")

    async def scenario():
        task = asyncio.ensure_future(lock.arun(slow))
        await asyncio.to_thread(started.wait)  # the work is running
        task.cancel()
        await asyncio.sleep(0.01)
        assert not task.done()  # the cancelled caller waits for its work
        finish.set()
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
        two = asyncio.Event()

        async def consume():
            got = 0
            async for _ in in_threads(pieces()):
                got += 1
                if got == 2:
                    two.set()  # the third piece is being made when the cancel comes

        task = asyncio.ensure_future(consume())
        await two.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert closed == [True] and len(made) <= 4
