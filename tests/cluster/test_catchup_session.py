"""A replica being filled by a reassignment, throttled to a crawl, must not slow the partitions
its broker already follows in sync: with real brokers on the real API server, a new broker
joins the ISR of a small topic while its copy of a large one still crawls in at 256 KiB/s, and
acks=all writes to the small topic (which now wait for that broker) stay fast
(rustmq.replication.node: one fetch session per leader for in-sync partitions, another for
catch-up, the throttle only on the second)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterproc import BrokerCluster, create_namespace, write_membership
from rustmq.client import Admin, Producer

pytestmark = [pytest.mark.slow]

THROTTLE = 256 << 10  # bytes per second of catch-up: the 16 MiB backlog needs a minute
BACKLOG_MIB = 16


@pytest.fixture
def crawling_cluster(tmp_path: Path, kubeconfig: Path) -> Iterator[BrokerCluster]:
    cluster = BrokerCluster(tmp_path, kubeconfig, create_namespace(kubeconfig), 3,
                            env={"RUSTMQ_REASSIGN_BYTES_PER_S": str(THROTTLE)})
    try:
        yield cluster.start_all()
    finally:
        cluster.stop_all()


def partition(cluster: BrokerCluster, topic: str) -> dict[str, Any]:
    return dict(cluster.metadata([topic])["topics"][0]["partitions"][0])


@pytest.mark.timeout(240)
async def test_in_sync_partitions_keep_replicating_while_a_catch_up_crawls(crawling_cluster: BrokerCluster) -> None:
    cluster = crawling_cluster
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topic("hot", 1)
        await admin.create_topic("cold", 1)
    for topic in ("hot", "cold"):
        await asyncio.to_thread(cluster.wait_for, lambda m: len(m["topics"][0]["partitions"][0]["isr"]) == 3,
                                "full ISR", 30, [topic])
    async with Producer(cluster.bootstrap, acks="all", linger_ms=0) as producer:
        values = [b"c" * 1024] * 1024
        for _ in range(BACKLOG_MIB):  # one 1 MiB batch at a time
            await producer.send_batch("cold", values, partition=0)
            await producer.flush()
        await producer.send_batch("hot", [b"h" * 100] * 10, partition=0)
        await producer.flush()
    cluster.size = 4
    await asyncio.to_thread(cluster.start, 3)
    await asyncio.to_thread(cluster.wait_until_sees_all, 3)
    write_membership(cluster, [0, 1, 3], generation=1)

    # Broker 3 gets a replica of both; the small one is in sync long before the large one.
    deadline = time.monotonic() + 90
    while True:
        hot, cold = partition(cluster, "hot"), partition(cluster, "cold")
        if 3 in hot["isr"]:
            break
        assert time.monotonic() < deadline, f"broker 3 never joined the ISR of hot: {hot}\n{cluster.logs()}"
        await asyncio.sleep(0.25)
    assert 3 in cold["replicas"] and 3 not in cold["isr"], cold

    # acks=all to hot now waits for broker 3, whose catch-up of cold is throttled to a crawl.
    latencies = []
    async with Producer(cluster.bootstrap, acks="all", linger_ms=0, request_timeout_s=10) as producer:
        started = time.monotonic()
        while time.monotonic() - started < 6:
            sent = time.monotonic()
            await producer.send_batch("hot", [b"h" * 1000] * 50, partition=0)
            await producer.flush()
            latencies.append(time.monotonic() - sent)
    hot, cold = partition(cluster, "hot"), partition(cluster, "cold")
    assert 3 in hot["isr"], hot  # every one of those acknowledgements included broker 3
    assert 3 not in cold["isr"], f"the catch-up was not throttled, the test measured nothing: {cold}"
    median = statistics.median(latencies)
    # Behind the throttle's sleeps (up to 1 s each) most acks would take 0.5 s and more; the
    # margin is for a loaded machine (acks=all p50 of 50-100 ms there without any catch-up).
    assert median < 0.5 and len(latencies) >= 10, (median, max(latencies), len(latencies))
