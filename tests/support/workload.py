"""The steady acks=all workload the cluster tests run their faults under, recorded for the checker.

Writers send one record at a time with acks=all, each with a key of its own (so each stays on
one partition and its acknowledgements are ordered), and record every outcome in a
`checker.History`: acknowledged with partition and offset, or of unknown outcome when the send
raised after the producer's own retries. One consumer reads the topic from the start: a plain
one, or with `group` a group member (the broker assigns its partitions and keeps its committed
offsets, so the group's coordinator moving is part of what is tested). `external` makes every
client use the brokers' external addresses (a test host outside a real cluster). `run`
warms up, runs the scenario (the fault), lets the load settle, stops the writers and waits until
the consumer has read every acknowledged record (or the drain time is up), then checks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from checker import History
from rustmq.client.consumer import Consumer
from rustmq.client.producer import Producer


@dataclass
class AcksAllLoad:
    bootstrap: str
    topic: str
    writers: int = 3
    request_timeout_s: float = 5.0
    delivery_timeout_s: float = 30.0
    pause_s: float = 0.0  # between one writer's sends; 0 is flat out
    history: History = field(default_factory=History)
    acked_at: list[float] = field(default_factory=list)  # monotonic time of every acknowledgement
    failures: list[str] = field(default_factory=list)  # sends that raised after the producer's retries
    group: str | None = None  # read as a member of this consumer group instead of a plain consumer
    external: bool = False  # reach the brokers at their advertised external addresses
    read_times: list[float] = field(default_factory=list)  # monotonic time of every batch read
    client_rack: str | None = None  # the consumer reads from an in-sync replica in this rack
    consumer: Any = None

    async def run(self, scenario: Callable[[], Awaitable[None]], *, warmup_s: float = 2.0,
                  settle_s: float = 3.0, drain_s: float = 40.0) -> dict[str, Any]:
        """Load, then `scenario()`, then `settle_s` more of load; the checker's report plus
        ``failed_sends`` and ``failure_examples``."""
        stop = asyncio.Event()
        if self.group is None:
            consumer = await Consumer(self.bootstrap, self.topic, start="earliest", max_wait_ms=200, timeout_s=5,
                                      external=self.external, client_rack=self.client_rack).start()
        else:
            consumer = await Consumer(self.bootstrap, self.topic, group=self.group, start="earliest",
                                      max_wait_ms=200, timeout_s=15, external=self.external,
                                      client_rack=self.client_rack).start()
        self.consumer = consumer
        loop = asyncio.get_running_loop()
        reading = loop.create_task(self._read(consumer))
        writers = [loop.create_task(self._write(index, stop)) for index in range(self.writers)]
        stopped_at = float("inf")
        try:
            await asyncio.sleep(warmup_s)
            await scenario()
            await asyncio.sleep(settle_s)
            stopped_at = time.monotonic()
            stop.set()
            await asyncio.wait_for(asyncio.gather(*writers), 60)
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline and any(v not in self.history.read_at for v in self.history.ok):
                await asyncio.sleep(0.2)
                if reading.done():
                    reading.result()
        finally:
            stop.set()
            reading.cancel()
            await asyncio.gather(reading, *writers, return_exceptions=True)
            await consumer.close()
        report = self.history.check()
        report["failed_sends"] = len(self.failures)
        report["failure_examples"] = self.failures[:3]
        # A consumer that is stuck reads nothing while the writers get acknowledgements: the
        # longest pause between two reads while the load ran says whether it ever was.
        reads = [t for t in self.read_times if t <= stopped_at]
        report["longest_read_gap_s"] = round(max((b - a for a, b in zip(reads, reads[1:], strict=False)), default=0.0), 2)
        if report["lost"]:
            missing = sorted(self.history.ok[v] for v in self.history.ok if v not in self.history.read_at)
            report["diagnosis"] = {"first_missing": missing[:3], "last_missing": missing[-3:],
                                   "consumer_positions": {str(k): v for k, v in consumer.positions.items()},
                                   "consumer_hw": getattr(consumer, "high_watermarks", None)}
        return report

    async def _write(self, index: int, stop: asyncio.Event) -> None:
        async with Producer(self.bootstrap, acks="all", linger_ms=0, request_timeout_s=self.request_timeout_s,
                            delivery_timeout_s=self.delivery_timeout_s, external=self.external) as producer:
            seq = 0
            while not stop.is_set():
                value = b"w%d-%d" % (index, seq)
                seq += 1
                try:
                    meta = await producer.send_and_wait(self.topic, value, key=b"writer-%d" % index)
                except Exception as exc:
                    self.failures.append(repr(exc))
                    self.history.info(value)  # outcome unknown: may or may not be stored
                    producer._errors.clear()
                else:
                    self.acked_at.append(time.monotonic())
                    self.history.acked(f"w{index}", value, meta.partition, meta.offset)
                if self.pause_s:
                    await asyncio.sleep(self.pause_s)

    async def _read(self, consumer: Any) -> None:
        if self.group is None:
            async for got in consumer.batches():
                self.read_times.append(time.monotonic())
                for message in got:
                    self.history.read(message.partition, message.offset, message.value)
            return
        while True:
            got = await consumer.getmany()
            if got:
                self.read_times.append(time.monotonic())
            for message in got:
                self.history.read(message.partition, message.offset, message.value)
