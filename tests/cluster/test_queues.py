"""Queue subscriptions in cluster mode: a queue never delivers a record above the high watermark
(one that a failover could still truncate away). Three real brokers, the real API server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from brokerproc import RawClient
from clusterproc import BrokerCluster
from rustmq.client import Admin
from rustmq.protocol import batch, records
from rustmq.protocol.api import ApiKey

pytestmark = [pytest.mark.slow]


def one_batch(value: bytes) -> bytes:
    return batch.build_batch(records.encode_body([[0, None, value, None]]), record_count=1,
                             first_timestamp_ms=1, max_timestamp_ms=1)


def in_sync(metadata: dict[str, Any]) -> bool:
    parts = metadata["topics"][0]["partitions"]
    return bool(parts) and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in parts)


@pytest.mark.timeout(150)
async def test_a_queue_delivers_only_below_the_high_watermark(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("jobs", 1)
    leader = cluster.wait_for(in_sync, "jobs in sync", topics=["jobs"])["topics"][0]["partitions"][0]["leader"]
    followers = [b for b in (0, 1, 2) if b != leader]
    client = RawClient(cluster.brokers[leader].consumer_port, timeout=10)
    fetch = {"api": int(ApiKey.QUEUE_FETCH), "subscription": "workers", "topic": "jobs", "partition": 0,
             "max_wait_ms": 0}
    try:
        for attempt in range(3):  # the window closes when the stopped followers leave the ISR (~3-4 s)
            for b in followers:
                cluster.pause(b)
            try:
                written, _ = client.call({"api": int(ApiKey.PRODUCE), "topic": "jobs", "partition": 0, "acks": 1},
                                         one_batch(b"not yet %d" % attempt))
                assert written["error"] == 0, written
                delivered, _ = client.call(dict(fetch))
                state, _ = client.call({"api": int(ApiKey.FETCH), "max_wait_ms": 0, "partitions": [
                    {"topic": "jobs", "partition": 0, "offset": 0}]})
            finally:
                for b in followers:
                    cluster.resume(b)
            if state["partitions"][0]["high_watermark"] <= written["base_offset"]:
                break  # the window held: the check below means something
            await asyncio.sleep(5)
        else:
            pytest.fail("the followers left the ISR before the queue fetch three times (machine too slow)")
        assert delivered["error"] == 0 and delivered["deliveries"] == [], delivered

        # Once the followers have it, the queue delivers it.
        deadline = time.monotonic() + 30
        while True:
            delivered, _ = client.call({**fetch, "max_wait_ms": 1000})
            if delivered["deliveries"]:
                break
            assert time.monotonic() < deadline, "the record was never delivered"
        ranges = delivered["deliveries"][0]["ranges"]
        assert [written["base_offset"], written["base_offset"] + 1] in ranges or any(
            start <= written["base_offset"] < end for start, end in ranges)
    finally:
        client.close()
