"""The asyncio Producer: per-partition batching with linger, in-flight limits and backpressure.

``send()`` appends a record to the open batch of its partition and returns at once unless the
producer already buffers ``max_buffer_bytes`` (then it waits: backpressure). A batch is sealed
when it reaches ``batch_bytes`` or ``linger_ms`` after its first record, encoded with one
msgpack call (rustmq.protocol.records), compressed per ``codec``, framed by
rustmq.protocol.batch and sent as one PRODUCE request; at most ``max_in_flight`` requests wait
for responses at a time. Delivery errors are raised by ``flush()``/``close()`` as ProduceError
and by the future returned from ``send_and_wait()``.

Idempotent by default (``idempotent=True``, unless acks is "none"): ``start()`` asks the broker
for a producer id (INIT_PRODUCER), batches carry it with a per-partition base_sequence numbered
in dispatch order, and go out as PRODUCE_IDEMPOTENT, so a retry (after NOT_LEADER, a lost
connection or a timeout: rustmq.client.routing) is stored once; a batch answered
OUT_OF_ORDER_SEQUENCE waits for its predecessor's retry. Against a cluster the leader's producer
table is rebuilt from the replicated log when leadership moves, so dedup survives a failover.
With ``producer_name`` (Kafka's transactional id) the id belongs to the name: each start gets
the name's id with its epoch bumped from the name's coordinator (FIND_COORDINATOR, as groups),
and a partition leader that has seen the newer epoch refuses the older instance's batches with
PRODUCER_FENCED (raised, never retried).

Partitioning: an explicit partition wins; a key picks crc32c(key) % partitions (the broker's
own rule); keyless records stick to one partition per batch and move round-robin to the next
partition whenever a batch is sealed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, Iterable
from typing import Any, NamedTuple

from rustmq.client.connection import check, response_within
from rustmq.client.errors import BrokerError, ProduceError
from rustmq.client.routing import Routes, backoff, retriable
from rustmq.protocol import batch as record_batch
from rustmq.protocol import records
from rustmq.protocol.api import ApiKey, ErrorCode, partition_for_key

ACKS = {"none": 0, "leader": 1, "durable": 2, "all": 3}
SEQUENCE_MODULUS = 1 << 31
# An idempotent producer's batches of one partition outstanding at once (sent and not answered,
# or waiting to be sent again): the broker recognises a retried batch as a duplicate only among
# the producer's last RECENT_BATCHES (5) batches of the partition (rustmq.coordination.producers),
# so no batch may be sent while one five places before it is unresolved (Kafka's limit too).
IDEMPOTENT_WINDOW = 5


class RecordMetadata(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class _Window:
    """The IDEMPOTENT_WINDOW of one partition: batches are numbered in dispatch order and batch
    n waits until every batch before n - IDEMPOTENT_WINDOW + 1 is resolved. O(1) per batch."""

    __slots__ = ("next", "oldest", "resolved", "waiting")

    def __init__(self) -> None:
        self.next = 0  # the number of the next batch dispatched
        self.oldest = 0  # the first batch not resolved yet
        self.resolved: set[int] = set()  # resolved, but after `oldest`
        self.waiting: dict[int, asyncio.Future[None]] = {}

    def take(self) -> int:
        number = self.next
        self.next += 1
        return number

    async def turn(self, number: int) -> None:
        if number < self.oldest + IDEMPOTENT_WINDOW:
            return
        future = self.waiting[number] = asyncio.get_running_loop().create_future()
        await future

    def resolve(self, number: int) -> None:
        self.resolved.add(number)
        before = self.oldest
        while self.oldest in self.resolved:
            self.resolved.discard(self.oldest)
            self.oldest += 1
        for ready in range(before + IDEMPOTENT_WINDOW, self.oldest + IDEMPOTENT_WINDOW):
            future = self.waiting.pop(ready, None)
            if future is not None and not future.done():
                future.set_result(None)


class _Batch:
    __slots__ = ("topic", "partition", "records", "size", "first_ts", "max_ts", "waiters", "timer", "sequence",
                 "number")

    def __init__(self, topic: str, partition: int, first_ts: int) -> None:
        self.topic = topic
        self.partition = partition
        self.records: list[list[Any]] = []
        self.size = 0
        self.first_ts = first_ts
        self.max_ts = first_ts
        self.waiters: list[tuple[int, asyncio.Future[RecordMetadata]]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.sequence = -1  # idempotent producer: the base_sequence of this batch
        self.number = -1  # idempotent producer: its place in its partition's _Window


class Producer:
    def __init__(
        self,
        bootstrap: str = "localhost:9092",
        *,
        acks: str = "leader",
        linger_ms: float = 5.0,
        batch_bytes: int = 256 << 10,
        max_in_flight: int = 8,
        max_buffer_bytes: int = 64 << 20,
        codec: str = "none",
        request_timeout_s: float = 30.0,
        delivery_timeout_s: float = 60.0,
        external: bool = False,
        idempotent: bool = True,
        producer_name: str | None = None,
    ) -> None:
        if acks not in ACKS:
            raise ValueError(f"acks must be one of {', '.join(ACKS)}")
        if codec not in records.CODEC_NAMES:
            raise ValueError(f"codec must be one of {', '.join(records.CODEC_NAMES)}")
        self.bootstrap = bootstrap
        self.acks = acks
        self.linger_s = linger_ms / 1000
        self.batch_bytes = batch_bytes
        self.max_in_flight = max_in_flight
        self.max_buffer_bytes = max_buffer_bytes
        self.codec = records.CODEC_NAMES[codec]
        self.request_timeout_s = request_timeout_s
        self.delivery_timeout_s = delivery_timeout_s  # retries (cluster failover) stop after this
        self.external = external  # cluster outside Kubernetes: use the brokers' external addresses
        # Idempotent (default unless acks none): a broker-assigned producer id and per-partition
        # sequence numbers, so a retried batch is stored once (rustmq.coordination.producers).
        self.idempotent = idempotent and acks != "none"
        if producer_name is not None and not self.idempotent:
            raise ValueError("producer_name needs an idempotent producer (idempotent=True, acks not 'none')")
        self.producer_name = producer_name
        self.producer_id = -1
        self.producer_epoch = -1
        self._sequences: dict[tuple[str, int], int] = {}
        self._windows: dict[tuple[str, int], _Window] = {}
        self._routes: Routes | None = None
        self._partitions: dict[str, int] = {}
        self._open: dict[tuple[str, int], _Batch] = {}
        self._sticky: dict[str, int] = {}
        self._buffered = 0
        self._space = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._errors: list[BaseException] = []
        self.messages_sent = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Producer:
        self._routes = Routes(self.bootstrap, timeout=self.request_timeout_s, external=self.external)
        await self._routes.metadata([])
        if self.producer_name is not None:
            await self._init_named()
        elif self.idempotent:
            connection = await self._routes.any_connection()
            response = await connection.request({"api": int(ApiKey.INIT_PRODUCER)}, timeout=self.request_timeout_s)
            self.producer_id = int(response.header["producer_id"])
            self.producer_epoch = int(response.header["producer_epoch"])
        self._slots = asyncio.Semaphore(self.max_in_flight)
        return self

    async def _init_named(self) -> None:
        """INIT_PRODUCER with the name at its coordinator, retried while the coordinator moves."""
        routes = self._routes
        assert routes is not None
        deadline = time.monotonic() + self.delivery_timeout_s
        attempt = 0
        while True:
            try:
                connection = await routes.any_connection()
                if routes.clustered:
                    found = (await connection.request({"api": int(ApiKey.FIND_COORDINATOR), "group": self.producer_name},
                                                      timeout=self.request_timeout_s)).header
                    connection = await routes.connection(found["host"], found["producer_port"])
                response = await connection.request({"api": int(ApiKey.INIT_PRODUCER), "producer_name": self.producer_name},
                                                    timeout=self.request_timeout_s)
                self.producer_id = int(response.header["producer_id"])
                self.producer_epoch = int(response.header["producer_epoch"])
                return
            except Exception as exc:
                moved = isinstance(exc, BrokerError) and exc.code == ErrorCode.NOT_COORDINATOR
                if not (moved or retriable(exc, routes.clustered)) or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                try:
                    await routes.metadata([])
                except Exception:  # no broker answered: the next attempt retries that too
                    pass

    async def close(self) -> None:
        """Send what is buffered, wait for it, close; raise ProduceError if anything failed."""
        try:
            await self.flush()
        finally:
            if self._routes is not None:
                self._routes.close()

    async def __aenter__(self) -> Producer:
        return await self.start()

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            await self.close()
        elif self._routes is not None:
            self._routes.close()

    # -- sending --------------------------------------------------------------------------------

    async def partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            assert self._routes is not None, "call start() first"
            count = self._partitions[topic] = await self._routes.partitions(topic, create=True)
        return count

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Buffer one record; waits only when max_buffer_bytes are already buffered."""
        self._append(topic, value, key, partition, headers, timestamp_ms, await self.partition_count(topic))
        if self._buffered >= self.max_buffer_bytes:
            await self._wait_for_space()

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> RecordMetadata:
        """Buffer one record and wait until the broker acknowledged it (acks none: until sent)."""
        batch, index = self._append(topic, value, key, partition, headers, timestamp_ms, await self.partition_count(topic))
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        if batch.waiters is None:
            batch.waiters = []
        batch.waiters.append((index, future))
        return await future

    async def send_batch(self, topic: str, values: list[bytes], *, partition: int | None = None, key: bytes | None = None) -> None:
        """Send values as one batch right away, bypassing linger (a fast path for bulk loads)."""
        count = await self.partition_count(topic)
        now = int(time.time() * 1000)
        chosen = self._choose(topic, partition, key, count)
        batch = _Batch(topic, chosen, now)
        batch.records = [[0, key, value, None] for value in values]
        batch.size = sum(map(len, values))
        self._buffered += batch.size
        self._dispatch(batch)
        if self._buffered >= self.max_buffer_bytes:
            await self._wait_for_space()

    async def send_all(self, topic: str, values: Iterable[bytes] | AsyncIterable[bytes]) -> int:
        """Sink form: send every value of an (async) iterable, then flush; returns the count."""
        sent = 0
        if isinstance(values, AsyncIterable):
            async for value in values:
                await self.send(topic, value)
                sent += 1
        else:
            for value in values:
                await self.send(topic, value)
                sent += 1
        await self.flush()
        return sent

    async def flush(self) -> None:
        """Seal every open batch and wait for all requests; ProduceError if any batch failed."""
        for batch in list(self._open.values()):
            self._seal(batch)
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        if self._errors:
            errors, self._errors = self._errors, []
            raise ProduceError(errors)

    # -- internals ------------------------------------------------------------------------------

    def _choose(self, topic: str, partition: int | None, key: bytes | None, count: int) -> int:
        if partition is not None:
            if not 0 <= partition < count:
                raise BrokerError(ErrorCode.UNKNOWN_PARTITION, f"topic {topic!r} has {count} partitions")
            return partition
        if key is not None:
            return partition_for_key(key, count)
        sticky = self._sticky.get(topic)
        if sticky is None:
            # Each producer starts its rotation at a random partition, so producers started
            # together spread over the topic instead of all filling partition 0 first.
            sticky = self._sticky[topic] = random.randrange(count)
        return sticky % count

    def _append(
        self, topic: str, value: bytes | None, key: bytes | None, partition: int | None,
        headers: list[tuple[str, bytes]] | None, timestamp_ms: int | None, count: int,
    ) -> tuple[_Batch, int]:
        chosen = self._choose(topic, partition, key, count)
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        batch = self._open.get((topic, chosen))
        if batch is None:
            batch = self._open[(topic, chosen)] = _Batch(topic, chosen, now)
            batch.timer = asyncio.get_running_loop().call_later(self.linger_s, self._seal, batch)
        delta = now - batch.first_ts
        if delta < 0:  # an earlier explicit timestamp: keep deltas non-negative
            batch.first_ts = now
            for record in batch.records:
                record[0] -= delta
            delta = 0
        elif now > batch.max_ts:
            batch.max_ts = now
        batch.records.append([delta, key, value, headers])
        size = (len(value) if value else 0) + (len(key) if key else 0) + 16
        batch.size += size
        self._buffered += size
        self.messages_sent += 1
        index = len(batch.records) - 1
        if batch.size >= self.batch_bytes:
            self._seal(batch)
        return batch, index

    def _seal(self, batch: _Batch) -> None:
        key = (batch.topic, batch.partition)
        if self._open.get(key) is not batch:
            return
        del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
        self._sticky[batch.topic] = self._sticky.get(batch.topic, 0) + 1
        self._dispatch(batch)

    def _dispatch(self, batch: _Batch) -> None:
        if self.idempotent:  # numbered in dispatch order, which is the order within a partition
            key = (batch.topic, batch.partition)
            batch.sequence = self._sequences.get(key, 0)
            self._sequences[key] = (batch.sequence + len(batch.records)) % SEQUENCE_MODULUS
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window()
            batch.number = window.take()
        task = asyncio.get_running_loop().create_task(self._send_batch(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send_batch(self, batch: _Batch) -> None:
        assert self._slots is not None and self._routes is not None
        routes = self._routes
        window = self._windows.get((batch.topic, batch.partition)) if self.idempotent else None
        try:
            if window is not None:
                await window.turn(batch.number)
            payload = record_batch.build_batch(
                records.encode_body(batch.records, self.codec),
                record_count=len(batch.records),
                first_timestamp_ms=batch.first_ts,
                max_timestamp_ms=batch.max_ts,
                codec=record_batch.Codec(self.codec),
                producer_id=self.producer_id,
                producer_epoch=self.producer_epoch,
                base_sequence=batch.sequence,
            )
            api = ApiKey.PRODUCE_IDEMPOTENT if self.idempotent else ApiKey.PRODUCE
            header = {"api": int(api), "topic": batch.topic, "partition": batch.partition, "acks": ACKS[self.acks]}
            deadline = time.monotonic() + self.delivery_timeout_s
            attempt = 0
            while True:
                try:
                    async with self._slots:
                        connection = await routes.leader_connection(batch.topic, batch.partition)
                        await connection.drain()
                        if self.acks == "none":
                            connection.send(header, payload, expect_response=False)
                            base = -1
                        else:
                            future = connection.send(header, payload)
                            assert future is not None
                            response = check(await response_within(future, self.request_timeout_s))
                            base = int(response.header["base_offset"])
                    break
                except Exception as exc:
                    # With idempotence a retry cannot duplicate, and a later batch answered
                    # OUT_OF_ORDER_SEQUENCE waits for its predecessor's retry to land.
                    reordered = (self.idempotent and isinstance(exc, BrokerError)
                                 and exc.code == ErrorCode.OUT_OF_ORDER_SEQUENCE)
                    if not (retriable(exc, routes.clustered) or reordered) or time.monotonic() >= deadline:
                        raise
                    routes.invalidate(batch.topic)
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    if batch.topic not in routes.leaders:
                        try:
                            await routes.metadata([batch.topic])
                        except Exception:  # no broker answered: the next attempt retries that too
                            pass
            if batch.waiters:
                for index, waiter in batch.waiters:
                    if not waiter.done():
                        offset = base + index if base >= 0 else -1
                        waiter.set_result(RecordMetadata(batch.topic, batch.partition, offset, batch.first_ts + batch.records[index][0]))
        except Exception as exc:
            self._errors.append(exc)
            if batch.waiters:
                for _, waiter in batch.waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
        finally:
            if window is not None:
                window.resolve(batch.number)
            self._buffered -= batch.size
            if self._buffered < self.max_buffer_bytes:
                self._space.set()

    async def _wait_for_space(self) -> None:
        while self._buffered >= self.max_buffer_bytes:
            self._space.clear()
            await self._space.wait()
