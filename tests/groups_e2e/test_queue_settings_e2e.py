"""Per-subscription and per-topic queue settings (QUEUE_CONFIGURE / QUEUE_DESCRIBE) against real
broker processes: max deliveries per subscription, a topic TTL, settings across a restart, bad
values refused while the broker keeps serving, and the ``rustmq queue configure|describe`` CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from rustmq.client.admin import Admin
from rustmq.client.consumer import Consumer
from rustmq.client.errors import BrokerError
from rustmq.client.queues import Queue, QueueConsumer
from rustmq.client.sync import SyncAdmin
from rustmq.protocol.api import ErrorCode


async def _nack_until_gone(bootstrap: str, topic: str, subscription: str, limit: int) -> list[int]:
    """Receive and nack the topic's only record until it stops coming (or `limit` times);
    returns the delivery numbers seen."""
    attempts = []
    async with QueueConsumer(bootstrap, topic, subscription, max_wait_ms=500) as consumer:
        for _ in range(limit):
            msg = await consumer.receive(timeout_s=2)
            if msg is None:
                break
            attempts.append(msg.attempt)
            await msg.nack(reason=f"failure {msg.attempt}")
    return attempts


async def test_max_deliveries_per_subscription(broker) -> None:
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic("payments", partitions=1)
        described = await admin.configure_queue("payments", "strict", max_deliveries=2)
        assert described["overrides"] == {"max_deliveries": 2}
        assert described["effective"]["max_deliveries"] == 2
        assert (await admin.describe_queue("payments", "lenient"))["effective"]["max_deliveries"] == 5
    async with Queue(broker.bootstrap, "payments") as queue:
        await queue.publish(b"poison")
    assert await _nack_until_gone(broker.bootstrap, "payments", "strict", 10) == [1, 2]
    assert await _nack_until_gone(broker.bootstrap, "payments", "lenient", 3) == [1, 2, 3]  # not dead yet
    async with Consumer(broker.bootstrap, "payments.strict.dlq", start="earliest") as reader:
        (dead,) = await reader.getmany(timeout_s=5)
    assert dead.value == b"poison" and dict(dead.headers)["rustmq-dlq-attempts"] == b"2"
    async with Admin(broker.bootstrap) as admin:
        assert "payments.lenient.dlq" not in await admin.list_topics()
        strict = await admin.describe_queue("payments", "strict")
        assert [p["dead_lettered"] for p in strict["partitions"]] == [1]


async def test_topic_ttl_expires_records_and_a_subscription_can_opt_out(broker) -> None:
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic("alerts", partitions=1)
        await admin.configure_queue("alerts", None, ttl_ms=300)
        await admin.configure_queue("alerts", "archive", ttl_ms=None)  # no TTL for this one
        assert (await admin.describe_queue("alerts", "pager"))["effective"]["ttl_ms"] == 300
    async with Queue(broker.bootstrap, "alerts") as queue:
        for i in range(5):
            await queue.publish(b"stale-%d" % i)
    await asyncio.sleep(0.6)
    async with Queue(broker.bootstrap, "alerts") as queue:
        await queue.publish(b"fresh")
    async with QueueConsumer(broker.bootstrap, "alerts", "pager", max_wait_ms=300) as consumer:
        batch = await consumer.receive_batch()
        assert [m.value for m in batch] == [b"fresh"]
        await consumer.ack_many(batch)
    async with QueueConsumer(broker.bootstrap, "alerts", "archive", max_wait_ms=300) as consumer:
        batch = await consumer.receive_batch()
        assert sorted(m.value for m in batch) == sorted([b"fresh"] + [b"stale-%d" % i for i in range(5)])
    async with Admin(broker.bootstrap) as admin:
        pager = await admin.describe_queue("alerts", "pager")
        assert [p["expired"] for p in pager["partitions"]] == [5]
        topic = await admin.describe_queue("alerts")
        assert topic["subscriptions"] == ["archive", "pager"] and topic["topic_overrides"] == {"ttl_ms": 300}


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
async def test_settings_survive_a_broker_restart(make_broker, tmp_path, crash: bool) -> None:
    first = make_broker()
    async with Admin(first.bootstrap) as admin:
        await admin.create_topic("orders", partitions=2)
        await admin.configure_queue("orders", "billing", max_deliveries=1, ack_wait_ms=2_000)
        await admin.configure_queue("orders", None, priority_weights=[1, 1, 1])  # answered once fsynced
    if crash:
        first.kill()
    else:
        assert first.stop() == 0
    second = make_broker(tmp_path / "data")
    async with Admin(second.bootstrap) as admin:
        described = await admin.describe_queue("orders", "billing")
    assert described["overrides"] == {"max_deliveries": 1, "ack_wait_ms": 2_000}
    assert described["topic_overrides"] == {"priority_weights": [1, 1, 1]}
    async with Queue(second.bootstrap, "orders") as queue:
        await queue.publish(b"once", key=b"k")
    assert await _nack_until_gone(second.bootstrap, "orders", "billing", 5) == [1]
    async with QueueConsumer(second.bootstrap, "orders", "billing") as consumer:
        assert await consumer.receive(timeout_s=0.5) is None


async def test_bad_settings_are_refused_and_the_broker_keeps_serving(broker) -> None:
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic("jobs", partitions=1)
        await admin.configure_queue("jobs", "w", max_lookahead=20_000)
        cases = [
            ({"max_deliveries": 0}, ErrorCode.INVALID_REQUEST),
            ({"max_deliveries": "3"}, ErrorCode.INVALID_REQUEST),
            ({"ttl_ms": -5}, ErrorCode.INVALID_REQUEST),
            ({"priority_weights": [1, 0, 1]}, ErrorCode.INVALID_REQUEST),
            ({"max_deliverys": 3}, ErrorCode.INVALID_CONFIG),
            ({"priority_weights": [1, 1]}, ErrorCode.INVALID_CONFIG),
            ({"max_in_flight": 50_000}, ErrorCode.INVALID_CONFIG),  # above w's max_lookahead
        ]
        for settings, code in cases:
            with pytest.raises(BrokerError) as info:
                await admin.configure_queue("jobs", "w", **settings)
            assert info.value.code is code, (settings, info.value)
        with pytest.raises(BrokerError) as info:
            await admin.configure_queue("jobs", None, max_in_flight=50_000)  # would break w
        assert info.value.code is ErrorCode.INVALID_CONFIG and "'w'" in info.value.message
        with pytest.raises(BrokerError) as info:
            await admin.configure_queue("nope", "w", max_deliveries=3)
        assert info.value.code is ErrorCode.UNKNOWN_TOPIC
        with pytest.raises(BrokerError) as info:
            await admin.configure_queue("jobs", "w")  # nothing to set
        assert info.value.code is ErrorCode.INVALID_REQUEST
        with pytest.raises(BrokerError) as info:
            await admin.configure_queue("jobs", "x" * 256, max_deliveries=3)
        assert info.value.code is ErrorCode.INVALID_REQUEST
        connection = admin._connection
        assert connection is not None
        for malformed in ({"set": [["max_deliveries", 2]]}, {"reset": "ttl_ms"},
                          {"reset": [7]}, {"subscription": 5, "set": {"max_deliveries": 2}}):
            with pytest.raises(BrokerError) as info:
                await connection.request({"api": 36, "topic": "jobs", **malformed})
            assert info.value.code is ErrorCode.INVALID_REQUEST, (malformed, info.value)
        with pytest.raises(BrokerError) as info:
            await connection.request({"api": 37, "topic": "jobs", "subscription": ""})
        assert info.value.code is ErrorCode.INVALID_REQUEST
        described = await admin.describe_queue("jobs", "w")  # same connection, still served
        assert described["overrides"] == {"max_lookahead": 20_000}
        assert described["topic_overrides"] == {}
    async with Queue(broker.bootstrap, "jobs") as queue:
        await queue.publish(b"still-works")
    async with QueueConsumer(broker.bootstrap, "jobs", "w") as consumer:
        msg = await consumer.receive(timeout_s=5)
        assert msg is not None and msg.value == b"still-works"
        await msg.ack()


def rustmq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rustmq", *args], capture_output=True, text=True, timeout=60, check=False)


def test_cli_queue_configure_and_describe(broker) -> None:
    boot = ["--bootstrap", broker.bootstrap]
    assert rustmq("topic", "create", "tasks", "--partitions", "1", *boot).returncode == 0
    configured = rustmq("queue", "configure", "tasks", "workers", "--max-deliveries", "3", "--ack-wait-ms", "5000",
                        "--priority-weights", "4,2,1", "--json", *boot)
    assert configured.returncode == 0, configured.stderr
    assert json.loads(configured.stdout)["overrides"] == {"max_deliveries": 3, "ack_wait_ms": 5000,
                                                          "priority_weights": [4, 2, 1]}
    topic_wide = rustmq("queue", "configure", "tasks", "--topic-wide", "--ttl-ms", "60000", *boot)
    assert topic_wide.returncode == 0, topic_wide.stderr
    reset = rustmq("queue", "configure", "tasks", "workers", "--reset", "ack_wait_ms", "--no-ttl", *boot)
    assert reset.returncode == 0, reset.stderr
    text = rustmq("queue", "describe", "tasks", "workers", *boot)
    assert text.returncode == 0, text.stderr
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in text.stdout.splitlines()[2:] if "\t" in line}
    assert rows["max_deliveries"] == ["3", "subscription"]
    assert rows["ack_wait_ms"] == ["30000", "broker"]
    assert rows["ttl_ms"] == ["none", "subscription"]
    topic = json.loads(rustmq("queue", "describe", "tasks", "--json", *boot).stdout)
    assert topic["effective"]["ttl_ms"] == 60000 and topic["subscriptions"] == ["workers"]
    bad = rustmq("queue", "configure", "tasks", "workers", "--max-deliveries", "0", *boot)
    assert bad.returncode == 1 and "INVALID_REQUEST" in bad.stderr
    neither = rustmq("queue", "configure", "tasks", "--max-deliveries", "3", *boot)
    assert neither.returncode != 0 and "SUBSCRIPTION or --topic-wide" in neither.stderr


def test_sync_admin_configures_a_queue(broker) -> None:
    with SyncAdmin(broker.bootstrap) as admin:
        admin.create_topic("sync-jobs", partitions=1)
        described = admin.configure_queue("sync-jobs", "w", max_deliveries=4)
        assert described["effective"]["max_deliveries"] == 4
        assert admin.describe_queue("sync-jobs", "w")["overrides"] == {"max_deliveries": 4}
