"""ADD_PARTITIONS and ALTER_TOPIC_CONFIG in cluster mode, with three real brokers and the real API
server: asked on one broker, stored once (CAS on the topic's shard), applied by every broker to
its own log; and what cluster mode refuses (compaction: docs/cluster.md)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brokerproc import RawClient
from clusterproc import BrokerCluster, create_namespace
from rustmq.client import Consumer, Producer
from rustmq.coordination import internal_topic
from rustmq.protocol.api import ErrorCode

pytestmark = [pytest.mark.slow]


@pytest.fixture
def fast_retention_brokers(tmp_path: Path, kubeconfig: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path, kubeconfig, create_namespace(kubeconfig), 3, env={"RUSTMQ_RETENTION_CHECK_S": "0.5"})
    try:
        yield cluster.start_all()
    finally:
        cluster.stop_all()


def call(cluster: BrokerCluster, broker_id: int, header: dict[str, Any]) -> dict[str, Any]:
    client = RawClient(cluster.brokers[broker_id].producer_port, timeout=20)
    try:
        response, _ = client.call(header)
        return response
    finally:
        client.close()


def describe_on(cluster: BrokerCluster, broker_id: int, topic: str) -> dict[str, Any] | None:
    """DESCRIBE_TOPIC of one broker's own copy; None while that broker answers with an error
    (under load a broker may not have applied the cluster's change yet)."""
    response = call(cluster, broker_id, {"api": 6, "topic": topic})
    return response if response.get("error", 0) == 0 else None


def topic_meta(metadata: dict[str, Any]) -> dict[str, Any]:
    topic: dict[str, Any] = metadata["topics"][0]
    return topic


@pytest.mark.timeout(180)
async def test_partitions_and_config_change_on_every_broker(fast_retention_brokers: BrokerCluster) -> None:
    cluster = fast_retention_brokers
    assert call(cluster, 0, {"api": 4, "topic": "grow", "partitions": 2})["error"] == 0
    cluster.wait_for(lambda m: all(len(p["isr"]) == 3 for p in topic_meta(m)["partitions"]), "ISR", topics=["grow"])

    grown = call(cluster, 1, {"api": 9, "topic": "grow", "partitions": 5})
    assert grown == {"corr": grown["corr"], "error": 0, "topic": "grow", "partitions": 5}
    metadata = cluster.wait_for(lambda m: len(topic_meta(m)["partitions"]) == 5
                                and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in topic_meta(m)["partitions"]),
                                "five partitions in sync", topics=["grow"])
    added = topic_meta(metadata)["partitions"][2:]
    assert all(sorted(p["replicas"]) == [0, 1, 2] and p["leader_epoch"] == 0 for p in added)
    # Placement balances preferred leaders over every topic of the cluster (the default and the
    # internal topics included), not within one topic.
    everything = cluster.metadata(None)["topics"]
    preferred = Counter(p["replicas"][0] for t in everything for p in t["partitions"])
    assert max(preferred.values()) - min(preferred.values()) <= 1, preferred
    # Every broker grew its own log; a partition-aware producer spreads keys over all five.
    deadline = time.monotonic() + 20
    while any((found := describe_on(cluster, b, "grow")) is None or len(found["partitions"]) != 5 for b in (0, 1, 2)):
        assert time.monotonic() < deadline, "a broker did not grow its log"
        await asyncio.sleep(0.2)
    async with Producer(cluster.bootstrap, acks="all") as producer:
        sent = [await producer.send_and_wait("grow", b"g%d" % i, key=b"key-%d" % i) for i in range(200)]
    assert {m.partition for m in sent} == {0, 1, 2, 3, 4}
    async with Consumer(cluster.bootstrap, "grow", start="earliest", max_wait_ms=100) as consumer:
        seen: set[bytes] = set()
        stream = consumer.batches()
        while len(seen) < 200:
            seen |= {m.value for m in await asyncio.wait_for(stream.__anext__(), 20)}

    # Small segments and a count limit, asked on broker 2: every replica applies it to its own
    # copy, so every broker deletes old segments of the partition by itself.
    altered = call(cluster, 2, {"api": 10, "topic": "grow", "set": {"segment_bytes": 4096, "retention_messages": 50}})
    assert altered["error"] == 0, altered
    assert altered["overrides"] == {"segment_bytes": 4096, "retention_messages": 50}
    assert altered["config"]["retention_messages"] == 50
    deadline = time.monotonic() + 20
    while any((found := describe_on(cluster, b, "grow")) is None or found["config"]["retention_messages"] != 50
              for b in (0, 1, 2)):
        assert time.monotonic() < deadline, "a broker did not apply the new config"
        await asyncio.sleep(0.2)
    async with Producer(cluster.bootstrap, acks="all") as producer:
        # The active segment was sized under the old config (1 MiB): fill it, then 4 KiB ones follow.
        for _ in range(1500):
            await producer.send("grow", b"r" * 1000, key=b"same")
        await producer.flush()
        partition = (await producer.send_and_wait("grow", b"last", key=b"same")).partition
    starts: dict[int, int] = {}
    while time.monotonic() < deadline + 30:
        described = {b: describe_on(cluster, b, "grow") for b in (0, 1, 2)}
        starts = {b: found["partitions"][partition]["start_offset"] if found is not None else -1
                  for b, found in described.items()}
        if all(start > 0 for start in starts.values()):
            break
        await asyncio.sleep(0.3)
    assert all(start > 0 for start in starts.values()), starts
    # A reset goes back to the broker default, again everywhere.
    reset = call(cluster, 0, {"api": 10, "topic": "grow", "reset": ["retention_messages"]})
    assert reset["error"] == 0 and reset["overrides"] == {"segment_bytes": 4096}, reset


def test_topic_changes_refuse_clearly(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    assert call(cluster, 0, {"api": 4, "topic": "t", "partitions": 3})["error"] == 0
    shrink = call(cluster, 1, {"api": 9, "topic": "t", "partitions": 2})
    assert shrink["error"] == ErrorCode.INVALID_CONFIG and "can only grow" in shrink["message"]
    assert call(cluster, 1, {"api": 9, "topic": "nope", "partitions": 4})["error"] == ErrorCode.UNKNOWN_TOPIC
    bad = call(cluster, 2, {"api": 10, "topic": "t", "set": {"retention_ms": -5}})
    assert bad["error"] == ErrorCode.INVALID_CONFIG
    compact = call(cluster, 2, {"api": 10, "topic": "t", "set": {"cleanup_policy": "compact"}})
    assert compact["error"] == ErrorCode.INVALID_CONFIG and "not available in cluster mode" in compact["message"]
    created = call(cluster, 0, {"api": 4, "topic": "c", "partitions": 1, "config": {"cleanup_policy": "compact,delete"}})
    assert created["error"] == ErrorCode.INVALID_CONFIG
    internal = call(cluster, 1, {"api": 9, "topic": internal_topic.TOPIC, "partitions": 99})
    assert internal["error"] == ErrorCode.INVALID_REQUEST and "internal" in internal["message"]
    # Nothing of the refused changes was stored.
    metadata = cluster.wait_for(lambda m: True, "metadata", topics=["t", "c"])
    assert len(metadata["topics"][0]["partitions"]) == 3
    assert [t["error"] for t in metadata["topics"][1:]] == [ErrorCode.UNKNOWN_TOPIC]
