"""ALTER_TOPIC_CONFIG end to end: the way to release a retention hold, change retention or turn
on compaction without recreating a topic, against a real broker process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

import brokerproc
from rustmq.client import Admin, BrokerError, Producer
from rustmq.protocol.api import ErrorCode

PAD = b"." * 100


async def eventually(condition, timeout_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_resetting_a_group_hold_lets_retention_run_and_survives_restart(
        fast_retention_broker: brokerproc.BrokerProcess) -> None:
    bootstrap = fast_retention_broker.bootstrap
    async with Admin(bootstrap) as admin:
        await admin.create_topic("held", 1, {"segment_bytes": 4096, "retention_messages": 10,
                                             "retain_until_consumed_by": ["gone-for-good"]})
        async with Producer(bootstrap, acks="durable") as producer:
            for i in range(200):
                await producer.send("held", b"%d" % i + PAD, partition=0)
                if i % 10 == 9:
                    await producer.flush()
        await asyncio.sleep(1.0)  # five retention passes: the group never committed
        assert await admin.list_offset("held", 0, "earliest") == 0

        altered = await admin.alter_topic_config("held", reset=["retain_until_consumed_by"])
        assert altered["overrides"] == {"segment_bytes": 4096, "retention_messages": 10}
        assert altered["config"]["retain_until_consumed_by"] == []

        async def trimmed() -> bool:
            return await admin.list_offset("held", 0, "earliest") > 0

        assert await eventually(trimmed), fast_retention_broker.log()

        altered = await admin.alter_topic_config("held", {"retention_ms": 3_600_000, "cleanup_policy": "compact,delete"})
        assert altered["config"]["retention_ms"] == 3_600_000 and altered["config"]["cleanup_policy"] == "compact,delete"

    fast_retention_broker.stop()
    fast_retention_broker.start()
    async with Admin(fast_retention_broker.bootstrap) as admin:
        described = await admin.describe_topic("held")
        assert described["config"]["retention_ms"] == 3_600_000
        assert described["config"]["retain_until_consumed_by"] == []


@pytest.mark.timeout(60)
async def test_bad_alterations_change_nothing(broker) -> None:
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic("stable", 1, {"retention_ms": 60_000})
        before = await admin.describe_topic("stable")
        for changes, reset, code in (
            ({"retention_ms": -5}, (), ErrorCode.INVALID_CONFIG),
            ({"no_such_key": 1}, (), ErrorCode.INVALID_CONFIG),
            ({"cleanup_policy": "shred"}, (), ErrorCode.INVALID_CONFIG),
            ({}, (), ErrorCode.INVALID_REQUEST),
        ):
            with pytest.raises(BrokerError) as caught:
                await admin.alter_topic_config("stable", changes, reset=reset)
            assert caught.value.code == code
        with pytest.raises(BrokerError) as caught:
            await admin.alter_topic_config("missing", {"retention_ms": 1})
        assert caught.value.code == ErrorCode.UNKNOWN_TOPIC
        assert await admin.describe_topic("stable") == before


@pytest.mark.timeout(60)
def test_topic_alter_command(broker) -> None:
    def rustmq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rustmq", *args, "--bootstrap", broker.bootstrap],
                              capture_output=True, text=True, timeout=30)

    assert rustmq("topic", "create", "cli-alter", "--partitions", "1").returncode == 0
    done = rustmq("topic", "alter", "cli-alter", "--config", "retention_ms=120000", "--config",
                  'retain_until_consumed_by=["a","b"]', "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["overrides"] == {"retention_ms": 120000, "retain_until_consumed_by": ["a", "b"]}
    done = rustmq("topic", "alter", "cli-alter", "--reset", "retention_ms")
    assert done.returncode == 0 and '"retain_until_consumed_by": ["a", "b"]' in done.stdout
    refused = rustmq("topic", "alter", "cli-alter", "--config", "segment_bytes=12")
    assert refused.returncode == 1 and "segment_bytes" in refused.stderr
