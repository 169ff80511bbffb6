"""The synchronous wrappers of the queue and group clients, against a real broker process."""

from __future__ import annotations

import asyncio

from rustmq.client.queues import SyncQueue
from rustmq.client.sync import SyncGroupConsumer


def test_sync_queue_publish_receive_ack(broker) -> None:
    with SyncQueue(broker.bootstrap, "orders") as queue:
        queue.publish(b"order-123", key=b"customer-1")  # one key, one partition: in order
        queue.publish(b"order-124", key=b"customer-1")
        with queue.subscribe("workers") as consumer:
            first = consumer.receive(timeout_s=5)
            assert first is not None and first.value == b"order-123"
            first.ack()
            second = consumer.receive(timeout_s=5)
            assert second is not None and second.value == b"order-124"
            second.nack()
            again = consumer.receive(timeout_s=5)
            assert again is not None and again.offset == second.offset and again.attempt == 2
            again.ack()
            assert consumer.receive(timeout_s=0.3) is None


def test_sync_group_consumer_polls_and_commits(broker) -> None:
    with SyncQueue(broker.bootstrap, "stream") as queue:
        for i in range(20):
            queue.publish(b"%d" % i, wait=False)
    got = []
    with SyncGroupConsumer(broker.bootstrap, "stream", group="sync") as consumer:
        assert len(consumer.assignment) == 3
        while len(got) < 20:
            got.extend(consumer.poll(timeout_s=1.0))
        consumer.commit()
    assert sorted(int(m.value) for m in got) == list(range(20))
    assert not asyncio.events._get_running_loop()
