"""Stream consumer groups over the network against real broker processes: assignment and
rebalance on a clean leave and on a member that dies, fenced commits, committed offsets across
a broker restart, and idempotent produce (duplicates answered with the original offsets)."""

from __future__ import annotations

import asyncio
import time

import pytest

from rustmq.client.admin import Admin
from rustmq.client.connection import Connection
from rustmq.client.errors import BrokerError
from rustmq.client.groups import GroupConsumer
from rustmq.client.producer import Producer
from rustmq.protocol import batch as record_batch
from rustmq.protocol import records
from rustmq.protocol.api import ApiKey, ErrorCode


async def _wait_for(predicate, timeout_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_rebalance_when_a_member_leaves_and_when_one_dies(broker) -> None:
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic("events", 12)
    first = await GroupConsumer(broker.bootstrap, "events", group="g", session_timeout_ms=2000).start()
    second = await GroupConsumer(broker.bootstrap, "events", group="g", session_timeout_ms=2000).start()
    third = await GroupConsumer(broker.bootstrap, "events", group="g", session_timeout_ms=2000).start()
    try:
        members = [first, second, third]

        async def settled(timeout_s: float = 2.0) -> None:
            for _ in range(int(timeout_s / 0.02)):
                for m in members:
                    await m._maybe_adopt()
                gens = {m.generation for m in members}
                owned = [tp for m in members for tp in m.assignment]
                if len(gens) == 1 and sorted(owned) == [("events", p) for p in range(12)]:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError([(m.generation, m.assignment) for m in members])

        await settled()
        assert sorted(len(m.assignment) for m in members) == [4, 4, 4]
        kept = set(first.assignment)
        # A clean leave: the others own everything within one long-poll round trip.
        await third.close()
        members = [first, second]
        started = time.monotonic()
        await settled()
        assert time.monotonic() - started < 1.0
        assert kept <= set(first.assignment)  # sticky: nobody else's partitions moved
        # A member that dies (connections dropped, no leave): after its session timeout.
        for connection in (second._data, second._membership):
            assert connection is not None
            connection.close()
        assert second._heartbeats is not None
        second._heartbeats.cancel()
        members = [first]
        started = time.monotonic()
        await settled(timeout_s=6.0)
        assert time.monotonic() - started >= 1.0  # not before its 2 s session could expire (minus slack)
    finally:
        await first.close()
        await second.close(leave=False)


async def test_group_consumes_commits_and_restarts_from_committed(make_broker, tmp_path) -> None:
    broker = make_broker()
    async with Producer(broker.bootstrap) as producer:
        for i in range(300):
            await producer.send("stream", b"%d" % i, partition=i % 3)
    seen: list[bytes] = []
    async with GroupConsumer(broker.bootstrap, "stream", group="readers") as consumer:
        while len(seen) < 150:
            seen.extend(m.value for m in await consumer.getmany())
        await consumer.commit()
        committed = await consumer.committed()
    assert sum(committed.values()) == len(seen)
    assert broker.stop() == 0
    again = make_broker(tmp_path / "data")
    rest: list[bytes] = []
    async with GroupConsumer(again.bootstrap, "stream", group="readers") as consumer:
        assert await consumer.committed() == committed
        while len(seen) + len(rest) < 300:
            rest.extend(m.value for m in await consumer.getmany())
    assert not set(seen) & set(rest)
    assert set(seen) | set(rest) == {b"%d" % i for i in range(300)}
    async with Admin(again.bootstrap) as admin:
        connection = admin._connection
        assert connection is not None
        described = (await connection.request({"api": int(ApiKey.DESCRIBE_GROUP), "group": "readers"})).header
        assert described["state"] == "empty"
        assert [lag for _, _, lag in described["lag"]] == [0, 0, 0]
        listed = (await connection.request({"api": int(ApiKey.LIST_GROUPS)})).header
        assert listed["groups"] == ["readers"]


async def test_a_stale_generation_cannot_commit(broker) -> None:
    connection = await Connection.open("127.0.0.1", broker.consumer_port)
    try:
        join = {"api": int(ApiKey.JOIN_GROUP), "group": "f", "topics": ["default"]}
        a = (await connection.request(dict(join))).header
        b = (await connection.request(dict(join))).header
        assert b["generation"] == a["generation"] + 1
        with pytest.raises(BrokerError) as info:
            await connection.request({"api": int(ApiKey.COMMIT_OFFSETS), "group": "f", "member_id": a["member_id"],
                                      "generation": a["generation"], "offsets": [["default", 0, 1]]})
        assert info.value.code is ErrorCode.ILLEGAL_GENERATION
        with pytest.raises(BrokerError) as info:
            await connection.request({"api": int(ApiKey.HEARTBEAT), "group": "f", "member_id": "nobody", "generation": 1})
        assert info.value.code is ErrorCode.UNKNOWN_MEMBER
        with pytest.raises(BrokerError) as info:
            await connection.request({"api": int(ApiKey.JOIN_GROUP), "group": "f", "topics": ["default"], "session_timeout_ms": 5})
        assert info.value.code is ErrorCode.INVALID_SESSION_TIMEOUT
    finally:
        connection.close()


def _idempotent_batch(producer_id: int, sequence: int, values: list[bytes]) -> bytes:
    now = int(time.time() * 1000)
    body = records.encode_body([[0, None, v, None] for v in values])
    return record_batch.build_batch(body, record_count=len(values), first_timestamp_ms=now, max_timestamp_ms=now,
                                     producer_id=producer_id, producer_epoch=0, base_sequence=sequence)


async def test_idempotent_produce_answers_duplicates_with_original_offsets_across_restart(make_broker, tmp_path) -> None:
    broker = make_broker()
    connection = await Connection.open("127.0.0.1", broker.producer_port)
    header = {"api": int(ApiKey.PRODUCE_IDEMPOTENT), "topic": "exact", "partition": 1, "acks": 2}
    try:
        producer_id = (await connection.request({"api": int(ApiKey.INIT_PRODUCER)})).header["producer_id"]
        first = _idempotent_batch(producer_id, 0, [b"a", b"b"])
        written = (await connection.request(dict(header), first)).header
        retried = (await connection.request(dict(header), first)).header
        assert (retried["base_offset"], retried["last_offset"]) == (written["base_offset"], written["last_offset"])
        assert retried["duplicate_batches"] == 1 and written["duplicate_batches"] == 0
        with pytest.raises(BrokerError) as info:
            await connection.request(dict(header), _idempotent_batch(producer_id, 5, [b"gap"]))
        assert info.value.code is ErrorCode.OUT_OF_ORDER_SEQUENCE
    finally:
        connection.close()
    assert broker.stop() == 0
    assert (tmp_path / "data" / "coordination" / "producer_state" / "snapshot").exists()
    again = make_broker(tmp_path / "data")
    connection = await Connection.open("127.0.0.1", again.producer_port)
    try:
        retried = (await connection.request(dict(header), first)).header
        assert retried["base_offset"] == written["base_offset"] and retried["duplicate_batches"] == 1
        following = (await connection.request(dict(header), _idempotent_batch(producer_id, 2, [b"c"]))).header
        assert following["base_offset"] == written["last_offset"] + 1
        assert (await connection.request({"api": int(ApiKey.INIT_PRODUCER)})).header["producer_id"] != producer_id
    finally:
        connection.close()
    async with Admin(again.bootstrap) as admin:
        described = await admin.describe_topic("exact")
        assert described["partitions"][1]["end_offset"] == 3  # a, b, c: the retries wrote nothing
    # The SIGTERM above saved the producer tables; a SIGKILL saves nothing, so this start
    # rebuilds them from the batch headers, and retries are still recognised.
    third = _idempotent_batch(producer_id, 3, [b"d"])
    connection = await Connection.open("127.0.0.1", again.producer_port)
    try:
        written_third = (await connection.request(dict(header), third)).header
    finally:
        connection.close()
    again.kill()
    last = make_broker(tmp_path / "data")
    connection = await Connection.open("127.0.0.1", last.producer_port)
    try:
        for batch_bytes, offset in ((first, written["base_offset"]), (third, written_third["base_offset"])):
            retried = (await connection.request(dict(header), batch_bytes)).header
            assert retried["base_offset"] == offset and retried["duplicate_batches"] == 1
    finally:
        connection.close()


async def test_a_long_log_rebuilds_its_producer_table_in_steps_while_the_broker_serves(make_broker, tmp_path) -> None:
    """After a SIGKILL (no saved tables) the first idempotent produce to a partition with several
    MiB of log starts a stepwise rebuild and is answered LOAD_IN_PROGRESS; other requests are
    served meanwhile; retried, the same batch is recognised as the duplicate it is."""
    broker = make_broker()
    header = {"api": int(ApiKey.PRODUCE_IDEMPOTENT), "topic": "long", "partition": 0, "acks": 2}
    connection = await Connection.open("127.0.0.1", broker.producer_port)
    value = b"x" * 1000
    try:
        producer_id = (await connection.request({"api": int(ApiKey.INIT_PRODUCER)})).header["producer_id"]
        sequence = 0
        for _ in range(60):  # 60 batches of 100 records of ~1 KiB: about 6 MiB of log
            written = (await connection.request(dict(header), _idempotent_batch(producer_id, sequence, [value] * 100))).header
            sequence += 100
        last = _idempotent_batch(producer_id, sequence, [b"last"])
        original = (await connection.request(dict(header), last)).header
    finally:
        connection.close()
    assert written["last_offset"] == 5999
    broker.kill()
    again = make_broker(tmp_path / "data")
    connection = await Connection.open("127.0.0.1", again.producer_port)
    try:
        with pytest.raises(BrokerError) as info:
            await connection.request(dict(header), last)
        assert info.value.code is ErrorCode.LOAD_IN_PROGRESS
        listed = (await connection.request({"api": int(ApiKey.LIST_TOPICS)})).header  # served meanwhile
        assert "long" in str(listed)
        for _ in range(200):
            try:
                retried = (await connection.request(dict(header), last)).header
                break
            except BrokerError as error:
                assert error.code is ErrorCode.LOAD_IN_PROGRESS
                await asyncio.sleep(0.01)
        else:
            raise AssertionError("the producer table was not rebuilt within 2 s")
        assert retried["duplicate_batches"] == 1
        assert (retried["base_offset"], retried["last_offset"]) == (original["base_offset"], original["last_offset"])
    finally:
        connection.close()
    assert "rebuilt from" in again.log()


async def test_a_producer_name_bumps_its_epoch_and_fences_the_older_instance(make_broker, tmp_path) -> None:
    broker = make_broker()
    first = await Producer(broker.bootstrap, acks="durable", producer_name="etl").start()
    try:
        await first.send_and_wait("named", b"one", partition=0)
        second = await Producer(broker.bootstrap, acks="durable", producer_name="etl").start()
        assert (second.producer_id, second.producer_epoch) == (first.producer_id, first.producer_epoch + 1)
        await second.send_and_wait("named", b"two", partition=0)
        with pytest.raises(BrokerError) as info:  # the zombie is refused, not retried
            await first.send_and_wait("named", b"zombie", partition=0)
        assert info.value.code is ErrorCode.PRODUCER_FENCED
        await second.close()
        other = await Producer(broker.bootstrap, acks="durable", producer_name="other").start()
        assert other.producer_id != first.producer_id and other.producer_epoch == 0
        await other.close()
    finally:
        first._errors.clear()
        await first.close()
    broker.kill()  # the name's epoch is journaled: a restart continues from it
    again = make_broker(tmp_path / "data")
    third = await Producer(again.bootstrap, acks="durable", producer_name="etl").start()
    try:
        assert (third.producer_id, third.producer_epoch) == (first.producer_id, first.producer_epoch + 2)
    finally:
        await third.close()
    connection = await Connection.open("127.0.0.1", again.producer_port)
    try:
        with pytest.raises(BrokerError) as refused:
            await connection.request({"api": int(ApiKey.INIT_PRODUCER), "producer_name": ""})
        assert refused.value.code is ErrorCode.INVALID_REQUEST
    finally:
        connection.close()
