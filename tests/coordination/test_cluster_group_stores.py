"""ClusterGroupStores on a real partition and the real ClusterRoles (no brokers, no API server):
a long replay answers LOAD_IN_PROGRESS and runs in steps; a snapshot the previous leader never
advanced to becomes the log start once the new leader's high watermark passes it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rustmq.coordination import internal_topic
from rustmq.coordination.journal import LogJournal
from rustmq.coordination.service import CoordinatorLoadingError
from rustmq.server.group_stores import ClusterGroupStores, PartitionStores
from rustmq.server.replicated import ClusterRoles, PartitionRole
from rustmq.storage.config import LogConfig
from rustmq.storage.partition import PartitionLog

GROUP = "team-0"


@pytest.fixture
def plog(tmp_path: Path) -> Iterator[PartitionLog]:
    opened = PartitionLog.open(tmp_path / "p", LogConfig(segment_bytes=64 << 10, retention_ms=None))
    try:
        yield opened
    finally:
        opened.close()


def stores_on(plog: PartitionLog, roles: ClusterRoles, *, compact_bytes: int) -> tuple[ClusterGroupStores, PartitionRole]:
    index = internal_topic.partition_for(GROUP, 8)
    roles.topics[internal_topic.TOPIC] = SimpleNamespace(partitions=[SimpleNamespace(leader=0)] * 8)
    role = roles.roles[(internal_topic.TOPIC, index)] = PartitionRole(internal_topic.TOPIC, index, plog)
    roles.assign(role, 0, 5, (0, 1), (0, 1), 1)  # led at epoch 5; the follower 1 acknowledged nothing yet
    broker: Any = SimpleNamespace(settings=SimpleNamespace(coordination_compact_bytes=compact_bytes),
                                  _wake=lambda plog: None)
    coordinator: Any = SimpleNamespace(groups=SimpleNamespace(groups={}), queues=SimpleNamespace(settings=None))
    return ClusterGroupStores(broker, coordinator, roles), role


def write_history(plog: PartitionLog, commits: int, *, compact_bytes: int, metadata: str = "") -> dict[tuple[str, int], int]:
    """What a previous leader (epoch 4) wrote: commits, snapshots as its journal decided."""
    journal = LogJournal(plog, 4, compact_bytes=compact_bytes)
    stores = PartitionStores(journal)
    journal.live = stores.live_entries
    for i in range(commits):
        stores.offsets.commit(i, GROUP, {("orders", i % 4): i}, metadata)
    return {tp: c.offset for tp, c in stores.offsets.fetch(GROUP).items()}


async def loaded(stores: ClusterGroupStores) -> Any:
    """The group's store once its partition is replayed (a loop pass per step)."""
    for _ in range(10_000):
        try:
            return stores.store_for(GROUP)
        except CoordinatorLoadingError:
            await asyncio.sleep(0)
    raise AssertionError("never loaded")


async def test_a_long_replay_answers_load_in_progress_and_finishes_in_steps(plog: PartitionLog) -> None:
    expected = write_history(plog, 800, compact_bytes=1 << 30, metadata="m" * 4000)  # ~3 MB, no snapshot
    roles = ClusterRoles(0, lambda: True, 5.0, lambda plog: None)
    stores, _ = stores_on(plog, roles, compact_bytes=1 << 30)
    with pytest.raises(CoordinatorLoadingError):
        stores.store_for(GROUP)
    with pytest.raises(CoordinatorLoadingError):  # still loading: the same load, not a new one
        stores.store_for(GROUP)
    passes = 0
    while True:
        await asyncio.sleep(0)
        passes += 1
        try:
            store = stores.store_for(GROUP)
            break
        except CoordinatorLoadingError:
            assert passes < 1000
    assert passes >= 2  # at least three 1 MiB steps, one per loop pass
    assert {tp: c.offset for tp, c in store.fetch(GROUP).items()} == expected


async def test_a_new_leader_advances_to_a_snapshot_its_predecessor_did_not(plog: PartitionLog) -> None:
    expected = write_history(plog, 2000, compact_bytes=8 << 10)
    assert plog.start_offset == 0  # the previous leader never advanced (it died first)
    roles = ClusterRoles(0, lambda: True, 5.0, lambda plog: None)
    stores, role = stores_on(plog, roles, compact_bytes=8 << 10)
    store = await loaded(stores)
    assert {tp: c.offset for tp, c in store.fetch(GROUP).items()} == expected
    journal = store.journal
    assert isinstance(journal, LogJournal) and journal.snapshot_offset is not None
    assert plog.start_offset == 0  # the high watermark has not passed the snapshot yet
    roles.replica_fetched(role, 1, plog.end_offset)  # the follower acknowledges everything
    assert plog.start_offset == journal.snapshot_offset > 0
    # A replay from the new log start gives the same state.
    stores2, _ = stores_on(plog, ClusterRoles(0, lambda: True, 5.0, lambda plog: None), compact_bytes=8 << 10)
    again = await loaded(stores2)
    assert {tp: c.offset for tp, c in again.fetch(GROUP).items()} == expected


async def test_a_replay_abandoned_while_the_lease_was_in_doubt_starts_again(plog: PartitionLog) -> None:
    expected = write_history(plog, 800, compact_bytes=1 << 30, metadata="m" * 4000)
    lease = {"valid": True}
    roles = ClusterRoles(0, lambda: lease["valid"], 5.0, lambda plog: None)
    stores, _ = stores_on(plog, roles, compact_bytes=1 << 30)
    with pytest.raises(CoordinatorLoadingError):
        stores.store_for(GROUP)
    lease["valid"] = False  # the replay task gives up at its next step
    for _ in range(5):
        await asyncio.sleep(0)
    lease["valid"] = True
    for _ in range(1000):
        try:
            store = stores.store_for(GROUP)
            break
        except CoordinatorLoadingError:
            await asyncio.sleep(0)
    else:
        raise AssertionError("the coordinator never finished loading after its lease was valid again")
    assert {tp: c.offset for tp, c in store.fetch(GROUP).items()} == expected
