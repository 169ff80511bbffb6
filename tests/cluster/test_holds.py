"""RetentionHolds' decisions without a cluster: who may delete, and that anything uncertain holds.
(The real coordinators answering are tests/cluster/test_retention_holds.py.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from rustmq.coordination import internal_topic
from rustmq.protocol import batch
from rustmq.replication.holds import RetentionHolds
from rustmq.server.replicated import ClusterRoles, PartitionRole
from rustmq.storage.config import LogConfig
from rustmq.storage.log import Log


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    opened = Log.open(tmp_path, LogConfig(), background_flusher=False)
    try:
        yield opened
    finally:
        opened.close()


def lead(roles: ClusterRoles, log: Log, topic: str, index: int, leader: int, records: int = 0) -> PartitionRole:
    plog = log.topic(topic).partitions[index]
    for _ in range(records):
        plog.append(batch.build_batch(b"x", record_count=1, first_timestamp_ms=1, max_timestamp_ms=1), 0)
    role = roles.roles[(topic, index)] = PartitionRole(topic, index, plog)
    roles.assign(role, leader, 0, (0, 1), (0,), 1)  # ISR of the leader alone: HW = log end
    return role


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_only_the_leader_of_a_held_partition_deletes_and_uncertainty_holds(log: Log) -> None:
    log.create_topic("held", 2, {"retain_until_consumed_by": ["audit"]})
    log.create_topic("free", 1)
    log.create_topic("queued", 1, {"retain_until_settled": True})
    roles = ClusterRoles(0, lambda: True, 5.0, lambda plog: None)
    lead(roles, log, "held", 0, leader=0, records=50)
    lead(roles, log, "held", 1, leader=1)  # followed, not led
    lead(roles, log, "free", 0, leader=0)
    lead(roles, log, "queued", 0, leader=0, records=20)
    holds = RetentionHolds(roles, log, timeout_s=1.0)
    held, free = log.topic("held"), log.topic("free")
    try:
        assert holds.floor(free, 0) is None  # no hold: ordinary retention
        assert holds.floor(held, 1) == 0  # a follower never deletes by itself
        assert holds.held() == {"audit": [("held", 0)]}
        assert holds.settled() == {"queued": [0]}
        queued = log.topic("queued")

        # No internal topic yet: the coordinator is unknown.
        await holds.refresh()
        assert holds.floor(held, 0) == 0 and holds.floor(queued, 0) == 0

        # The coordinator's address refuses connections.
        roles.topics[internal_topic.TOPIC] = SimpleNamespace(partitions=[SimpleNamespace(leader=2)] * 8)
        roles.brokers = [{"id": 2, "host": "127.0.0.1", "consumer_port": free_port()}]
        await holds.refresh()
        assert holds.floor(held, 0) == 0 and holds.floor(queued, 0) == 0

        # The coordinator's partition is offline (no leader) or its broker not alive.
        roles.topics[internal_topic.TOPIC] = SimpleNamespace(partitions=[SimpleNamespace(leader=-1)] * 8)
        await holds.refresh()
        assert holds.floor(held, 0) == 0 and holds.floor(queued, 0) == 0

        # A floor learnt earlier is capped at the high watermark.
        holds.floors[("held", 0)] = 10_000
        assert holds.floor(held, 0) == 50
    finally:
        holds.close()
