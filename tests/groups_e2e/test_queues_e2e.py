"""Queue subscriptions over the network against real broker processes: competing consumers,
redelivery after a consumer process is SIGKILLed, acks across broker restarts, dead letters
and their replay, delayed messages."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from rustmq.client.admin import Admin
from rustmq.client.consumer import Consumer
from rustmq.client.errors import BrokerError
from rustmq.client.queues import Queue, QueueConsumer
from rustmq.protocol.api import ErrorCode


async def _publish(bootstrap: str, topic: str, count: int) -> set[bytes]:
    async with Queue(bootstrap, topic) as queue:
        for i in range(count):
            await queue.publish(b"m-%d" % i, wait=False)
        await queue.flush()
    return {b"m-%d" % i for i in range(count)}


async def test_competing_consumers_share_the_work_exactly_once_when_all_ack(broker) -> None:
    sent = await _publish(broker.bootstrap, "work", 3000)
    received: list[list[bytes]] = [[], [], []]

    async def work(index: int) -> None:
        async with QueueConsumer(broker.bootstrap, "work", "workers", max_messages=50, max_wait_ms=200) as consumer:
            idle = 0
            while idle < 3:
                batch = await consumer.receive_batch()
                if not batch:
                    idle += 1
                    continue
                idle = 0
                received[index].extend(m.value for m in batch)
                assert await consumer.ack_many(batch) == len(batch)
                await asyncio.sleep(0.005)  # let the others compete

    await asyncio.gather(*(work(i) for i in range(3)))
    everything = [v for part in received for v in part]
    assert len(everything) == len(sent)  # nothing duplicated
    assert set(everything) == sent  # nothing lost
    assert all(part for part in received), [len(p) for p in received]


async def test_seed_shape_publish_receive_ack_nack(broker) -> None:
    async with Queue(broker.bootstrap, "orders") as queue:
        await queue.publish(b"order-123", key=b"user-1")
        async with queue.subscribe("billing", ack_wait_ms=60_000) as consumer:
            msg = await consumer.receive(timeout_s=5)
            assert msg is not None and msg.value == b"order-123" and msg.attempt == 1
            await msg.nack()
            again = await consumer.receive(timeout_s=5)
            assert again is not None and again.offset == msg.offset and again.attempt == 2
            await again.ack()
            assert await consumer.receive(timeout_s=0.5) is None


_KILLED_CONSUMER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from rustmq.client.queues import QueueConsumer
    async def main():
        consumer = await QueueConsumer(sys.argv[1], "jobs", "workers", max_messages=40).start()
        batch = await consumer.receive_batch(max_wait_ms=5000)
        await consumer.ack_many(batch[:10])
        print(",".join(str(m.partition) + ":" + str(m.offset) for m in batch), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # mid-batch: 30 records leased, not acked
    asyncio.run(main())
""")


async def test_consumer_killed_mid_batch_leads_to_redelivery(broker) -> None:
    sent = await _publish(broker.bootstrap, "jobs", 40)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _KILLED_CONSUMER, broker.bootstrap], capture_output=True, timeout=60
    )
    assert done.returncode == -9, done.stderr.decode()
    leased = done.stdout.decode().strip().split(",")
    assert len(leased) == 40
    acked_by_dead = set(leased[:10])
    async with QueueConsumer(broker.bootstrap, "jobs", "workers", max_wait_ms=300) as survivor:
        got = []
        for _ in range(20):
            batch = await survivor.receive_batch()
            got.extend(batch)
            await survivor.ack_many(batch)
            if len(got) >= 30:
                break
    redelivered = {f"{m.partition}:{m.offset}" for m in got}
    assert redelivered == set(leased) - acked_by_dead
    assert all(m.attempt == 2 for m in got)
    assert len(sent) == 40


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
async def test_acks_survive_a_broker_restart(make_broker, tmp_path, crash: bool) -> None:
    first = make_broker()
    sent = await _publish(first.bootstrap, "durable", 600)
    acked: set[bytes] = set()
    async with QueueConsumer(first.bootstrap, "durable", "subs", max_messages=100) as consumer:
        while len(acked) < 300:
            batch = await consumer.receive_batch()
            await consumer.ack_many(batch)  # answered only once the journal is fsynced
            acked.update(m.value for m in batch)
    if crash:
        first.kill()
    else:
        assert first.stop() == 0
    second = make_broker(tmp_path / "data")
    rest: list[bytes] = []
    async with QueueConsumer(second.bootstrap, "durable", "subs", max_messages=200, max_wait_ms=300) as consumer:
        for _ in range(20):
            batch = await consumer.receive_batch()
            rest.extend(m.value for m in batch)
            await consumer.ack_many(batch)
            if len(acked) + len(rest) >= len(sent) and not batch:
                break
    assert not acked & set(rest)  # acknowledged messages are never delivered again
    assert acked | set(rest) == sent
    assert len(rest) == len(set(rest))


async def test_dead_letter_after_max_deliveries_and_replay(broker) -> None:
    async with Queue(broker.bootstrap, "payments") as queue:
        await queue.publish(b"poison", key=b"k", headers=[("app", b"x")])
    async with QueueConsumer(broker.bootstrap, "payments", "svc", max_wait_ms=1000) as consumer:
        for attempt in range(1, 6):  # default max_deliveries = 5
            msg = await consumer.receive(timeout_s=5)
            assert msg is not None and msg.attempt == attempt
            await msg.nack(reason=f"failure {attempt}")
        assert await consumer.receive(timeout_s=0.5) is None
    dlq = "payments.svc.dlq"
    async with Consumer(broker.bootstrap, dlq, start="earliest") as reader:
        (dead,) = await reader.getmany(timeout_s=5)
    headers = dict(dead.headers)
    assert dead.value == b"poison" and dead.key == b"k"
    assert headers["rustmq-dlq-topic"] == b"payments"
    assert headers["rustmq-dlq-attempts"] == b"5"
    assert headers["rustmq-dlq-reason"] == b"failure 5"
    assert headers["app"] == b"x"

    from rustmq.client.queues import replay_dead_letters

    replayed = await replay_dead_letters(broker.bootstrap, dlq, dead.partition, [dead.offset])
    assert replayed["replayed"] == 1
    async with QueueConsumer(broker.bootstrap, "payments", "svc", max_wait_ms=1000) as consumer:
        msg = await consumer.receive(timeout_s=5)
        assert msg is not None and msg.value == b"poison" and msg.attempt == 1
        assert msg.header("rustmq-dlq-topic") is None and msg.header("app") == b"x"
        await msg.ack()


async def test_delayed_messages_are_never_early(broker) -> None:
    async with Queue(broker.bootstrap, "later") as queue:
        published = time.time()
        meta = await queue.publish(b"soon", delay_ms=1500)
        await queue.publish(b"now")
    assert meta is not None
    async with QueueConsumer(broker.bootstrap, "later", "s", max_wait_ms=3000) as consumer:
        first = await consumer.receive(timeout_s=5)
        assert first is not None and first.value == b"now"
        await first.ack()
        second = await consumer.receive(timeout_s=5)
        received = time.time()
        assert second is not None and second.value == b"soon"
        assert received * 1000 >= second.timestamp_ms + 1500
        assert received - published >= 1.5
        await second.ack()


async def test_bad_queue_requests_get_clear_errors(broker) -> None:
    await _publish(broker.bootstrap, "bad", 3)
    async with QueueConsumer(broker.bootstrap, "bad", "s") as consumer:
        batch = await consumer.receive_batch()
        assert batch
        conn = consumer._connection
        assert conn is not None
        with pytest.raises(BrokerError) as info:
            await conn.request({"api": 31, "subscription": "s", "topic": "bad", "partition": 0, "offsets": ["x"]})
        assert info.value.code is ErrorCode.INVALID_REQUEST
        with pytest.raises(BrokerError) as info:
            await conn.request({"api": 31, "subscription": "s", "topic": "bad", "partition": 0, "offsets": [10**9]})
        assert info.value.code is ErrorCode.INVALID_QUEUE_REQUEST
        with pytest.raises(BrokerError) as info:
            await conn.request({"api": 30, "subscription": "s", "topic": "nope"})
        assert info.value.code is ErrorCode.UNKNOWN_TOPIC
        assert await consumer.ack_many(batch) == len(batch)  # the connection still serves
    async with Admin(broker.bootstrap) as admin:
        assert "bad" in await admin.list_topics()


async def test_more_pipelined_acks_than_max_inflight_requests_are_all_answered(broker) -> None:
    """1,000 QUEUE_ACKs sent at once on one connection (max_inflight_requests is 256, and acks
    are answered after an fsync): the broker must resume reading buffered frames as slots free."""
    await _publish(broker.bootstrap, "pipelined", 1000)
    async with QueueConsumer(broker.bootstrap, "pipelined", "s", max_messages=1000, max_wait_ms=1000) as consumer:
        leased: list = []
        while len(leased) < 1000:
            leased.extend(await consumer.receive_batch())
        conn = consumer._connection
        assert conn is not None
        futures = [conn.send({"api": 31, "subscription": "s", "topic": "pipelined", "partition": m.partition,
                              "offsets": [m.offset]}) for m in leased]
        responses = await asyncio.wait_for(asyncio.gather(*futures), 30)  # type: ignore[arg-type]
        assert sum(r.header["acked"] for r in responses) == 1000
