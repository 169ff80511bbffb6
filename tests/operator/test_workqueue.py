"""The reconcile work queue: de-duplication, delays, one worker per key."""

from __future__ import annotations

import asyncio

from rustmq_operator import workqueue


async def test_repeated_adds_collapse_into_one_item() -> None:
    queue: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    for _ in range(5):
        queue.add("a")
    assert len(queue) == 1
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    assert len(queue) == 0


async def test_a_delayed_key_waits_and_an_earlier_request_wins() -> None:
    queue: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    queue.add("late", delay=30)
    queue.add("soon", delay=0.05)
    assert await asyncio.wait_for(queue.get(), 1) == "soon"
    queue.add("late", delay=0)
    assert await asyncio.wait_for(queue.get(), 1) == "late"


async def test_a_key_in_progress_is_not_handed_out_twice() -> None:
    queue: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    queue.add("a")
    assert await queue.get() == "a"
    queue.add("a")
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0.05)
    assert not second.done()
    queue.done("a")
    assert await asyncio.wait_for(second, 1) == "a"


async def test_forget_drops_a_pending_key() -> None:
    queue: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    queue.add("gone", delay=0.01)
    queue.forget("gone")
    queue.add("kept", delay=0.02)
    assert await asyncio.wait_for(queue.get(), 1) == "kept"
