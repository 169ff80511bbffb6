"""Consumer groups across a cluster: three real brokers coordinating through the real API server.

The coordinator of a group is the leader of the group's partition of the internal topic
``__rustmq_coordination``; committed offsets are records of that replicated partition
(docs/cluster.md, "Consumer groups")."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from brokerproc import RawClient
from checker import History
from clusterproc import BrokerCluster
from rustmq.client import Admin, GroupConsumer, Producer
from rustmq.client.errors import BrokerError
from rustmq.client.groups import describe_group, list_groups
from rustmq.protocol.api import ApiKey, ErrorCode

pytestmark = [pytest.mark.slow]

INTERNAL = "__rustmq_coordination"


def call(cluster: BrokerCluster, broker_id: int, header: dict[str, Any]) -> dict[str, Any]:
    client = RawClient(cluster.brokers[broker_id].consumer_port, timeout=10)
    try:
        return client.call(header)[0]
    finally:
        client.close()


def all_in_sync(topic: str) -> Any:
    def check(metadata: dict[str, Any]) -> bool:
        (entry,) = metadata["topics"]
        parts = entry["partitions"]
        return entry["error"] == 0 and bool(parts) and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in parts)
    return check


async def prepare(cluster: BrokerCluster, topic: str, partitions: int, messages: int) -> History:
    # The controller creates the internal topic once it and the brokers were stable for two
    # lease durations (8 s with the tests' 4 s lease).
    cluster.wait_for(all_in_sync(INTERNAL), "the internal coordination topic", timeout=60, topics=[INTERNAL])
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic(topic, partitions)
    cluster.wait_for(all_in_sync(topic), f"{topic} in sync", topics=[topic])
    history = History()
    async with Producer(cluster.bootstrap, acks="all") as producer:
        for i in range(messages):
            value = b"%s-%d" % (topic.encode(), i)
            meta = await producer.send_and_wait(topic, value, key=b"k%d" % i)
            history.acked("w", value, meta.partition, meta.offset)
    return history


def coordinator_of(cluster: BrokerCluster, group: str) -> dict[str, Any]:
    alive = next(b for b, p in cluster.brokers.items() if p.alive())
    found = call(cluster, alive, {"api": int(ApiKey.FIND_COORDINATOR), "group": group})
    assert found["error"] == 0, found
    return found


@pytest.mark.timeout(180)
async def test_members_on_different_brokers_form_one_group(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    history = await prepare(cluster, "shared", 4, 200)
    # The internal topic is not an ordinary topic for clients.
    everything = cluster.metadata()
    assert INTERNAL not in [t["name"] for t in everything["topics"]]
    assert INTERNAL not in call(cluster, 0, {"api": int(ApiKey.LIST_TOPICS)})["topics"]
    refused = call(cluster, 0, {"api": int(ApiKey.DELETE_TOPIC), "topic": INTERNAL})
    assert refused["error"] == ErrorCode.INVALID_REQUEST

    coordinator = coordinator_of(cluster, "billing")["coordinator"]
    other = next(b for b in (0, 1, 2) if b != coordinator)
    answer = call(cluster, other, {"api": int(ApiKey.JOIN_GROUP), "group": "billing", "topics": ["shared"]})
    assert answer["error"] == ErrorCode.NOT_COORDINATOR, answer

    # Each member is told about one broker only, and a different one.
    first = await GroupConsumer(cluster.brokers[0].bootstrap, "shared", group="billing", max_wait_ms=100,
                                session_timeout_ms=6000).start()
    second = await GroupConsumer(cluster.brokers[1].bootstrap, "shared", group="billing", max_wait_ms=100,
                                 session_timeout_ms=6000).start()
    try:
        deadline = time.monotonic() + 30
        while True:
            await asyncio.gather(first.getmany(0.1), second.getmany(0.1))
            a, b = set(first.assignment), set(second.assignment)
            if a and b and not a & b and a | b == {("shared", p) for p in range(4)} and first.generation == second.generation:
                break
            assert time.monotonic() < deadline, (first.assignment, second.assignment)
        described = call(cluster, coordinator, {"api": int(ApiKey.DESCRIBE_GROUP), "group": "billing"})
        assert len(described["members"]) == 2, described
        # What `rustmq group describe/list` use: routed to the coordinator from any broker.
        described = await describe_group(cluster.brokers[other].bootstrap, "billing")
        assert len(described["members"]) == 2 and described["generation"] == first.generation, described
        assert "billing" in await list_groups(cluster.brokers[other].bootstrap)

        # Together they read everything once the split is stable.
        for consumer in (first, second):
            await consumer.commit()
        await first.close()
        await second.close()
        first = await GroupConsumer(cluster.brokers[2].bootstrap, "shared", group="billing", max_wait_ms=100).start()
        committed = await first.committed()
        reader = await GroupConsumer(cluster.brokers[2].bootstrap, "shared", group="audit", max_wait_ms=100).start()
        try:
            deadline = time.monotonic() + 30
            while len(history.read_at) < 200 and time.monotonic() < deadline:
                for m in await reader.getmany(0.2):
                    history.read(m.partition, m.offset, m.value)
        finally:
            await reader.close()
        report = history.check()
        assert not report["lost"] and not report["inconsistent"], report
        assert set(committed) <= {("shared", p) for p in range(4)}
    finally:
        await first.close()
        await second.close()


@pytest.mark.timeout(240)
async def test_committed_offsets_survive_kill_of_the_coordinator(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    history = await prepare(cluster, "ledger", 3, 300)
    found = coordinator_of(cluster, "payroll")
    coordinator, index = found["coordinator"], found["partition"]
    # A member that is told about a broker other than the coordinator.
    bootstrap = ",".join(cluster.brokers[b].bootstrap for b in (0, 1, 2) if b != coordinator)
    consumer = await GroupConsumer(bootstrap, "ledger", group="payroll", max_wait_ms=100, timeout_s=30,
                                   session_timeout_ms=6000).start()
    try:
        while len(history.read_at) < 150:
            for m in await consumer.getmany(0.2):
                history.read(m.partition, m.offset, m.value)
        await consumer.commit()
        before = await consumer.committed()
        assert sum(before.values()) >= 150

        cluster.kill(coordinator)  # kill -9
        cluster.wait_for(lambda m: m["topics"][0]["partitions"][index]["leader"] not in (-1, coordinator),
                         "a new coordinator", timeout=40, topics=[INTERNAL])
        after = coordinator_of(cluster, "payroll")
        assert after["coordinator"] != coordinator
        served = call(cluster, after["coordinator"], {"api": int(ApiKey.FETCH_OFFSETS), "group": "payroll"})
        assert served["error"] == 0, served
        assert {(t, p): o for t, p, o in served["offsets"]} == before

        # The member follows the coordinator (rejoins there) and reads the rest: nothing lost.
        deadline = time.monotonic() + 60
        while len(history.read_at) < 300 and time.monotonic() < deadline:
            for m in await consumer.getmany(0.2):
                history.read(m.partition, m.offset, m.value)
        await consumer.commit()
        final = await consumer.committed()
    finally:
        await consumer.close()
    report = history.check()
    assert not report["lost"] and not report["inconsistent"] and not report["duplicated"], report
    assert all(final[tp] >= before.get(tp, 0) for tp in final)
    assert sum(final.values()) == 300

    # The old coordinator comes back as a follower of the internal partition: it answers
    # NOT_COORDINATOR, and the committed offsets stay where they are.
    cluster.start(coordinator)
    cluster.wait_for(all_in_sync(INTERNAL), "the old coordinator back in sync", timeout=60, topics=[INTERNAL])
    now = coordinator_of(cluster, "payroll")["coordinator"]
    if now != coordinator:
        refused = call(cluster, coordinator, {"api": int(ApiKey.FETCH_OFFSETS), "group": "payroll"})
        assert refused["error"] == ErrorCode.NOT_COORDINATOR
    served = call(cluster, now, {"api": int(ApiKey.FETCH_OFFSETS), "group": "payroll"})
    assert {(t, p): o for t, p, o in served["offsets"]} == final


@pytest.mark.timeout(180)
async def test_a_producer_name_fences_older_instances_across_a_coordinator_failover(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    await prepare(cluster, "named", 2, 0)
    first = await Producer(cluster.bootstrap, acks="all", producer_name="etl").start()
    try:
        await first.send_and_wait("named", b"one", partition=0)
        second = await Producer(cluster.bootstrap, acks="all", producer_name="etl").start()
        assert (second.producer_id, second.producer_epoch) == (first.producer_id, 1)
        await second.send_and_wait("named", b"two", partition=0)
        await second.close()
        with pytest.raises(BrokerError) as info:
            await first.send_and_wait("named", b"zombie", partition=0)
        assert info.value.code is ErrorCode.PRODUCER_FENCED
    finally:
        first._errors.clear()
        await first.close()

    found = coordinator_of(cluster, "etl")
    other = next(b for b in (0, 1, 2) if b != found["coordinator"])
    refused = call(cluster, other, {"api": int(ApiKey.INIT_PRODUCER), "producer_name": "etl"})
    assert refused["error"] == ErrorCode.NOT_COORDINATOR
    cluster.kill(found["coordinator"])
    cluster.wait_for(lambda m: m["topics"][0]["partitions"][found["partition"]]["leader"] not in (-1, found["coordinator"]),
                     "a new coordinator", timeout=40, topics=[INTERNAL])
    third = await Producer(cluster.bootstrap, acks="all", producer_name="etl", delivery_timeout_s=40).start()
    try:
        assert (third.producer_id, third.producer_epoch) == (first.producer_id, 2)  # the name's state survived
    finally:
        await third.close()
