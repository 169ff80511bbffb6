"""The asyncio client and its synchronous wrapper against a real broker process."""

from __future__ import annotations

import asyncio

import pytest

import brokerproc
from rustmq.client import Admin, BrokerError, Consumer, ProduceError, Producer, SyncConsumer, SyncProducer
from rustmq.protocol.api import ErrorCode, partition_for_key


async def consume_n(bootstrap: str, topic: str, count: int, **options) -> list:
    out = []
    async with Consumer(bootstrap, topic, max_wait_ms=200, **options) as consumer:
        async with asyncio.timeout(20):
            async for message in consumer:
                out.append(message)
                if len(out) == count:
                    break
    return out


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd", "lz4"])
async def test_producer_and_consumer_round_trip_with_every_codec(broker, codec) -> None:
    async with Producer(broker.bootstrap, codec=codec, linger_ms=2) as producer:
        for index in range(500):
            await producer.send("rt", b"value-%d" % index, b"key-%d" % (index % 7), headers=[("n", b"%d" % index)])
    messages = await consume_n(broker.bootstrap, "rt", 500)
    assert sorted(int(m.value[6:]) for m in messages) == list(range(500))
    for message in messages:
        index = int(message.value[6:])
        assert message.key == b"key-%d" % (index % 7)
        assert message.partition == partition_for_key(message.key, 3)
        assert message.headers == (("n", b"%d" % index),)
    per_partition: dict[int, list[int]] = {}
    for message in messages:
        per_partition.setdefault(message.partition, []).append(message.offset)
    for offsets in per_partition.values():
        assert offsets == list(range(len(offsets)))  # contiguous, in order, no duplicates


async def test_send_and_wait_returns_offsets_and_timestamps(broker) -> None:
    async with Producer(broker.bootstrap, acks="durable") as producer:
        first = await producer.send_and_wait("acked", b"a", partition=2, timestamp_ms=1_600_000_000_000)
        second = await producer.send_and_wait("acked", b"b", partition=2)
    assert (first.topic, first.partition, first.offset, first.timestamp_ms) == ("acked", 2, 0, 1_600_000_000_000)
    assert second.offset == 1
    async with Admin(broker.bootstrap) as admin:
        assert await admin.list_offset("acked", 2, 1_600_000_000_000) == 0
        assert await admin.list_offset("acked", 2, "latest") == 2
        described = await admin.describe_topic("acked")
        assert described["partitions"][2]["durable_offset"] >= 2


async def test_keyless_records_rotate_over_partitions_by_batch(broker) -> None:
    async with Producer(broker.bootstrap, batch_bytes=1000) as producer:
        await producer.send_all("spread", [b"x" * 100 for _ in range(100)])
    async with Admin(broker.bootstrap) as admin:
        ends = [await admin.list_offset("spread", p, "latest") for p in range(3)]
    assert sum(ends) == 100 and all(end > 0 for end in ends)


async def test_consumer_start_positions(broker) -> None:
    async with Producer(broker.bootstrap) as producer:
        for index in range(10):
            await producer.send("pos", b"%d" % index, partition=0, timestamp_ms=1000 * (index + 1))
    from_offset = await consume_n(broker.bootstrap, "pos", 3, partitions=[0], start=7)
    assert [m.offset for m in from_offset] == [7, 8, 9]
    from_time = await consume_n(broker.bootstrap, "pos", 2, partitions=[0], start=("timestamp", 9000))
    assert [m.value for m in from_time] == [b"8", b"9"]
    async with Consumer(broker.bootstrap, "pos", partitions=[0], start="latest", max_wait_ms=100) as consumer:
        assert await consumer.getmany(timeout_s=0.3) == []
        async with Producer(broker.bootstrap) as producer:
            await producer.send("pos", b"new", partition=0)
        got = await consumer.getmany(timeout_s=5)
        assert [(m.offset, m.value) for m in got] == [(10, b"new")]


async def test_errors_surface_as_broker_errors(broker) -> None:
    async with Producer(broker.bootstrap) as producer:
        with pytest.raises(BrokerError) as caught:
            await producer.send("errs", b"x", partition=99)
        assert caught.value.code == ErrorCode.UNKNOWN_PARTITION
    with pytest.raises(BrokerError) as caught:
        async with Consumer(broker.bootstrap, "no-such-topic"):
            pass
    assert caught.value.code == ErrorCode.UNKNOWN_TOPIC


async def test_a_failed_batch_is_raised_by_flush(broker) -> None:
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic("shrinking", 2)
    producer = await Producer(broker.bootstrap, linger_ms=60_000).start()  # held until close()
    await producer.send("shrinking", b"x", partition=1)
    async with Admin(broker.bootstrap) as admin:
        await admin.delete_topic("shrinking")
        await admin.create_topic("shrinking", 1)  # the producer's cached partition 1 is gone
    with pytest.raises(ProduceError) as caught:
        await producer.close()
    assert isinstance(caught.value.errors[0], BrokerError)
    assert caught.value.errors[0].code == ErrorCode.UNKNOWN_PARTITION


async def test_backpressure_bounds_the_producer_buffer(broker) -> None:
    async with Producer(broker.bootstrap, max_buffer_bytes=64 << 10, batch_bytes=16 << 10, max_in_flight=2) as producer:
        peak = 0
        for _ in range(2000):
            await producer.send("bounded", b"v" * 1000)
            peak = max(peak, producer._buffered)
    assert peak < (64 << 10) + 2000


def test_sync_wrapper(broker) -> None:
    with SyncProducer(broker.bootstrap) as producer:
        meta = producer.send_and_wait("sync", b"hello", partition=0)
        producer.send("sync", b"world", partition=0)
    assert meta.offset == 0
    with SyncConsumer(broker.bootstrap, "sync", partitions=[0]) as consumer:
        messages = consumer.poll(timeout_s=5)
        assert [m.value for m in messages] == [b"hello", b"world"]
        assert consumer.positions == {0: 2}


async def test_retention_runs_in_the_broker_and_consumers_skip_to_the_log_start(tmp_path) -> None:
    process = brokerproc.BrokerProcess(tmp_path / "data", "--retention-check-s", "0.2").start()
    try:
        async with Admin(process.bootstrap) as admin:
            await admin.create_topic("short", 1, {"segment_bytes": 4096, "retention_ms": 1})
            async with Producer(process.bootstrap) as producer:
                for index in range(40):
                    await producer.send_and_wait("short", b"%03d" % index + b"." * 500, partition=0)
            start, previous = -1, -2
            for _ in range(50):  # until retention has deleted every sealed segment
                previous, start = start, await admin.list_offset("short", 0, "earliest")
                if start == previous and start > 0:
                    break
                await asyncio.sleep(0.5)
        assert 0 < start < 40
        async with Consumer(process.bootstrap, "short", start=0, max_wait_ms=100) as consumer:
            got = await consumer.getmany(timeout_s=5)
            assert got and got[0].offset == start
    finally:
        assert process.stop() == 0


async def test_raw_fetch_views_stay_intact_while_later_fetches_arrive(broker) -> None:
    async with Producer(broker.bootstrap, batch_bytes=512 << 10) as producer:
        for index in range(6000):
            await producer.send("views", b"%06d" % index * 170, partition=0)
    async with Consumer(broker.bootstrap, "views", partitions=[0], max_bytes=1 << 20) as consumer:
        held = []
        for _ in range(4):  # every response is a large frame (> 256 KiB)
            for _partition, data, _fetched_from in await consumer.fetch_raw():
                held.append((data, bytes(data)))
        assert len(held) >= 3
        for view, snapshot in held:
            assert view == snapshot  # no buffer was reused under a live view
        del view, held
        messages = []
        async with asyncio.timeout(20):
            async for batch in consumer.batches():
                messages += batch
                if consumer.positions[0] >= 6000:
                    break
    assert messages[-1].value == b"005999" * 170


async def test_producers_started_together_spread_keyless_records(broker) -> None:
    """Each producer starts its keyless rotation at a random partition: ten one-batch producers
    on a 12-partition topic landing all on one partition has odds of 12**-9."""
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic("burst", 12)
    for _ in range(10):
        async with Producer(broker.bootstrap) as producer:
            await producer.send_all("burst", [b"x" * 10 for _ in range(10)])
    async with Admin(broker.bootstrap) as admin:
        ends = [await admin.list_offset("burst", p, "latest") for p in range(12)]
    assert sum(ends) == 100 and sum(1 for end in ends if end) > 1


async def test_an_error_the_broker_cannot_correlate_fails_the_oldest_request(broker) -> None:
    """A header map with a non-string key is answered MALFORMED_FRAME with corr nil; responses
    come in order, so the waiting request fails at once instead of waiting out its timeout."""
    from rustmq.client.connection import Connection, parse_address

    connection = await Connection.open(*parse_address(broker.bootstrap))
    try:
        with pytest.raises(BrokerError) as caught:
            await connection.request({"api": 7, 1: 2}, timeout=5)
        assert caught.value.code == ErrorCode.MALFORMED_FRAME
        response = await connection.request({"api": 7}, timeout=5)  # the connection still serves
        assert response.header["error"] == 0
    finally:
        connection.close()


async def test_consumer_with_a_group_is_a_group_consumer(broker) -> None:
    from rustmq.client import GroupConsumer

    async with Producer(broker.bootstrap) as producer:
        await producer.send_all("grouped", [b"g%d" % i for i in range(30)])
    consumer = Consumer(broker.bootstrap, "grouped", group="via-consumer", max_wait_ms=200)
    assert isinstance(consumer, GroupConsumer) and consumer.group == "via-consumer"
    async with consumer:
        got: list = []
        async with asyncio.timeout(20):
            while len(got) < 30:
                got.extend(await consumer.getmany())
    assert sorted(m.value for m in got) == sorted(b"g%d" % i for i in range(30))
    with pytest.raises(TypeError):
        Consumer(broker.bootstrap, "grouped", group="g", partitions=[0])
    assert type(Consumer(broker.bootstrap, "grouped")) is Consumer


@pytest.mark.timeout(120)
async def test_batches_written_but_answered_too_late_are_retried_as_duplicates_not_failed(tmp_path) -> None:
    """Every durable answer takes the group committer's 40 ms and the producer waits 20 ms, so
    each batch is written, its request times out and it is sent again. The retry is recognised
    as a duplicate only among the producer's last five batches of the partition: the producer
    keeps at most five of them unresolved (before, the ninth batch went out while the first was
    retrying, and 253 of 256 batches failed with OUT_OF_ORDER_SEQUENCE although stored)."""
    process = brokerproc.BrokerProcess(tmp_path / "data", env={"RUSTMQ_GROUP_COMMIT_MS": "40"}).start()
    try:
        async with Admin(process.bootstrap) as admin:
            await admin.create_topic("late", 1)
        values = [b"%08d" % i + b"." * 1016 for i in range(64 * 128)]
        async with Producer(process.bootstrap, acks="durable", linger_ms=0, delivery_timeout_s=60) as producer:
            producer.request_timeout_s = 0.02  # after INIT_PRODUCER, which is durable too
            for start in range(0, len(values), 64):
                await producer.send_batch("late", values[start:start + 64], partition=0)
            await producer.flush()
        got = await consume_n(process.bootstrap, "late", len(values))
        assert [m.value for m in got] == values  # each once, in order
        assert [m.offset for m in got] == list(range(len(values)))
    finally:
        assert process.stop() == 0
