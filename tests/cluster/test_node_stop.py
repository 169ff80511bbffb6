"""ClusterNode.stop must end even when a task lost a cancellation (asyncio.wait_for on 3.11)."""

from __future__ import annotations

import asyncio

import pytest

from rustmq.replication import node


@pytest.mark.timeout(30)
async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # lost, as asyncio.wait_for can lose one on Python 3.11
        await asyncio.sleep(3600)

    task = asyncio.create_task(stubborn(), name="stubborn")
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0)
    await asyncio.wait_for(node._cancel_all([task, finished]), 10)
    assert swallowed.is_set() and task.cancelled()
