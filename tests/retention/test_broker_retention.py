"""Retention of consumed data and key-based compaction, end to end on a real broker process.

The broker runs its retention task every 0.2 s (`--retention-check-s`); topics are created over
the wire with small segments so that a few hundred records span several sealed segments.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

import brokerproc
from rustmq.client import Admin, BrokerError, Consumer, GroupConsumer, Producer, QueueConsumer

PAD = b"." * 100


async def read_all(bootstrap: str, topic: str, idle_s: float = 0.5) -> list[tuple[int, bytes | None, bytes | None]]:
    async with Consumer(bootstrap, topic, start="earliest", max_wait_ms=100) as consumer:
        out = []
        while True:
            batch = await consumer.getmany(timeout_s=idle_s)
            if not batch:
                return out
            out += [(m.offset, m.key, m.value) for m in batch]


def scrape(broker: brokerproc.BrokerProcess) -> dict[str, float]:
    """The broker's unlabelled metrics from its admin port (name -> value)."""
    url = f"http://127.0.0.1:{broker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            values[name] = float(value)
    return values


async def wait_for(condition, timeout_s: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = await condition()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_compacted_topic_keeps_the_latest_value_per_key(
        fast_retention_broker: brokerproc.BrokerProcess) -> None:
    bootstrap = fast_retention_broker.bootstrap
    async with Admin(bootstrap) as admin:
        await admin.create_topic("prices", 1, {"cleanup_policy": "compact", "segment_bytes": 4096})
        described = await admin.describe_topic("prices")
        assert described["config"]["cleanup_policy"] == "compact"
    produced: list[tuple[int, bytes | None, bytes | None]] = []
    async with Producer(bootstrap, acks="durable") as producer:
        for round_number in range(40):
            for key in range(8):
                value = None if (key == 7 and round_number == 39) else b"k%d-r%d" % (key, round_number) + PAD
                meta = await producer.send_and_wait("prices", value, key=b"k%d" % key, partition=0)
                produced.append((meta.offset, b"k%d" % key, value))
            meta = await producer.send_and_wait("prices", b"unkeyed-%d" % round_number, partition=0)
            produced.append((meta.offset, None, b"unkeyed-%d" % round_number))
    latest = {key: (offset, value) for offset, key, value in produced if key is not None}

    async def compacted() -> list[tuple[int, bytes | None, bytes | None]] | None:
        records = await read_all(bootstrap, "prices")
        return records if len(records) < len(produced) // 2 else None

    records = await wait_for(compacted)
    assert records, "the broker never compacted the topic:\n" + fast_retention_broker.log()
    while True:  # compaction may have run while segments were still being sealed: let it settle
        await asyncio.sleep(1.0)  # five retention passes
        again = await read_all(bootstrap, "prices")
        if again == records:
            break
        records = again
    offsets = [r[0] for r in records]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    by_offset = {offset: (key, value) for offset, key, value in produced}
    assert all(by_offset[offset] == (key, value) for offset, key, value in records)
    # Every unkeyed record and every key's latest value (the tombstone of k7 too: it is younger
    # than delete_retention_ms) is still there.
    assert [r for r in records if r[1] is None] == [r for r in produced if r[1] is None]
    for key, (offset, value) in latest.items():
        assert (offset, key, value) in records
    # Before some split point (the active segment's base) each key appears once; from there on
    # everything produced is there, offsets contiguous.
    split = next(i for i in range(len(records))
                 if [r[0] for r in records[i:]] == list(range(records[i][0], produced[-1][0] + 1)))
    sealed_keys = [r[1] for r in records[:split] if r[1] is not None]
    assert len(sealed_keys) == len(set(sealed_keys))
    assert split > 0 and records[split][0] > len(produced) // 2
    assert "compacted prices/0:" in fast_retention_broker.log()
    metrics = scrape(fast_retention_broker)
    assert metrics["rustmq_compactions_total"] >= 1
    assert metrics["rustmq_compaction_bytes_reclaimed_total"] > 0
    assert metrics["rustmq_compaction_records_removed_total"] >= len(produced) - len(records)
    assert metrics["rustmq_compaction_failures_total"] == 0

    fast_retention_broker.stop()
    fast_retention_broker.start()
    assert await read_all(fast_retention_broker.bootstrap, "prices") == records

    # A queue subscription reads across the gaps compaction left: every remaining record once.
    async with QueueConsumer(fast_retention_broker.bootstrap, "prices", "after-compaction",
                             max_messages=100, max_wait_ms=200) as consumer:
        leased: list = []
        while batch := await consumer.receive_batch():
            leased += batch
            await consumer.ack_many(batch)
    assert sorted((m.offset, m.key, m.value) for m in leased) == records


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_retention_waits_for_the_named_group(
        fast_retention_broker: brokerproc.BrokerProcess) -> None:
    bootstrap = fast_retention_broker.bootstrap
    limits = {"segment_bytes": 4096, "retention_messages": 10}
    async with Admin(bootstrap) as admin:
        await admin.create_topic("control", 1, limits)
        await admin.create_topic("ledger", 1, {**limits, "retain_until_consumed_by": ["billing"]})
        assert (await admin.describe_topic("ledger"))["config"]["retain_until_consumed_by"] == ["billing"]
        async with Producer(bootstrap, acks="durable") as producer:
            for topic in ("control", "ledger"):
                for i in range(300):
                    await producer.send(topic, b"%d" % i + PAD, partition=0)
                    if i % 10 == 9:
                        await producer.flush()  # batches of 10: many segments of 4 KiB

        async def control_trimmed() -> bool:
            return await admin.list_offset("control", 0, "earliest") > 0

        assert await wait_for(control_trimmed), "retention by count never ran"
        await asyncio.sleep(1.0)  # five more retention passes
        assert await admin.list_offset("ledger", 0, "earliest") == 0  # billing never committed

        async with GroupConsumer(bootstrap, "ledger", group="billing", auto_commit=False) as group:
            await group.commit({("ledger", 0): 150})

            async def ledger_trimmed() -> int:
                return await admin.list_offset("ledger", 0, "earliest")

            start = await wait_for(ledger_trimmed)
            assert 0 < start <= 150  # the segment holding offset 150 stays
            assert scrape(fast_retention_broker)["rustmq_retention_segments_deleted_total"] > 0
            await asyncio.sleep(1.0)
            assert await admin.list_offset("ledger", 0, "earliest") == start
            await group.commit({("ledger", 0): 300})

            async def fully_trimmed() -> bool:
                return await admin.list_offset("ledger", 0, "earliest") > start

            assert await wait_for(fully_trimmed)
        remaining = await read_all(bootstrap, "ledger")
        assert remaining[-1][2] == b"299" + PAD and len(remaining) < 300


@pytest.mark.timeout(60)
async def test_bad_retention_configs_are_refused_over_the_wire(
        fast_retention_broker: brokerproc.BrokerProcess) -> None:
    async with Admin(fast_retention_broker.bootstrap) as admin:
        for config in ({"cleanup_policy": "shred"}, {"retain_until_consumed_by": "billing"},
                       {"delete_retention_ms": -5}, {"retain_until_settled": "yes"}):
            with pytest.raises(BrokerError, match="INVALID_CONFIG|must be"):
                await admin.create_topic("bad", 1, config)
        assert "bad" not in await admin.list_topics()
        await admin.create_topic("good", 1, {"cleanup_policy": "compact,delete",
                                             "retain_until_settled": True})
