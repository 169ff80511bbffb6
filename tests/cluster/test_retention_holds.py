"""Retention holds (``retain_until_consumed_by``) in cluster mode, three real brokers on the real
API server: the partition leader decides the deletion point from the named groups' committed
offsets, asked from their coordinators; followers only follow its log start
(rustmq.replication.holds, docs/cluster.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brokerproc import RawClient
from clusterproc import BrokerCluster, create_namespace
from rustmq.protocol import batch
from rustmq.protocol.api import ApiKey, ErrorCode

pytestmark = [pytest.mark.slow]

TOPIC = "held"
GROUPS = ["audit", "billing"]


@pytest.fixture
def fast_retention_brokers(tmp_path: Path, kubeconfig: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path, kubeconfig, create_namespace(kubeconfig), 3, env={"RUSTMQ_RETENTION_CHECK_S": "0.5"})
    try:
        yield cluster.start_all()
    finally:
        cluster.stop_all()


def call(cluster: BrokerCluster, broker_id: int, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
    client = RawClient(cluster.brokers[broker_id].producer_port, timeout=20)
    try:
        return client.call(header, payload)[0]
    finally:
        client.close()


def retry(cluster: BrokerCluster, broker_id: int, header: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """A group request, retried while its coordinator is not ready (the internal topic is being
    created, or the coordinator replays its partition)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = call(cluster, broker_id, header)
        if answer["error"] not in (ErrorCode.LOAD_IN_PROGRESS, ErrorCode.NOT_COORDINATOR) or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def first_base(cluster: BrokerCluster, broker_id: int, topic: str = TOPIC) -> int:
    directory = cluster.root / f"broker-{broker_id}" / "topics" / topic / "0"
    return min(int(name[:-4]) for name in os.listdir(directory) if name.endswith(".log"))


def bases(cluster: BrokerCluster) -> dict[int, int]:
    return {b: first_base(cluster, b) for b in (0, 1, 2)}


def in_sync(topic: str) -> Any:
    def check(metadata: dict[str, Any]) -> bool:
        (entry,) = metadata["topics"]
        parts = entry["partitions"]
        return entry["error"] == 0 and bool(parts) and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in parts)
    return check


def commit(cluster: BrokerCluster, group: str, offset: int) -> None:
    found = retry(cluster, 0, {"api": int(ApiKey.FIND_COORDINATOR), "group": group}, timeout=60)
    assert found["error"] == 0, found
    answer = retry(cluster, found["coordinator"], {"api": int(ApiKey.COMMIT_OFFSETS), "group": group,
                                                    "offsets": [[TOPIC, 0, offset]]})
    assert answer["error"] == 0, answer


@pytest.mark.timeout(240)
def test_holds_keep_unconsumed_data_on_every_replica_until_the_groups_commit(fast_retention_brokers: BrokerCluster) -> None:
    cluster = fast_retention_brokers
    # Without the hold, retention_messages 10 would delete all but the last few segments.
    created = call(cluster, 0, {"api": int(ApiKey.CREATE_TOPIC), "topic": TOPIC, "partitions": 1,
                                "config": {"segment_bytes": 4096, "retention_messages": 10,
                                           "retain_until_consumed_by": GROUPS}})
    assert created["error"] == 0, created
    cluster.wait_for(in_sync(TOPIC), "the held topic in sync", topics=[TOPIC])
    leader = cluster.partition(TOPIC, 0)["leader"]
    record = batch.build_batch(bytes(1000), record_count=1, first_timestamp_ms=1, max_timestamp_ms=1)
    for _ in range(120):  # ~1 KiB each: about 30 segments of 4 KiB
        answer = call(cluster, leader, {"api": int(ApiKey.PRODUCE), "topic": TOPIC, "partition": 0, "acks": 3}, record)
        assert answer["error"] == 0, answer

    # Nobody committed: many retention passes later, every replica still starts at 0.
    time.sleep(4)
    assert bases(cluster) == {0: 0, 1: 0, 2: 0}

    # One group committed, the other never did: still held.
    commit(cluster, "audit", 100)
    time.sleep(3)
    assert bases(cluster) == {0: 0, 1: 0, 2: 0}

    # Both committed: the leader deletes below the smaller offset (60), the followers follow;
    # nothing at or above 60 goes anywhere.
    commit(cluster, "billing", 60)
    deadline = time.monotonic() + 30
    while True:
        seen = bases(cluster)
        if all(0 < base <= 60 for base in seen.values()):
            break
        assert time.monotonic() < deadline, f"the hold was not released on every replica: {seen}\n{cluster.logs()}"
        time.sleep(0.3)
    time.sleep(2)  # more passes: still nothing above the floor
    assert all(0 < base <= 60 for base in bases(cluster).values()), bases(cluster)
    listed = call(cluster, leader, {"api": int(ApiKey.LIST_OFFSETS), "topic": TOPIC, "partition": 0, "at": -2})
    assert listed["error"] == 0 and 0 < listed["start_offset"] <= 60, listed


@pytest.mark.timeout(240)
def test_retain_until_settled_keeps_what_a_queue_subscription_has_not_acked(fast_retention_brokers: BrokerCluster) -> None:
    cluster = fast_retention_brokers
    topic = "jobs"
    created = call(cluster, 0, {"api": int(ApiKey.CREATE_TOPIC), "topic": topic, "partitions": 1,
                                "config": {"segment_bytes": 4096, "retention_messages": 10, "retain_until_settled": True}})
    assert created["error"] == 0, created
    cluster.wait_for(in_sync(topic), "the topic in sync", topics=[topic])
    leader = cluster.partition(topic, 0)["leader"]
    found = retry(cluster, 0, {"api": int(ApiKey.FIND_COORDINATOR), "key_type": "queue", "topic": topic}, timeout=60)
    assert found["error"] == 0, found
    queues = found["coordinator"]
    fetch = {"api": int(ApiKey.QUEUE_FETCH), "subscription": "workers", "topic": topic, "partition": 0,
             "max_wait_ms": 0, "max_messages": 60}
    assert retry(cluster, queues, dict(fetch))["error"] == 0  # the subscription exists from here on, at 0

    record = batch.build_batch(bytes(1000), record_count=1, first_timestamp_ms=1, max_timestamp_ms=1)
    for _ in range(120):
        answer = call(cluster, leader, {"api": int(ApiKey.PRODUCE), "topic": topic, "partition": 0, "acks": 3}, record)
        assert answer["error"] == 0, answer
    time.sleep(4)  # many retention passes: nothing is settled yet
    assert {b: first_base(cluster, b, topic) for b in (0, 1, 2)} == {0: 0, 1: 0, 2: 0}

    leased: list[int] = []
    deadline = time.monotonic() + 30
    while len(leased) < 60:
        assert time.monotonic() < deadline, leased
        delivered = retry(cluster, queues, dict(fetch, max_messages=60 - len(leased)))
        assert delivered["error"] == 0, delivered
        leased += [o for d in delivered["deliveries"] for start, end in d["ranges"] for o in range(start, end)]
    assert sorted(leased) == list(range(60))
    acked = retry(cluster, queues, {"api": int(ApiKey.QUEUE_ACK), "subscription": "workers", "topic": topic,
                                    "partition": 0, "ranges": [[0, 60]]})
    assert acked["error"] == 0 and acked["acked"] == 60, acked
    deadline = time.monotonic() + 30
    while True:
        seen = {b: first_base(cluster, b, topic) for b in (0, 1, 2)}
        if all(0 < base <= 60 for base in seen.values()):
            break
        assert time.monotonic() < deadline, f"the settled hold was not released on every replica: {seen}\n{cluster.logs()}"
        time.sleep(0.3)
