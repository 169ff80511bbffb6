"""The issue-4 stress tests over real sockets against a real broker process: 10 producers and
5 consumers, 100,000 messages, and the exact set received checked.

Producers and consumers are asyncio tasks of the test process, each with its own connection(s),
running at the same time (consumers start before the producers finish). Queue consumers settle
with batched acks (`ack_many`, one request per partition per batch) so the test stays well under a
minute on the 2-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from rustmq.client.admin import Admin
from rustmq.client.groups import GroupConsumer
from rustmq.client.producer import Producer
from rustmq.client.queues import QueueConsumer, QueueMessage

PRODUCERS = 10
CONSUMERS = 5
PER_PRODUCER = 10_000
TOTAL = PRODUCERS * PER_PRODUCER
PARTITIONS = 6
DEADLINE_S = 90.0


def _value(producer: int, index: int) -> bytes:
    return b"%d:%d" % (producer, index)


async def _produce_all(bootstrap: str, topic: str, partitions: int) -> set[bytes]:
    """Every producer spreads its records over all partitions (explicit partition numbers)."""
    async def one(producer_index: int) -> None:
        async with Producer(bootstrap, linger_ms=5) as producer:
            for i in range(PER_PRODUCER):
                await producer.send(topic, _value(producer_index, i), partition=(producer_index + i) % partitions)
        # leaving the block flushes: every record is acknowledged by the broker or this raises

    await asyncio.gather(*(one(p) for p in range(PRODUCERS)))
    return {_value(p, i) for p in range(PRODUCERS) for i in range(PER_PRODUCER)}


def _nacked_first_time(value: bytes) -> bool:
    return int(value.rsplit(b":", 1)[1]) % 10 == 0  # 1,000 per producer, 10,000 in all


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["all-ack", "nack-tenth-once", "consumer-dies"])
async def test_queue_10_producers_5_consumers_100k_exact_set(broker, mode: str) -> None:
    """all-ack: every message delivered and acked exactly once. nack-tenth-once: a tenth is
    nacked on its first delivery and acked on its second. consumer-dies: one consumer drops its
    connection holding a leased, unacked batch of up to 1,000 (what the broker sees when a
    consumer process dies; tests/groups_e2e/test_queues_e2e.py SIGKILLs one): exactly that batch
    is redelivered, to the others."""
    topic, subscription = "stress-queue", "workers"
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic(topic, partitions=PARTITIONS)
    deliveries: list[list[tuple[bytes, int]]] = [[] for _ in range(CONSUMERS)]  # (value, attempt)
    acked_values: Counter[bytes] = Counter()
    abandoned: set[bytes] = set()
    newly_acked = 0
    nacked = 0
    started = time.monotonic()

    def nack_now(message: QueueMessage) -> bool:
        return mode == "nack-tenth-once" and message.attempt == 1 and _nacked_first_time(message.value)

    async def consume(index: int) -> None:
        nonlocal newly_acked, nacked
        batches = 0
        async with QueueConsumer(broker.bootstrap, topic, subscription, max_messages=1000, max_wait_ms=100) as consumer:
            while newly_acked < TOTAL:
                assert time.monotonic() - started < DEADLINE_S, f"only {newly_acked} of {TOTAL} acked"
                batch = await consumer.receive_batch()
                deliveries[index].extend((m.value, m.attempt) for m in batch)
                if not batch:
                    continue
                batches += 1
                if mode == "consumer-dies" and index == 0 and batches == 4:
                    abandoned.update(m.value for m in batch)
                    return  # closes the connection: its leases fail and are delivered again
                retry = [m for m in batch if nack_now(m)]
                done = [m for m in batch if not nack_now(m)]
                if retry:
                    await consumer.nack_many(retry, reason="stress")
                    nacked += len(retry)
                if done:
                    acked_now = await consumer.ack_many(done)  # not `+= await`: that reads before awaiting
                    newly_acked += acked_now
                    acked_values.update(m.value for m in done)

    consumers = [asyncio.create_task(consume(i)) for i in range(CONSUMERS)]
    sent = await _produce_all(broker.bootstrap, topic, PARTITIONS)
    await asyncio.wait_for(asyncio.gather(*consumers), DEADLINE_S)
    elapsed = time.monotonic() - started

    assert len(sent) == TOTAL
    assert newly_acked == TOTAL  # the broker counted every ack as new: none acked twice
    assert set(acked_values) == sent and max(acked_values.values()) == 1  # none lost, each acked once
    everything = [d for part in deliveries for d in part]
    firsts = [v for v, attempt in everything if attempt == 1]
    assert len(firsts) == TOTAL and set(firsts) == sent  # every message delivered once first
    redeliveries = sorted((v, attempt) for v, attempt in everything if attempt > 1)
    if mode == "nack-tenth-once":
        expected = {v for v in sent if _nacked_first_time(v)}
        assert nacked == len(expected) == TOTAL // 10
    elif mode == "consumer-dies":
        expected = abandoned
        assert abandoned and nacked == 0
    else:
        expected = set()  # all acked, no lease expired: no duplicate at all
    assert redeliveries == sorted((v, 2) for v in expected)  # exactly those, once more
    assert all(deliveries), [len(part) for part in deliveries]  # competing consumers shared the work

    async with Admin(broker.bootstrap) as admin:
        described = await admin.describe_queue(topic, subscription)
        ends = {p["partition"]: p["end_offset"] for p in (await admin.describe_topic(topic))["partitions"]}
    partitions = described["partitions"]
    assert {p["partition"]: p["ack_floor"] for p in partitions} == ends  # everything settled
    assert sum(p["acked"] for p in partitions) == TOTAL
    assert sum(p["nacked"] for p in partitions) == nacked
    assert sum(p["redelivered"] for p in partitions) == len(expected)
    assert sum(p["in_flight"] + p["lease_expired"] + p["dead_lettered"] + p["expired"] for p in partitions) == 0
    print(f"queue stress ({mode}): {TOTAL} messages in {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_group_10_producers_5_members_100k_exact_set(broker) -> None:
    topic, group = "stress-stream", "readers"
    async with Admin(broker.bootstrap) as admin:
        await admin.create_topic(topic, partitions=10)
    members = [await GroupConsumer(broker.bootstrap, topic, group=group, max_wait_ms=100).start()
               for _ in range(CONSUMERS)]
    try:
        # Let the five joins settle into one generation where every member owns two partitions,
        # so the run below has no rebalance (and therefore no at-least-once duplicate).
        for _ in range(300):
            for member in members:
                await member._maybe_adopt()
            if (len({m.generation for m in members}) == 1
                    and sorted(tp for m in members for tp in m.assignment) == [(topic, p) for p in range(10)]):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError([(m.generation, m.assignment) for m in members])
        generation = members[0].generation
        received: list[list[bytes]] = [[] for _ in range(CONSUMERS)]
        started = time.monotonic()

        async def consume(index: int) -> None:
            member = members[index]
            while sum(map(len, received)) < TOTAL:
                assert time.monotonic() - started < DEADLINE_S, f"only {sum(map(len, received))} received"
                received[index].extend(m.value for m in await member.getmany())
            await member.commit()

        consumers = [asyncio.create_task(consume(i)) for i in range(CONSUMERS)]
        sent = await _produce_all(broker.bootstrap, topic, 10)
        await asyncio.wait_for(asyncio.gather(*consumers), DEADLINE_S)
        elapsed = time.monotonic() - started
        assert {m.generation for m in members} == {generation}  # no rebalance happened
        everything = [v for part in received for v in part]
        assert set(everything) == sent  # none lost
        assert len(everything) == TOTAL  # none duplicated (no rebalance, see above)
        assert all(received), [len(part) for part in received]
        committed = await members[0].committed()
    finally:
        for member in members:
            await member.close()
    async with Admin(broker.bootstrap) as admin:
        ends = {(topic, p["partition"]): p["end_offset"] for p in (await admin.describe_topic(topic))["partitions"]}
    assert committed == ends  # what was received was committed, partition by partition
    print(f"group stress: {TOTAL} messages in {elapsed:.1f} s")
