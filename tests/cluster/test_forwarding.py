"""Clients that cannot route: the seed's simple produce connected to one broker that does not lead
the partition. Three real brokers and the real API server; the broker forwards each pass's batch
to the leader (rustmq.replication.forward) and answers with the leader's offset once the in-sync
replicas have it, also across a failover of that leader (checked by tests/support/checker.py)."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import Counter
from typing import Any

import msgpack
import pytest

from brokerproc import RawClient
from checker import History
from clusterproc import BrokerCluster
from rustmq.client import Admin, Consumer
from rustmq.protocol import simple
from rustmq.protocol.api import ErrorCode, RequestError, partition_for_key

pytestmark = [pytest.mark.slow]


def full_isr(metadata: dict[str, Any]) -> bool:
    parts = metadata["topics"][0]["partitions"]
    rf = metadata["topics"][0].get("replication_factor", 3)
    return bool(parts) and all(len(p["isr"]) == rf and p["leader"] >= 0 for p in parts)


def message(value: bytes, *, key: bytes | None = None, topic: str | None = None, partition: int | None = None) -> bytes:
    fields: dict[str, Any] = {"key": key, "value": value}
    if topic is not None:
        fields["topic"] = topic
    if partition is not None:
        fields["partition"] = partition
    packed = msgpack.packb(fields, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


def describe_local(cluster: BrokerCluster, broker_id: int, topic: str) -> dict[str, Any]:
    """DESCRIBE_TOPIC of one broker's own log."""
    client = RawClient(cluster.brokers[broker_id].producer_port, timeout=10)
    try:
        response, _ = client.call({"api": 6, "topic": topic})
        return response
    finally:
        client.close()


class SimpleClient:
    """A seed-style client: length-prefixed msgpack maps out, one u64 reply each back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> SimpleClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send_all(self, frames: list[bytes], timeout: float = 30) -> list[int | RequestError]:
        self.writer.write(b"".join(frames))
        await self.writer.drain()
        out: list[int | RequestError] = []
        for _ in frames:
            reply = await asyncio.wait_for(self.reader.readexactly(8), timeout)
            try:
                out.append(simple.decode_reply(reply))
            except RequestError as exc:
                out.append(exc)
        return out

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def read_all(bootstrap: str, topic: str, count: int, timeout: float = 30) -> dict[bytes, tuple[int, int]]:
    found: dict[bytes, tuple[int, int]] = {}
    async with Consumer(bootstrap, topic, start="earliest", max_wait_ms=100) as consumer:
        stream = consumer.batches()
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            for m in await asyncio.wait_for(stream.__anext__(), timeout):
                found[m.value] = (m.partition, m.offset)
    return found


@pytest.mark.timeout(180)
async def test_a_broker_forwards_keyed_and_partitioned_simple_produce_to_the_leader(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("fwd", 3)
        await admin.create_topic("solo", 1, replication_factor=1)
    metadata = await asyncio.to_thread(cluster.wait_for, full_isr, "ISR", 30, ["fwd"])
    leaders = [p["leader"] for p in metadata["topics"][0]["partitions"]]
    solo = await asyncio.to_thread(cluster.wait_for, full_isr, "ISR", 30, ["solo"])
    solo_home = solo["topics"][0]["partitions"][0]["replicas"][0]
    # The client's broker holds no replica of "solo" at all and leads as few partitions of "fwd"
    # as possible (one when the leaders are balanced): the rest must be forwarded.
    entry = min((b for b in (0, 1, 2) if b != solo_home), key=leaders.count)
    assert leaders.count(entry) < 3, leaders

    client = await SimpleClient.connect(cluster.brokers[entry].producer_port)
    try:
        keyed = [message(b"k-%d" % i, key=b"key-%d" % i, topic="fwd") for i in range(300)]
        pinned = [message(b"p-%d" % i, topic="fwd", partition=i % 3) for i in range(30)]
        elsewhere = [message(b"s-%d" % i, topic="solo") for i in range(20)]
        replies = await client.send_all(keyed + pinned + elsewhere)  # pipelined, one pass or several
    finally:
        await client.close()
    errors = [r for r in replies if isinstance(r, RequestError)]
    assert not errors, errors[:3]

    found = await read_all(cluster.bootstrap, "fwd", 330)
    for i in range(300):
        assert found[b"k-%d" % i] == (partition_for_key(b"key-%d" % i, 3), replies[i]), i
    for i in range(30):
        assert found[b"p-%d" % i] == (i % 3, replies[300 + i]), i
    solo_found = await read_all(cluster.bootstrap, "solo", 20)
    assert [solo_found[b"s-%d" % i] for i in range(20)] == [(0, replies[330 + i]) for i in range(20)]
    # At least one partition of three was led elsewhere, so part of this went over the forward path;
    # every replica holds the same log (the leader answered after the in-sync replicas had it).
    ends = {tuple(p["end_offset"] for p in describe_local(cluster, b, "fwd")["partitions"]) for b in (0, 1, 2)}
    assert len(ends) == 1 and sum(next(iter(ends))) == 330, ends

    # Errors keep their codes through the forward path and the connection keeps serving.
    client = await SimpleClient.connect(cluster.brokers[entry].producer_port)
    try:
        bad = await client.send_all([message(b"x", topic="fwd", partition=7), message(b"x", topic="nope"),
                                     message(b"y", key=b"again", topic="fwd")])
    finally:
        await client.close()
    assert isinstance(bad[0], RequestError) and bad[0].code is ErrorCode.UNKNOWN_PARTITION
    assert isinstance(bad[1], RequestError) and bad[1].code is ErrorCode.UNKNOWN_TOPIC
    assert isinstance(bad[2], int)


@pytest.mark.timeout(240)
async def test_forwarded_simple_produce_loses_nothing_acknowledged_when_the_leader_fails(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("fwdfail", 3)
    metadata = await asyncio.to_thread(cluster.wait_for, full_isr, "ISR", 30, ["fwdfail"])
    leaders = [p["leader"] for p in metadata["topics"][0]["partitions"]]
    victim = leaders[0]
    entry = next(b for b in (0, 1, 2) if b != victim)  # the client only ever talks to this broker
    # Writer keys on every partition; most writers on partition 0, whose leader dies.
    keys = [k for k in (b"w-%d" % i for i in range(200)) if partition_for_key(k, 3) == 0][:3]
    keys += [next(k for k in (b"x-%d" % i for i in range(200)) if partition_for_key(k, 3) == p) for p in (1, 2)]
    history = History()
    stop = asyncio.Event()
    refusals: Counter[str] = Counter()

    async def writer(key: bytes) -> None:
        client = await SimpleClient.connect(cluster.brokers[entry].producer_port)
        partition = partition_for_key(key, 3)
        seq = 0
        try:
            while not stop.is_set():
                value = b"%s:%d" % (key, seq)
                seq += 1
                try:
                    (reply,) = await client.send_all([message(value, key=key, topic="fwdfail")], timeout=20)
                except (TimeoutError, OSError, asyncio.IncompleteReadError):
                    history.info(value)
                    return
                if isinstance(reply, RequestError):
                    refusals[reply.code.name] += 1
                    history.info(value)  # REQUEST_TIMEOUT/NOT_LEADER: outcome unknown, not retried
                    await asyncio.sleep(0.05)
                else:
                    history.acked(key.decode(), value, partition, reply)
        finally:
            await client.close()

    async def reader(consumer: Consumer) -> None:
        async for got in consumer.batches():
            for m in got:
                history.read(m.partition, m.offset, m.value)

    consumer = await Consumer(cluster.bootstrap, "fwdfail", start="earliest", max_wait_ms=200, timeout_s=5).start()
    reading = asyncio.get_running_loop().create_task(reader(consumer))
    writers = [asyncio.get_running_loop().create_task(writer(k)) for k in keys]
    failover: dict[str, float] = {}
    try:
        await asyncio.sleep(2)
        killed = time.monotonic()
        cluster.kill(victim)
        await asyncio.to_thread(cluster.wait_for, lambda m: m["topics"][0]["partitions"][0]["leader"] not in (-1, victim),
                                "a new leader", 20, ["fwdfail"])
        failover["s"] = time.monotonic() - killed
        await asyncio.sleep(3)
        await asyncio.to_thread(cluster.start, victim)
        await asyncio.sleep(3)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writers), 60)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(v not in history.read_at for v in history.ok):
            await asyncio.sleep(0.2)
            if reading.done():
                reading.result()
    finally:
        stop.set()
        reading.cancel()
        await asyncio.gather(reading, *writers, return_exceptions=True)
        await consumer.close()
    report = history.check()
    acked_partitions = {p for p, _ in history.ok.values()}
    print(json.dumps({**report, "failover_s": round(failover["s"], 2), "refusals": refusals}))
    assert report["acknowledged"] > 50 and acked_partitions == {0, 1, 2}, report
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report
    # Writes to partition 0 went on after the failover, through the same broker, to the new leader.
    after = [v for v in history.writer_order[keys[0].decode()] if history.ok[v][0] == 0]
    assert after and history.ok[after[-1]][1] > 0
