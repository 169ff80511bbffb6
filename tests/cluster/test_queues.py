"""Queue subscriptions in cluster mode, three real brokers on the real API server: the queue
state of a topic's subscriptions lives on its coordinator (the leader of the topic's partition of
the internal topic ``__rustmq_coordination``), so consumers connected to different brokers share
one subscription, acks and dead letters survive a kill -9 of that coordinator, and a queue never
delivers a record above the high watermark (one that a failover could still truncate away)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from brokerproc import RawClient
from checker import QueueHistory
from clusterproc import BrokerCluster
from rustmq.client import Admin, Producer
from rustmq.client.consumer import Consumer
from rustmq.client.queues import QueueConsumer, QueueMessage, replay_dead_letters
from rustmq.protocol import batch, records
from rustmq.protocol.api import ApiKey, ErrorCode

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
    cluster.wait_for(all_in_sync, "the internal coordination topic", timeout=60, topics=[INTERNAL])
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("jobs", 1)
    leader = cluster.wait_for(in_sync, "jobs in sync", topics=["jobs"])["topics"][0]["partitions"][0]["leader"]
    # The queue coordinator reads its own replica of jobs/0: as the leader, or as a follower that
    # has the record but knows the high watermark below it. The other brokers are stopped.
    coordinator = queue_coordinator(cluster, "jobs")["coordinator"]
    stopped = [b for b in (0, 1, 2) if b not in (leader, coordinator)]
    client = RawClient(cluster.brokers[leader].consumer_port, timeout=10)
    queues = RawClient(cluster.brokers[coordinator].consumer_port, timeout=10)
    fetch = {"api": int(ApiKey.QUEUE_FETCH), "subscription": "workers", "topic": "jobs", "partition": 0,
             "max_wait_ms": 0}
    try:
        for attempt in range(3):  # the window closes when the stopped followers leave the ISR (~3-4 s)
            for b in stopped:
                cluster.pause(b)
            try:
                written, _ = client.call({"api": int(ApiKey.PRODUCE), "topic": "jobs", "partition": 0, "acks": 1},
                                         one_batch(b"not yet %d" % attempt))
                assert written["error"] == 0, written
                await asyncio.sleep(0.3)  # a follower coordinator has fetched it by now
                delivered, _ = queues.call(dict(fetch))
                state, _ = client.call({"api": int(ApiKey.FETCH), "max_wait_ms": 0, "partitions": [
                    {"topic": "jobs", "partition": 0, "offset": 0}]})
            finally:
                for b in stopped:
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
            delivered, _ = queues.call({**fetch, "max_wait_ms": 1000})
            if delivered["deliveries"]:
                break
            assert time.monotonic() < deadline, "the record was never delivered"
        ranges = delivered["deliveries"][0]["ranges"]
        assert [written["base_offset"], written["base_offset"] + 1] in ranges or any(
            start <= written["base_offset"] < end for start, end in ranges)
    finally:
        client.close()
        queues.close()


INTERNAL = "__rustmq_coordination"


def all_in_sync(metadata: dict[str, Any]) -> bool:
    (entry,) = metadata["topics"]
    parts = entry["partitions"]
    return entry["error"] == 0 and bool(parts) and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in parts)


def call(cluster: BrokerCluster, broker_id: int, header: dict[str, Any]) -> dict[str, Any]:
    client = RawClient(cluster.brokers[broker_id].consumer_port, timeout=10)
    try:
        return client.call(header)[0]
    finally:
        client.close()


def queue_coordinator(cluster: BrokerCluster, topic: str) -> dict[str, Any]:
    alive = next(b for b, p in cluster.brokers.items() if p.alive())
    found = call(cluster, alive, {"api": int(ApiKey.FIND_COORDINATOR), "key_type": "queue", "topic": topic})
    assert found["error"] == 0, found
    return found


async def prepare(cluster: BrokerCluster, topic: str, partitions: int, messages: int) -> QueueHistory:
    # The controller creates the internal topic once the brokers were stable for two leases.
    cluster.wait_for(all_in_sync, "the internal coordination topic", timeout=60, topics=[INTERNAL])
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic(topic, partitions)
    cluster.wait_for(all_in_sync, f"{topic} in sync", topics=[topic])
    history = QueueHistory()
    async with Producer(cluster.bootstrap, acks="all") as producer:
        for i in range(messages):
            value = b"%s-%d" % (topic.encode(), i)
            await producer.send_and_wait(topic, value, key=value)
            history.publish(value)
    return history


async def ack_confirmed(consumer: QueueConsumer, history: QueueHistory, messages: list[QueueMessage]) -> None:
    if messages:
        await consumer.ack_many(messages)
        for m in messages:
            history.ack_confirmed(m.value)


@pytest.mark.timeout(240)
async def test_consumers_on_different_brokers_share_one_subscription(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    history = await prepare(cluster, "work", 3, 300)
    coordinator = queue_coordinator(cluster, "work")["coordinator"]
    others = [b for b in (0, 1, 2) if b != coordinator]
    refused = call(cluster, others[0], {"api": int(ApiKey.QUEUE_FETCH), "subscription": "workers", "topic": "work",
                                        "max_wait_ms": 0})
    assert refused["error"] == ErrorCode.NOT_COORDINATOR, refused

    # Each consumer is told about a different broker, neither of them the coordinator.
    first = await QueueConsumer(cluster.brokers[others[0]].bootstrap, "work", "workers", ack_wait_ms=120_000,
                                max_messages=10).start()
    second = await QueueConsumer(cluster.brokers[others[1]].bootstrap, "work", "workers", ack_wait_ms=120_000,
                                 max_messages=10).start()

    async def consume(consumer: QueueConsumer, name: str) -> None:
        deadline = time.monotonic() + 60
        while len(history.acked) < 300 and time.monotonic() < deadline:
            got = await consumer.receive_batch(max_wait_ms=200)
            for m in got:
                history.deliver(m.value, name)
            await ack_confirmed(consumer, history, got)

    try:
        assert first.clustered and second.clustered
        await asyncio.gather(consume(first, "first"), consume(second, "second"))
    finally:
        await first.close()
        await second.close()
    report = history.check()
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["after_ack"] == 0, report
    assert report["acked"] == 300, report
    takers = {name for got in history.deliveries.values() for name in got}
    assert takers == {"first", "second"}, "both consumers should have taken part"

    # `rustmq queue describe` through a broker that does not coordinate: routed, one state.
    async with Admin(cluster.brokers[others[0]].bootstrap) as admin:
        described = await admin.describe_queue("work", "workers")
    assert sum(p["acked"] for p in described["partitions"]) == 300, described
    assert all(p["ack_floor"] == p["next_offset"] for p in described["partitions"]), described


@pytest.mark.timeout(300)
async def test_acks_and_dead_letters_survive_kill_of_the_coordinator(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    history = await prepare(cluster, "tasks", 3, 400)
    dlq = "tasks.workers.dlq"
    found = queue_coordinator(cluster, "tasks")
    coordinator, index = found["coordinator"], found["partition"]
    bootstrap = ",".join(cluster.brokers[b].bootstrap for b in (0, 1, 2) if b != coordinator)
    async with Admin(bootstrap) as admin:  # routed to the coordinator
        await admin.configure_queue("tasks", "workers", max_deliveries=1)
    consumer = await QueueConsumer(bootstrap, "tasks", "workers", ack_wait_ms=120_000, max_messages=20,
                                   timeout_s=60).start()
    dead: set[bytes] = set()

    async def work(until: int, deadline_s: float) -> None:
        """Ack every record but each tenth, which is nacked (max_deliveries 1: dead-lettered)."""
        deadline = time.monotonic() + deadline_s
        while len(history.acked) + len(dead) < until and time.monotonic() < deadline:
            got = await consumer.receive_batch(max_wait_ms=200)
            for m in got:
                history.deliver(m.value, "c")
            rejected = [m for m in got if int(m.value.rsplit(b"-", 1)[1]) % 10 == 0]
            if rejected:
                await consumer.nack_many(rejected, reason="test")
                dead.update(m.value for m in rejected)
            await ack_confirmed(consumer, history, [m for m in got if m not in rejected])

    try:
        await work(200, 60)
        # The DLQ topic was created cluster-wide: every broker knows it with the cluster's
        # replication factor, and each partition is in sync on three brokers.
        dlq_meta = cluster.wait_for(all_in_sync, f"{dlq} in sync", timeout=30, topics=[dlq])
        assert len(dlq_meta["topics"][0]["partitions"]) == 3
        for broker in (0, 1, 2):
            header = call(cluster, broker, {"api": int(ApiKey.METADATA), "topics": [dlq]})
            (entry,) = header["topics"]
            assert entry["error"] == 0 and all(len(p["replicas"]) == 3 for p in entry["partitions"]), entry

        # One batch stays leased (in flight) when the coordinator dies: it may come again.
        in_flight = await consumer.receive_batch(max_wait_ms=2000)
        for m in in_flight:
            history.deliver(m.value, "c")
            history.release(m.value)
        cluster.kill(coordinator)  # kill -9
        cluster.wait_for(lambda m: m["topics"][0]["partitions"][index]["leader"] not in (-1, coordinator),
                         "a new queue coordinator", timeout=40, topics=[INTERNAL])
        assert queue_coordinator(cluster, "tasks")["coordinator"] != coordinator
        await work(400, 90)
    finally:
        await consumer.close()
    report = history.check()
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["after_ack"] == 0, report
    assert len(history.acked) + len(dead) == 400, report
    assert consumer.coordinator_moves >= 1

    # Every dead letter is in the DLQ topic (read from the replicated topic after the failover).
    letters: dict[bytes, tuple[int, int]] = {}
    reader = await Consumer(cluster.bootstrap, dlq, start="earliest", max_wait_ms=200, timeout_s=10).start()
    try:
        deadline = time.monotonic() + 30
        while not dead <= set(letters) and time.monotonic() < deadline:
            for got in await reader.getmany(timeout_s=0.5):
                assert got.value is not None
                letters[got.value] = (got.partition, got.offset)
    finally:
        await reader.close()
    assert dead <= set(letters), sorted(dead - set(letters))[:5]

    # A dead letter replayed through any broker lands on its origin partition's leader.
    value = sorted(dead)[0]
    dlq_partition, dlq_offset = letters[value]
    replayed = await replay_dead_letters(cluster.bootstrap, dlq, dlq_partition, [dlq_offset])
    ((origin, index, base, last),) = replayed["to"]
    assert origin == "tasks" and base == last and replayed["replayed"] == 1
    again = await Consumer(cluster.bootstrap, "tasks", start="earliest", max_wait_ms=200, timeout_s=10).start()
    try:
        found = None
        deadline = time.monotonic() + 30
        while found is None and time.monotonic() < deadline:
            for got in await again.getmany(timeout_s=0.5):
                if (got.partition, got.offset) == (index, base):
                    found = got.value
    finally:
        await again.close()
    assert found == value


@pytest.mark.timeout(240)
async def test_a_coordinator_without_a_replica_reads_from_the_leader(three_brokers: BrokerCluster) -> None:
    """Replication factor 1: the queue coordinator holds one partition of three at most and
    reads the others from their leaders (its windows), below their high watermarks."""
    cluster = three_brokers
    cluster.wait_for(all_in_sync, "the internal coordination topic", timeout=60, topics=[INTERNAL])
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("single", 3, replication_factor=1)
    meta = cluster.wait_for(lambda m: all(p["leader"] >= 0 for p in m["topics"][0]["partitions"]),
                            "single led", topics=["single"])
    coordinator = queue_coordinator(cluster, "single")["coordinator"]
    remote = [i for i, p in enumerate(meta["topics"][0]["partitions"]) if coordinator not in p["replicas"]]
    assert remote, meta  # at least one partition is read from another broker
    history = QueueHistory()
    delivered_at: set[tuple[int, int]] = set()
    async with Producer(cluster.bootstrap, acks="all") as producer:
        consumer = await QueueConsumer(cluster.bootstrap, "single", "workers", ack_wait_ms=120_000,
                                       max_messages=50).start()
        try:
            for i in range(150):
                value = b"single-%d" % i
                await producer.send_and_wait("single", value, key=value)
                history.publish(value)

            async def drain(total: int) -> None:
                deadline = time.monotonic() + 60
                while len(history.acked) < total and time.monotonic() < deadline:
                    got = await consumer.receive_batch(max_wait_ms=300)
                    for m in got:
                        history.deliver(m.value, "c")
                        delivered_at.add((m.partition, m.offset))
                    await ack_confirmed(consumer, history, got)

            await drain(150)
            # Records produced while the consumer waits arrive through the windows' long polls.
            for i in range(150, 200):
                value = b"single-%d" % i
                await producer.send_and_wait("single", value, key=value)
                history.publish(value)
            await drain(200)
        finally:
            await consumer.close()
    report = history.check()
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["acked"] == 200, report
    assert {p for p, _ in delivered_at} >= set(remote), "records of the remote partitions were delivered"
