"""Three real brokers, one cluster, coordinated through the real API server of the local control
plane: topic administration, replication, acks=all rules, fencing, and failover under load
checked by a Jepsen-style history checker (tests/support/checker.py)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from brokerproc import RawClient
from clusterproc import BrokerCluster
from rustmq.client import Admin, Consumer, Producer
from rustmq.protocol import batch, records, simple
from rustmq.protocol.api import ApiKey, ErrorCode, RequestError
from workload import AcksAllLoad

pytestmark = [pytest.mark.slow]


def one_batch(value: bytes = b"v") -> bytes:
    return batch.build_batch(records.encode_body([[0, None, value, None]]), record_count=1,
                             first_timestamp_ms=1, max_timestamp_ms=1)


def full_isr(metadata: dict[str, Any]) -> bool:
    parts = metadata["topics"][0]["partitions"]
    return bool(parts) and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in parts)


def call(cluster: BrokerCluster, broker_id: int, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
    client = RawClient(cluster.brokers[broker_id].producer_port, timeout=10)
    try:
        response, _ = client.call(header, payload)
        return response
    finally:
        client.close()


@pytest.mark.timeout(120)
async def test_one_cluster_replicates_and_enforces_acks_all(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.brokers[1].bootstrap) as admin:
        created = await admin.create_topic("orders", 3)
    assert created["replication_factor"] == 3 and created["min_insync_replicas"] == 2
    metadata = cluster.wait_for(
        full_isr, "full ISR", topics=["orders"])
    assert sorted(b["id"] for b in metadata["brokers"]) == [0, 1, 2]
    assert metadata["controller"] in (0, 1, 2)
    partitions = metadata["topics"][0]["partitions"]
    assert sorted(p["leader"] for p in partitions) == [0, 1, 2]  # leaders balanced
    assert all(sorted(p["replicas"]) == [0, 1, 2] and p["leader_epoch"] == 0 for p in partitions)

    async with Producer(cluster.bootstrap, acks="all") as producer:
        for i in range(300):
            await producer.send("orders", b"m%d" % i, key=b"k%d" % (i % 7))
    leader = partitions[0]["leader"]
    follower = next(b for b in (0, 1, 2) if b != leader)
    refused = call(cluster, follower, {"api": 0, "topic": "orders", "partition": 0, "acks": 3}, one_batch())
    assert refused["error"] == ErrorCode.NOT_LEADER

    async with Consumer(cluster.bootstrap, "orders", start="earliest", max_wait_ms=100) as consumer:
        seen: list[bytes] = []
        stream = consumer.batches()
        while len(seen) < 300:
            seen += [m.value for m in await asyncio.wait_for(stream.__anext__(), 20)]
    assert sorted(seen) == sorted(b"m%d" % i for i in range(300))

    # Every replica holds the same log: same end offsets, and the followers kept the leader's
    # offsets and epochs (DESCRIBE_TOPIC reads a broker's local log).
    ends = {b: [p["end_offset"] for p in call(cluster, b, {"api": 6, "topic": "orders"})["partitions"]] for b in (0, 1, 2)}
    assert ends[0] == ends[1] == ends[2] and sum(ends[0]) == 300

    # With both followers gone the ISR shrinks to the leader: acks=all is refused, not degraded.
    others = [b for b in (0, 1, 2) if b != leader]
    for b in others:
        cluster.kill(b)
    cluster.wait_for(lambda m: m["topics"][0]["partitions"][0]["isr"] == [leader], "ISR shrink", timeout=30, topics=["orders"])
    refused = call(cluster, leader, {"api": 0, "topic": "orders", "partition": 0, "acks": 3}, one_batch())
    assert refused["error"] == ErrorCode.NOT_ENOUGH_REPLICAS, refused
    accepted = call(cluster, leader, {"api": 0, "topic": "orders", "partition": 0, "acks": 1}, one_batch())
    assert accepted["error"] == 0

    # They come back, catch up and rejoin the ISR; acks=all works again.
    for b in others:
        cluster.start(b)
    cluster.wait_for(full_isr, "ISR rejoin",
                     timeout=40, topics=["orders"])
    assert call(cluster, leader, {"api": 0, "topic": "orders", "partition": 0, "acks": 3}, one_batch())["error"] == 0


async def run_load(cluster: BrokerCluster, topic: str, writers: int, nemesis: Any, seconds: float) -> dict[str, Any]:
    """acks=all writers (one key, so one partition, each) and a consumer, while nemesis runs."""
    report = await AcksAllLoad(cluster.bootstrap, topic, writers, delivery_timeout_s=20).run(nemesis, settle_s=seconds)
    if report["lost"]:
        report["diagnosis"]["metadata"] = cluster.metadata([topic])["topics"]
    return report


async def wait_async(cluster: BrokerCluster, condition: Any, what: str, timeout: float = 30.0, topics: list[str] | None = None) -> dict[str, Any]:
    return await asyncio.to_thread(cluster.wait_for, condition, what, timeout, topics)


@pytest.mark.timeout(240)
async def test_kill_the_leader_under_acks_all_load_loses_nothing(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("jepsen", 3)
    await wait_async(cluster, full_isr, "ISR", topics=["jepsen"])
    victim: dict[str, int] = {}

    async def kill_leader() -> None:
        before = cluster.partition("jepsen", 0)
        victim["id"], victim["epoch"] = before["leader"], before["leader_epoch"]
        killed_at = time.monotonic()
        cluster.kill(before["leader"])
        after = await wait_async(cluster, lambda m: m["topics"][0]["partitions"][0]["leader"] not in (-1, before["leader"]),
                                 "a new leader", timeout=20, topics=["jepsen"])
        victim["failover_s"] = time.monotonic() - killed_at
        assert after["topics"][0]["partitions"][0]["leader_epoch"] > before["leader_epoch"]
        # Topic administration keeps working while a broker is down (RF defaults to the live brokers).
        survivor = next(b for b in (0, 1, 2) if b != before["leader"])
        created = await asyncio.to_thread(call, cluster, survivor, {"api": 4, "topic": "during-failover", "partitions": 2})
        assert created["error"] == 0 and created["replication_factor"] == 2, created
        assert (await asyncio.to_thread(call, cluster, survivor, {"api": 5, "topic": "during-failover"}))["error"] == 0
        await asyncio.sleep(2)
        await asyncio.to_thread(cluster.start, before["leader"])

    report = await run_load(cluster, "jepsen", writers=3, nemesis=kill_leader, seconds=6)
    print(json.dumps({**report, "failover_s": round(victim["failover_s"], 2)}))
    assert report["acknowledged"] > 50, report
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report  # the producer is idempotent
    assert victim["failover_s"] < 10
    # The killed broker came back as a follower, caught up and rejoined the in-sync set.
    await wait_async(cluster, full_isr, "rejoin",
                     timeout=40, topics=["jepsen"])


@pytest.mark.timeout(240)
async def test_a_paused_leader_comes_back_deposed_without_split_brain(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("zombie", 1)
    await wait_async(cluster, full_isr, "ISR", topics=["zombie"])
    paused: dict[str, Any] = {}

    async def pause_leader() -> None:
        before = cluster.partition("zombie", 0)
        paused.update(before)
        cluster.pause(before["leader"])
        await wait_async(cluster, lambda m: m["topics"][0]["partitions"][0]["leader"] not in (-1, before["leader"]),
                         "a new leader", timeout=20, topics=["zombie"])
        # The zombie wakes up believing nothing happened: it must refuse acks=all at once.
        cluster.resume(before["leader"])
        zombie = await asyncio.to_thread(call, cluster, before["leader"],
                                         {"api": 0, "topic": "zombie", "partition": 0, "acks": 3}, one_batch(b"zombie"))
        paused["zombie_answer"] = zombie

    report = await run_load(cluster, "zombie", writers=2, nemesis=pause_leader, seconds=5)
    print(json.dumps(report))
    assert paused["zombie_answer"]["error"] in (ErrorCode.NOT_LEADER, ErrorCode.REQUEST_TIMEOUT), paused["zombie_answer"]
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report  # the producer is idempotent
    after = await wait_async(cluster, full_isr, "rejoin",
                             timeout=40, topics=["zombie"])
    # Deposed: a newer epoch leads (the zombie may lead again later, as preferred leader, only
    # through a new epoch of its own).
    assert after["topics"][0]["partitions"][0]["leader_epoch"] > paused["leader_epoch"]
    ends = {b: call(cluster, b, {"api": 6, "topic": "zombie"})["partitions"][0]["end_offset"] for b in (0, 1, 2)}
    assert len(set(ends.values())) == 1, ends  # one log: the zombie's unacknowledged tail was truncated away


@pytest.mark.timeout(240)
async def test_a_paused_controller_comes_back_deposed_and_the_cluster_keeps_one_controller(
        three_brokers: BrokerCluster) -> None:
    """SIGSTOP of the controller for longer than its Lease under acks=all load: another broker
    takes the controller Lease with a higher epoch and moves the paused broker's leaderships;
    resumed, the old controller acts on nothing it knew before the pause (every broker names
    the new controller, no partition goes offline) and the checker finds nothing lost."""
    from clusterproc import read_health

    cluster = three_brokers
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topic("ctl", 3)
    old = (await wait_async(cluster, full_isr, "ISR", topics=["ctl"]))["controller"]
    other = next(b for b in (0, 1, 2) if b != old)
    seen: dict[str, Any] = {}

    def seen_by_other() -> dict[str, Any]:
        return call(cluster, other, {"api": int(ApiKey.METADATA), "topics": ["ctl"]})

    async def pause_controller() -> None:
        seen["epoch_before"] = (await asyncio.to_thread(read_health, cluster) or {}).get("controllerEpoch", 0)
        cluster.pause(old)
        deadline = time.monotonic() + 30
        while True:
            meta = await asyncio.to_thread(seen_by_other)
            if meta["controller"] not in (-1, old) and all(p["leader"] not in (-1, old) for p in meta["topics"][0]["partitions"]):
                break
            assert time.monotonic() < deadline, f"no new controller and leaders: {meta}"
            await asyncio.sleep(0.2)
        seen["new"] = meta["controller"]
        cluster.resume(old)
        await asyncio.sleep(4)  # the old controller's rounds run again on what it knew

    report = await run_load(cluster, "ctl", writers=3, nemesis=pause_controller, seconds=4)
    print(json.dumps({**report, **seen, "old": old}))
    assert report["acknowledged"] > 50, report
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report
    named = {b: call(cluster, b, {"api": int(ApiKey.METADATA), "topics": []})["controller"] for b in (0, 1, 2)}
    assert set(named.values()) == {seen["new"]}, named
    health = await asyncio.to_thread(read_health, cluster)
    assert health is not None and health["controller"] == seen["new"], health
    assert health["controllerEpoch"] > seen["epoch_before"] and health["offline"] == 0, health


@pytest.mark.timeout(240)
async def test_restarting_every_broker_at_once_keeps_every_acknowledged_record(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("restart", 3)
    await wait_async(cluster, full_isr, "ISR", topics=["restart"])

    async def restart_all() -> None:
        for b in (0, 1, 2):
            cluster.kill(b)
        await asyncio.sleep(1)
        for b in (0, 1, 2):
            await asyncio.to_thread(cluster.start, b)

    report = await run_load(cluster, "restart", writers=3, nemesis=restart_all, seconds=10)
    print(json.dumps(report))
    assert report["acknowledged"] > 50, report
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report  # the producer is idempotent


def test_errors_are_clear(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    # The controller creates the default topic (simple produce) with the full replication factor.
    default = cluster.wait_for(full_isr, "the default topic", timeout=40, topics=["default"])
    assert len(default["topics"][0]["partitions"]) == 12 and default["topics"][0]["replication_factor"] == 3
    # A client that cannot route (seed-style simple produce, one load balancer): keyless messages
    # are accepted by any broker, onto a partition it leads.
    for broker_id in (0, 1, 2):
        client = RawClient(cluster.brokers[broker_id].producer_port, timeout=10)
        try:
            for _ in range(20):  # until this broker leads its partitions of the new topic
                client.send_raw(simple.encode_message(b"seed-%d" % broker_id))
                try:
                    offset = simple.decode_reply(client.recv_exact(8))
                    break
                except RequestError:
                    time.sleep(0.25)
            else:
                raise AssertionError(f"broker {broker_id} refused every simple produce")
        finally:
            client.close()
        assert offset >= 0
    response = call(cluster, 0, {"api": 4, "topic": "big", "partitions": 1, "replication_factor": 5})
    assert response["error"] == ErrorCode.INVALID_CONFIG and "needs 5 live brokers" in response["message"]
    assert call(cluster, 0, {"api": 4, "topic": "ok", "partitions": 1})["error"] == 0
    assert call(cluster, 2, {"api": 4, "topic": "ok", "partitions": 1})["error"] == ErrorCode.TOPIC_EXISTS
    # A topic created through one broker is known at once on the others: asked about a name it
    # does not know, a broker reads the cluster state before it answers UNKNOWN_TOPIC.
    for i in range(5):
        assert call(cluster, 0, {"api": 4, "topic": f"fresh-{i}", "partitions": 1})["error"] == 0
        for other in (1, 2):
            described = call(cluster, other, {"api": int(ApiKey.METADATA), "topics": [f"fresh-{i}"]})
            assert described["topics"][0]["error"] == 0, (other, described)
    unknown = call(cluster, 1, {"api": int(ApiKey.METADATA), "topics": ["never-made"]})
    assert unknown["topics"][0]["error"] == ErrorCode.UNKNOWN_TOPIC
    assert call(cluster, 1, {"api": 9, "topic": "ok", "partitions": 1})["error"] == ErrorCode.INVALID_CONFIG  # only grows
    assert call(cluster, 2, {"api": 5, "topic": "ok"})["error"] == 0
    cluster.wait_for(lambda m: m["topics"][0]["error"] == ErrorCode.UNKNOWN_TOPIC, "deletion seen", topics=["ok"])


@pytest.mark.timeout(120)
async def test_brokers_advertise_the_external_addresses_the_operator_publishes(three_brokers: BrokerCluster) -> None:
    from kubernetes import client, config

    cluster = three_brokers
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        client.CoreV1Api(api).create_namespaced_config_map(cluster.namespace, {
            "metadata": {"name": f"{cluster.name}-listeners", "labels": {"app.kubernetes.io/instance": cluster.name}},
            "data": {"broker-0": "localhost", "broker-1": "localhost", "broker-2": ""},
        })
    finally:
        api.close()
    metadata = cluster.wait_for(lambda m: sum("external_host" in b for b in m["brokers"]) == 2, "external hosts")
    assert {b["id"]: b.get("external_host") for b in metadata["brokers"]} == {0: "localhost", 1: "localhost", 2: None}
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topic("outside", 3)
    await wait_async(cluster, full_isr, "ISR", topics=["outside"])
    async with Producer(cluster.bootstrap, acks="all", external=True) as producer:
        sent = [await producer.send_and_wait("outside", b"x%d" % i, key=b"k%d" % i) for i in range(30)]
        assert producer._routes is not None
        hosts = {host for host, _ in producer._routes._connections}
    assert "localhost" in hosts  # brokers 0 and 1 were reached at their external address
    assert len({m.partition for m in sent}) == 3


@pytest.mark.timeout(120)
def test_a_retry_after_failover_is_stored_once(three_brokers: BrokerCluster) -> None:
    """The idempotent producer's guarantee across a leader change: the new leader rebuilds its
    producer table from the replicated log, so a resent batch is answered as a duplicate."""
    cluster = three_brokers
    assert call(cluster, 0, {"api": 4, "topic": "dedup", "partitions": 1})["error"] == 0
    cluster.wait_for(full_isr, "ISR", topics=["dedup"])
    init = call(cluster, 1, {"api": 20})
    producer_id = init["producer_id"]
    assert producer_id % 1024 == 1  # ids carry the broker that handed them out: unique cluster-wide
    sent = []
    for seq in range(3):
        body = records.encode_body([[0, None, b"once-%d" % seq, None]])
        sent.append(batch.build_batch(body, record_count=1, first_timestamp_ms=1, max_timestamp_ms=1,
                                      producer_id=producer_id, producer_epoch=0, base_sequence=seq))
    leader = cluster.partition("dedup", 0)["leader"]
    answers = [call(cluster, leader, {"api": 35, "topic": "dedup", "partition": 0, "acks": 3}, b) for b in sent]
    assert [a["base_offset"] for a in answers] == [0, 1, 2] and all(a["error"] == 0 for a in answers)
    cluster.kill(leader)
    moved = cluster.wait_for(lambda m: m["topics"][0]["partitions"][0]["leader"] not in (-1, leader), "new leader",
                             timeout=30, topics=["dedup"])
    new_leader = moved["topics"][0]["partitions"][0]["leader"]
    again = call(cluster, new_leader, {"api": 35, "topic": "dedup", "partition": 0, "acks": 3}, sent[2])
    assert again["error"] == 0 and again["duplicate_batches"] == 1 and again["base_offset"] == 2, again
    body = records.encode_body([[0, None, b"once-3", None]])
    following = batch.build_batch(body, record_count=1, first_timestamp_ms=1, max_timestamp_ms=1,
                                  producer_id=producer_id, producer_epoch=0, base_sequence=3)
    deadline = time.monotonic() + 30
    while True:  # acks=all needs the ISR back to min_insync (2): the survivor must be in sync
        next_answer = call(cluster, new_leader, {"api": 35, "topic": "dedup", "partition": 0, "acks": 3}, following)
        if next_answer["error"] != ErrorCode.NOT_ENOUGH_REPLICAS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert next_answer["error"] == 0 and next_answer["base_offset"] == 3, next_answer
    gap = batch.build_batch(body, record_count=1, first_timestamp_ms=1, max_timestamp_ms=1,
                            producer_id=producer_id, producer_epoch=0, base_sequence=9)
    refused = call(cluster, new_leader, {"api": 35, "topic": "dedup", "partition": 0, "acks": 3}, gap)
    assert refused["error"] == ErrorCode.OUT_OF_ORDER_SEQUENCE
