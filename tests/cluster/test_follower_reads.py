"""Fetch from the closest replica (Kafka's KIP-392 in spirit) with three real brokers in three
racks: a consumer with `client_rack` reads from the in-sync follower in its rack, never past
that follower's high watermark, and nothing is lost, duplicated or read that was not committed
when the leader is killed under acks=all load (the history checker of tests/support/checker.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import clusterproc
from clusterproc import read_placement
from rustmq.client import Admin, Consumer, Producer
from rustmq.protocol.api import ErrorCode
from workload import AcksAllLoad

pytestmark = [pytest.mark.slow]

RACKS = {0: "zone-a", 1: "zone-b", 2: "zone-c"}


def fetches_served(cluster: clusterproc.BrokerCluster, broker_id: int) -> float:
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{cluster.brokers[broker_id].metrics_port}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith('rustmq_requests_total{api="FETCH"}'):
                return float(line.rpartition(" ")[2])
    return 0.0


@pytest.mark.timeout(240)
async def test_a_consumer_reads_from_the_follower_in_its_rack_and_only_what_is_committed(
        tmp_path: Any, kubeconfig: Any) -> None:
    cluster = clusterproc.BrokerCluster(tmp_path, kubeconfig, clusterproc.create_namespace(kubeconfig), 3, racks=RACKS)
    try:
        await asyncio.to_thread(cluster.start_all)
        async with Admin(cluster.bootstrap) as admin:
            await admin.create_topic("near", 1)
        await asyncio.to_thread(cluster.wait_for, lambda m: len(m["topics"][0]["partitions"][0]["isr"]) == 3,
                                "ISR", 30, ["near"])
        (part,) = read_placement(cluster, "near")
        follower = next(b for b in part["replicas"] if b != part["leader"])
        async with Producer(cluster.bootstrap, acks="all") as producer:
            for i in range(200):
                await producer.send("near", b"m%d" % i)
        # Only consumers send FETCH to a follower (it fetches from its leader, nobody from it).
        before = await asyncio.to_thread(fetches_served, cluster, follower)
        got: list[bytes] = []
        async with Consumer(cluster.bootstrap, "near", client_rack=RACKS[follower], max_wait_ms=200) as consumer:
            while len(got) < 200:
                batch = await consumer.getmany(500, timeout_s=10)
                assert batch, f"read {len(got)} of 200"
                got += [m.value for m in batch]
        assert got == [b"m%d" % i for i in range(200)]
        assert await asyncio.to_thread(fetches_served, cluster, follower) > before
        # Without follower_read the follower still refuses consumers (old clients route by leader).
        from brokerproc import RawClient

        client = RawClient(cluster.brokers[follower].consumer_port, timeout=10)
        try:
            answer, _ = client.call({"api": 1, "max_wait_ms": 0,
                                     "partitions": [{"topic": "near", "partition": 0, "offset": 0}]})
        finally:
            client.close()
        assert answer["partitions"][0]["error"] == ErrorCode.NOT_LEADER, answer

        # kill -9 of the leader while acks=all writers write and the rack-local consumer reads:
        # every read is an acknowledged (or unknown-outcome) write at its offset, none lost.
        async def kill_the_leader() -> None:
            await asyncio.to_thread(cluster.brokers[part["leader"]].kill)
            await asyncio.sleep(6)
            await asyncio.to_thread(cluster.start, part["leader"])

        load = AcksAllLoad(cluster.bootstrap, "near", writers=2, client_rack=RACKS[follower])
        report = await load.run(kill_the_leader, settle_s=4)
        assert report["acknowledged"] > 50, report
        assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
        assert report["duplicated"] == 0 and report["reordered"] == 0, report
    finally:
        cluster.stop_all()
