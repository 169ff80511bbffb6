"""Queues with per-message acknowledgement: ``Queue.publish``, ``QueueConsumer.receive``,
``msg.ack()`` / ``msg.nack(delay_ms=...)`` / ``msg.extend()``.

A queue is a topic plus a named subscription kept by the broker (docs/semantics.md): every
consumer of one subscription competes for the topic's records, each record is leased to one
consumer at a time and is delivered again when its lease expires, it is nacked or its consumer
disconnects. ``Queue.publish`` is an ordinary produce that sets the delivery headers (delay,
deliver-at, TTL, priority)::

    async with Queue("localhost:9092", "orders") as queue:
        await queue.publish(b"order-123", key=b"user-1", delay_ms=5_000)
        async with queue.subscribe("workers") as consumer:
            while (msg := await consumer.receive()) is not None:
                process(msg.value)
                await msg.ack()

One QUEUE_FETCH brings up to ``max_messages`` leased records (whole batches on the wire; the
client keeps the leased offsets only). ``msg.ack()`` is individual (that record only, never
cumulative) but not one request each: it returns a future at once, and the acks issued in one
event-loop pass leave together as one QUEUE_ACK per partition (offset ranges), the way Pulsar
clients group acknowledgements. ``await msg.ack()`` waits until the broker made it durable;
a loop that awaits every ack therefore pays one round trip and one journal fsync per message.
``ack_many``/``nack_many`` settle a given set with one request per partition and report counts.

Against a cluster (METADATA says ``cluster``) the consumer talks to the coordinator of the
topic's queue subscriptions, found with FIND_COORDINATOR (``key_type: "queue"``; the leader of
the topic's partition of the internal topic, docs/cluster.md). NOT_COORDINATOR, a lost
connection or a timeout find the coordinator again and retry with backoff until
``timeout_s`` (fetches, acks, nacks and extends; an ack is idempotent, so a retried one is at
worst counted as a duplicate). After a failover the records this consumer held leased are
delivered again (leases are not replicated); acked ones are not.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, NamedTuple

from rustmq.client.connection import Connection, Response, check, parse_address, response_within
from rustmq.client.errors import BrokerError
from rustmq.client.messages import verified_batches
from rustmq.client.producer import Producer, RecordMetadata
from rustmq.client.routing import Routes, backoff, retriable
from rustmq.client.sync import SyncClient
from rustmq.protocol.api import ApiKey, ErrorCode

log = logging.getLogger(__name__)

DELAY_HEADER = "rustmq-delay-ms"
DELIVER_AT_HEADER = "rustmq-deliver-at-ms"
TTL_HEADER = "rustmq-ttl-ms"
PRIORITY_HEADER = "rustmq-priority"


def delivery_headers(*, delay_ms: int | None = None, deliver_at_ms: int | None = None, ttl_ms: int | None = None,
                     priority: int | None = None) -> list[tuple[str, bytes]]:
    """The record headers a queue reads (ASCII decimal values, docs/semantics.md)."""
    headers = []
    for name, value in ((DELAY_HEADER, delay_ms), (DELIVER_AT_HEADER, deliver_at_ms), (TTL_HEADER, ttl_ms),
                        (PRIORITY_HEADER, priority)):
        if value is not None:
            headers.append((name, str(int(value)).encode()))
    return headers


class QueueMessage(NamedTuple):
    """A leased record; settle it with ack(), nack() or keep it with extend().

    A tuple (built without a Python-level constructor call per record, like ``Message``)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Any
    attempt: int  # 1 on the first delivery
    deadline_ms: int  # the lease ends then (epoch ms)
    consumer: QueueConsumer

    def ack(self) -> asyncio.Future[None]:
        """Acknowledge this message. Returns at once with a future that resolves when the broker
        has made the ack durable; acks issued in the same event-loop pass travel together
        (one request per partition). Await it to know, or leave it: close() waits for it."""
        return self.consumer._ack_later(self)

    async def nack(self, delay_ms: int = 0, reason: str = "nack") -> None:
        await self.consumer.nack_many([self], delay_ms=delay_ms, reason=reason)

    async def extend(self, ack_wait_ms: int | None = None) -> bool:
        return await self.consumer.extend_many([self], ack_wait_ms=ack_wait_ms) == 1

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers or ():
            if key == name:
                return bytes(value)
        return None

    def __repr__(self) -> str:
        return f"QueueMessage({self.topic}/{self.partition}@{self.offset}, attempt={self.attempt})"


class QueueConsumer:
    """A competing consumer of one subscription; use ``async with`` or start()/close()."""

    def __init__(self, bootstrap: str = "localhost:9092", topic: str = "default", subscription: str = "default", *,
                 partition: int | None = None, max_messages: int = 500, ack_wait_ms: int | None = None,
                 max_wait_ms: int = 500, timeout_s: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.host, self.port = parse_address(bootstrap.split(",")[0].strip())
        self.topic = topic
        self.subscription = subscription
        self.partition = partition
        self.max_messages = max_messages
        self.ack_wait_ms = ack_wait_ms
        self.max_wait_ms = max_wait_ms
        self.timeout_s = timeout_s
        self._connection: Connection | None = None  # fetches: the broker leases to this connection
        # Acks, nacks and extends: each is answered only once its journal entry is fsynced, and a
        # connection answers in order, so on the fetch connection every fetch would wait behind
        # the previous batch's fsync. Settling is not tied to the leasing connection.
        self._settle_connection: Connection | None = None
        self._buffer: deque[QueueMessage] = deque()
        self._ack_group: dict[int, list[int]] = {}  # partition -> offsets acked this loop pass
        self._ack_group_done: asyncio.Future[None] | None = None
        self._acks_in_flight: set[asyncio.Future[None]] = set()
        self.ack_failures = 0  # grouped acks the broker did not confirm (the records come again)
        self.clustered = False
        self._routes: Routes | None = None
        self._generation = 0  # bumped whenever the connections move to a (new) coordinator
        self._moving: asyncio.Lock | None = None
        self.coordinator_moves = 0
        self._ack_tasks: set[asyncio.Task[list[Response]]] = set()

    async def start(self) -> QueueConsumer:
        try:
            self._routes = Routes(self.bootstrap, timeout=self.timeout_s)
            await self._routes.metadata([])
            self.clustered = self._routes.clustered
            self._moving = asyncio.Lock()
            if self.clustered:
                await self._connect_coordinator()
                return self
            host, port = self._routes._answered
            self._routes.close()
            self._routes = None
            self._connection = await Connection.open(host, port)
            self._settle_connection = await Connection.open(host, port)
        except BaseException:
            for connection in (self._connection, self._settle_connection):
                if connection is not None:
                    connection.close()
            if self._routes is not None:
                self._routes.close()
            raise
        return self

    # -- cluster: the coordinator ---------------------------------------------------------------

    @staticmethod
    def _retriable(exc: BaseException) -> bool:
        return retriable(exc, True) or (isinstance(exc, BrokerError) and exc.code == ErrorCode.NOT_COORDINATOR)

    async def _connect_coordinator(self) -> None:
        """(Re)open both connections at the coordinator of the topic's queue subscriptions,
        retried with backoff until timeout_s while it moves or is not elected yet."""
        assert self._routes is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        attempt = 0
        while True:
            try:
                connection = await self._routes.any_connection()
                found = (await connection.request({"api": int(ApiKey.FIND_COORDINATOR), "key_type": "queue",
                                                   "topic": self.topic}, timeout=self.timeout_s)).header
                address = (found["host"], found["consumer_port"])
                fetch = await Connection.open(*address, timeout=min(self.timeout_s, 10.0))
                try:
                    settle = await Connection.open(*address, timeout=min(self.timeout_s, 10.0))
                except BaseException:
                    fetch.close()
                    raise
                break
            except Exception as exc:
                if not self._retriable(exc) or loop.time() > deadline:
                    raise
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                with contextlib.suppress(Exception):
                    await self._routes.metadata([])  # the broker asked may be the one that died
        for old in (self._connection, self._settle_connection):
            if old is not None:
                old.close()
        self._connection, self._settle_connection = fetch, settle
        self._buffer.clear()  # leased by the old connection: they come again
        self._generation += 1

    async def _moved(self, generation: int, error: BaseException) -> None:
        """A request made on connections of `generation` failed retriably: move to the
        coordinator again unless another request did so meanwhile."""
        assert self._moving is not None
        async with self._moving:
            if self._generation != generation:
                return
            log.warning("queue %s/%s: coordinator lost (%s); finding it again", self.topic, self.subscription, error)
            self.coordinator_moves += 1
            await self._connect_coordinator()

    async def _request(self, header: dict[str, Any], timeout: float, *, settle: bool) -> Response:
        """A request on the fetch (or settle) connection; against a cluster retried at the
        (new) coordinator until timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        attempt = 0
        while True:
            generation = self._generation
            connection = self._settle_connection if settle else self._connection
            assert connection is not None, "call start() first"
            try:
                return check(await response_within(connection.send(dict(header)), timeout))  # type: ignore[arg-type]
            except Exception as exc:
                if not self.clustered or not self._retriable(exc) or loop.time() > deadline:
                    raise
                if isinstance(exc, BrokerError) and exc.code != ErrorCode.NOT_COORDINATOR:
                    await asyncio.sleep(backoff(attempt))  # LOAD_IN_PROGRESS and the like: same coordinator
                    attempt += 1
                    continue
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                await self._moved(generation, exc)

    async def close(self) -> None:
        """Send the acks still grouped, wait for the ones in flight (up to timeout_s), then close
        the connection: records still leased to it are delivered again (to others)."""
        if self._connection is not None:
            self._flush_acks()
            if self._acks_in_flight:
                await asyncio.wait(self._acks_in_flight, timeout=self.timeout_s)
            self._connection.close()
        if self._settle_connection is not None:
            self._settle_connection.close()
        if self._routes is not None:
            self._routes.close()
        self._buffer.clear()

    async def __aenter__(self) -> QueueConsumer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- receiving ------------------------------------------------------------------------------

    async def receive_batch(self, max_messages: int | None = None, max_wait_ms: int | None = None) -> list[QueueMessage]:
        """One QUEUE_FETCH: the leased messages in service order ([] when none came in max_wait_ms)."""
        if self._buffer:
            out = list(self._buffer)
            self._buffer.clear()
            return out
        assert self._connection is not None, "call start() first"
        wait = self.max_wait_ms if max_wait_ms is None else max_wait_ms
        header: dict[str, Any] = {
            "api": int(ApiKey.QUEUE_FETCH), "subscription": self.subscription, "topic": self.topic,
            "max_messages": max_messages or self.max_messages, "max_wait_ms": wait,
        }
        if self.partition is not None:
            header["partition"] = self.partition
        if self.ack_wait_ms is not None:
            header["ack_wait_ms"] = self.ack_wait_ms
        if self.clustered:
            response = await self._request(header, self.timeout_s + wait / 1000, settle=False)
        else:
            response = await self._connection.request(header, timeout=self.timeout_s + wait / 1000)
        return self._decode(response.header["deliveries"], memoryview(response.payload))

    def _decode(self, deliveries: list[dict[str, Any]], payload: memoryview) -> list[QueueMessage]:
        out: list[QueueMessage] = []
        topic, make = self.topic, tuple.__new__
        pos = 0
        for entry in deliveries:
            partition, size = entry["partition"], entry["size"]
            batches = _decode_batches(payload[pos : pos + size], f"{topic}/{partition}")
            pos += size
            bases = [base for base, _, _ in batches]
            attempts = dict(entry["attempts"])
            deadline = entry["deadline_ms"]
            for start, end in entry["ranges"]:
                index = max(0, bisect.bisect_right(bases, start) - 1)
                offset = start
                while offset < end and index < len(batches):
                    base, first_ts, entries = batches[index]
                    offset = max(offset, base)
                    stop = min(end, base + len(entries))
                    if offset < stop:
                        out += [
                            make(QueueMessage, (topic, partition, at, first_ts + e[0], e[1], e[2], e[3],
                                                attempts.get(at, 1) if attempts else 1, deadline, self))
                            for at, e in zip(range(offset, stop), entries[offset - base : stop - base], strict=False)
                        ]
                        offset = stop
                    index += 1
        return out

    async def receive(self, timeout_s: float | None = None) -> QueueMessage | None:
        """The next leased message, or None when nothing arrived within timeout_s (None: wait
        indefinitely)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not self._buffer:
            left_ms = self.max_wait_ms if deadline is None else int(max(0.0, deadline - loop.time()) * 1000)
            self._buffer.extend(await self.receive_batch(max_wait_ms=min(left_ms, self.max_wait_ms)))
            if not self._buffer and deadline is not None and loop.time() >= deadline:
                return None
        return self._buffer.popleft()

    async def __aiter__(self) -> AsyncIterator[QueueMessage]:
        while True:
            message = await self.receive()
            if message is not None:
                yield message

    # -- settling -------------------------------------------------------------------------------

    async def ack_many(self, messages: Iterable[QueueMessage]) -> int:
        """Acknowledge messages (one request per partition); returns how many were newly acked."""
        results = await self._settle(ApiKey.QUEUE_ACK, messages, {})
        return sum(r.get("acked", 0) for r in results)

    async def nack_many(self, messages: Iterable[QueueMessage], *, delay_ms: int = 0, reason: str = "nack") -> None:
        await self._settle(ApiKey.QUEUE_NACK, messages, {"delay_ms": delay_ms, "reason": reason})

    async def extend_many(self, messages: Iterable[QueueMessage], *, ack_wait_ms: int | None = None) -> int:
        extra = {} if ack_wait_ms is None else {"ack_wait_ms": ack_wait_ms}
        results = await self._settle(ApiKey.QUEUE_EXTEND, messages, extra)
        return sum(r.get("extended", 0) for r in results)

    def _ack_later(self, message: QueueMessage) -> asyncio.Future[None]:
        group = self._ack_group_done
        if group is None:
            loop = asyncio.get_running_loop()
            group = self._ack_group_done = loop.create_future()
            loop.call_soon(self._flush_acks)
        self._ack_group.setdefault(message.partition, []).append(message.offset)
        return group

    def _flush_acks(self) -> None:
        group, self._ack_group_done = self._ack_group_done, None
        by_partition, self._ack_group = self._ack_group, {}
        if group is None:
            return
        self._acks_in_flight.add(group)
        group.add_done_callback(self._ack_group_settled)
        if self.clustered:  # retried at the (new) coordinator: an ack may be sent again
            task = asyncio.get_running_loop().create_task(self._settle_offsets(ApiKey.QUEUE_ACK, by_partition, {}))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)
            task.add_done_callback(lambda done: _settle_group(group, done))
            return
        try:
            assert self._settle_connection is not None, "call start() first"
            futures = []
            for partition, offsets in by_partition.items():
                future = self._settle_connection.send({"api": int(ApiKey.QUEUE_ACK), "subscription": self.subscription,
                                                "topic": self.topic, "partition": partition, "ranges": _ranges(offsets)})
                assert future is not None
                futures.append(future)
        except Exception as exc:
            group.set_exception(exc)
            return
        asyncio.gather(*futures).add_done_callback(lambda done: _settle_group(group, done))

    def _ack_group_settled(self, group: asyncio.Future[None]) -> None:
        self._acks_in_flight.discard(group)
        if not group.cancelled() and group.exception() is not None:  # retrieved here: nobody may await it
            self.ack_failures += 1
            log.warning("acks on %s/%s not confirmed: %s", self.topic, self.subscription, group.exception())

    async def _settle(self, api: ApiKey, messages: Iterable[QueueMessage], extra: dict[str, Any]) -> list[dict[str, Any]]:
        assert self._settle_connection is not None, "call start() first"
        by_partition: dict[int, list[int]] = {}
        for message in messages:
            by_partition.setdefault(message.partition, []).append(message.offset)
        if self.clustered:
            return [r.header for r in await self._settle_offsets(api, by_partition, extra)]
        futures = []
        for partition, offsets in by_partition.items():
            header = {"api": int(api), "subscription": self.subscription, "topic": self.topic, "partition": partition,
                      "ranges": _ranges(offsets), **extra}
            future = self._settle_connection.send(header)
            assert future is not None
            futures.append(future)
        responses = [check(await response_within(f, self.timeout_s)) for f in futures]
        return [r.header for r in responses]


    async def _settle_offsets(self, api: ApiKey, by_partition: dict[int, list[int]], extra: dict[str, Any]) -> list[Response]:
        """Cluster: one settle request per partition, each retried at the (new) coordinator."""
        return list(await asyncio.gather(*(
            self._request({"api": int(api), "subscription": self.subscription, "topic": self.topic,
                           "partition": partition, "ranges": _ranges(offsets), **extra}, self.timeout_s, settle=True)
            for partition, offsets in by_partition.items())))


def _settle_group(group: asyncio.Future[None], responses: asyncio.Future[list[Response]]) -> None:
    if group.done():
        return
    if responses.cancelled():
        group.cancel()
        return
    error = responses.exception()
    if error is None:
        try:
            for response in responses.result():
                check(response)
        except Exception as exc:
            error = exc
    if error is None:
        group.set_result(None)
    else:
        group.set_exception(error)


def _decode_batches(data: memoryview, where: str) -> list[tuple[int, int, tuple[Any, ...]]]:
    """(base_offset, first_timestamp_ms, decoded records) of each whole batch in `data`."""
    return [(header.base_offset, header.first_timestamp_ms, entries)
            for header, entries in verified_batches(data, where)]


def _ranges(offsets: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for offset in sorted(offsets):
        if out and out[-1][1] == offset:
            out[-1][1] = offset + 1
        elif not out or out[-1][1] < offset:
            out.append([offset, offset + 1])
    return out


class Queue:
    """Producer side of a queue topic, and a factory of its consumers."""

    def __init__(self, bootstrap: str = "localhost:9092", topic: str = "default", *, acks: str = "leader",
                 **producer_options: Any) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._producer = Producer(bootstrap, acks=acks, **producer_options)

    async def start(self) -> Queue:
        await self._producer.start()
        return self

    async def close(self) -> None:
        await self._producer.close()

    async def __aenter__(self) -> Queue:
        return await self.start()

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        await self._producer.__aexit__(exc_type, *rest)

    async def publish(self, value: bytes | None, key: bytes | None = None, *, delay_ms: int | None = None,
                      deliver_at_ms: int | None = None, ttl_ms: int | None = None, priority: int | None = None,
                      headers: list[tuple[str, bytes]] | None = None, wait: bool = True) -> RecordMetadata | None:
        """Produce one message; with wait (default) return once the broker acknowledged it."""
        all_headers = [*(headers or []), *delivery_headers(delay_ms=delay_ms, deliver_at_ms=deliver_at_ms,
                                                            ttl_ms=ttl_ms, priority=priority)] or None
        if wait:
            return await self._producer.send_and_wait(self.topic, value, key, headers=all_headers)
        await self._producer.send(self.topic, value, key, headers=all_headers)
        return None

    async def flush(self) -> None:
        await self._producer.flush()

    def subscribe(self, subscription: str = "default", **options: Any) -> QueueConsumer:
        """A consumer of `subscription` (not started: use ``async with`` or ``await .start()``)."""
        return QueueConsumer(self.bootstrap, self.topic, subscription, **options)


async def replay_dead_letters(bootstrap: str, dlq_topic: str, partition: int, offsets: list[int], *,
                              timeout_s: float = 30.0) -> dict[str, Any]:
    """Produce the dead letters at `offsets` of a DLQ partition back to their origin topic and
    partition, without the DLQ headers (DLQ_REPLAY). Returns {replayed, to: [[topic, partition,
    base_offset, last_offset]]}."""
    request = {"api": int(ApiKey.DLQ_REPLAY), "topic": dlq_topic, "partition": partition, "offsets": offsets}
    routes = Routes(bootstrap, timeout=timeout_s)
    try:
        await routes.metadata([dlq_topic])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        attempt = 0
        while True:
            try:
                # Against a cluster the DLQ partition's leader answers (it reads below its high
                # watermark and places the records on their origin partitions' leaders).
                connection = await routes.leader_connection(dlq_topic, partition)
                response = await connection.request(request, timeout=timeout_s)
                return {k: v for k, v in response.header.items() if k not in ("corr", "error")}
            except BrokerError as exc:
                # NOT_LEADER is answered before anything is read or written: safe to send again.
                if not routes.clustered or exc.code is not ErrorCode.NOT_LEADER or loop.time() > deadline:
                    raise
            await asyncio.sleep(backoff(attempt))
            attempt += 1
            routes.invalidate(dlq_topic)
    finally:
        routes.close()


# -- synchronous wrappers (scripts; not for use inside a running event loop) ---------------------


async def _ack_and_wait(message: QueueMessage) -> None:
    await message.ack()


class SyncQueueMessage:
    """A QueueMessage whose ack()/nack()/extend() block."""

    def __init__(self, runner: asyncio.Runner, message: QueueMessage) -> None:
        self._runner = runner
        self.message = message

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def ack(self) -> None:
        self._runner.run(_ack_and_wait(self.message))

    def nack(self, delay_ms: int = 0, reason: str = "nack") -> None:
        self._runner.run(self.message.nack(delay_ms, reason))

    def extend(self, ack_wait_ms: int | None = None) -> bool:
        return self._runner.run(self.message.extend(ack_wait_ms))


class SyncQueueConsumer(SyncClient):
    """Blocking QueueConsumer; from ``SyncQueue.subscribe`` (sharing its loop) or on its own."""

    def __init__(self, bootstrap: str = "localhost:9092", topic: str = "default", subscription: str = "default", *,
                 runner: asyncio.Runner | None = None, **options: Any) -> None:
        super().__init__(QueueConsumer(bootstrap, topic, subscription, **options), runner)

    def receive(self, timeout_s: float | None = None) -> SyncQueueMessage | None:
        message = self._run(self._client.receive(timeout_s))
        return None if message is None else SyncQueueMessage(self._runner, message)

    def receive_batch(self, max_messages: int | None = None) -> list[SyncQueueMessage]:
        return [SyncQueueMessage(self._runner, m) for m in self._run(self._client.receive_batch(max_messages))]

    def ack_many(self, messages: Iterable[SyncQueueMessage]) -> int:
        return self._run(self._client.ack_many([m.message for m in messages]))


class SyncQueue(SyncClient):
    """Blocking Queue: ``SyncQueue(bootstrap, topic).publish(b"...")``, ``.subscribe(name)``."""

    def __init__(self, bootstrap: str = "localhost:9092", topic: str = "default", **options: Any) -> None:
        super().__init__(Queue(bootstrap, topic, **options))

    def publish(self, value: bytes | None, key: bytes | None = None, **options: Any) -> RecordMetadata | None:
        return self._run(self._client.publish(value, key, **options))

    def subscribe(self, subscription: str = "default", **options: Any) -> SyncQueueConsumer:
        """A consumer of `subscription` on this queue's event loop (close it before the queue)."""
        queue = self._client
        return SyncQueueConsumer(queue.bootstrap, queue.topic, subscription, runner=self._runner, **options)
