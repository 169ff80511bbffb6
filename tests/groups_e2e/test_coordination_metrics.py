"""/metrics of a real broker shows group lag, queue counters and in-flight leases at scrape time."""

from __future__ import annotations

import asyncio
import urllib.request

from rustmq.client.groups import GroupConsumer
from rustmq.client.queues import Queue, QueueConsumer


def _metrics(broker) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("rustmq_group") or line.startswith("rustmq_queue"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_lag_redeliveries_dead_letters_and_in_flight_leases(broker) -> None:
    async with Queue(broker.bootstrap, "m") as queue:
        for i in range(10):
            await queue.publish(b"%d" % i, key=b"same")  # one partition
    async with GroupConsumer(broker.bootstrap, "m", group="g") as group:
        got = []
        while len(got) < 4:
            got.extend(await group.getmany())
        partition = got[0].partition
        await group.commit({("m", partition): 4})
        scraped = await asyncio.to_thread(_metrics, broker)
    assert scraped[f'rustmq_group_lag{{group="g",partition="{partition}",topic="m"}}'] == 6
    assert scraped['rustmq_group_members{group="g"}'] == 1
    async with QueueConsumer(broker.bootstrap, "m", "s", max_messages=3) as consumer:
        batch = await consumer.receive_batch()
        await consumer.nack_many(batch[:1])
        for _ in range(4):  # the nacked one until it is dead-lettered (max deliveries 5)
            (again,) = [m for m in await consumer.receive_batch(1) if m.offset == batch[0].offset]
            await again.nack()
        scraped = await asyncio.to_thread(_metrics, broker)
    labels = f'{{partition="{partition}",subscription="s",topic="m"}}'
    assert scraped[f"rustmq_queue_in_flight{labels}"] == 2
    assert scraped[f"rustmq_queue_redelivered_total{labels}"] == 4
    assert scraped[f"rustmq_queue_dead_lettered_total{labels}"] == 1
    assert scraped[f"rustmq_queue_expired_total{labels}"] == 0
