"""The asyncio Consumer: long-poll fetches of raw batches, decoded one msgpack call per batch.

``async for message in consumer`` yields Message tuples in offset order per partition;
``async for batch in consumer.batches()`` yields whole decoded batches (lists of Message), which
is what throughput-minded code should iterate. Positions are kept client-side, one integer per
partition; for committed positions and partitions shared by a group use ``GroupConsumer``
(rustmq.client.groups, docs/semantics.md). While the caller works on one response the next
fetch is already on its way (one fetch of prefetch), so the broker and the decoder overlap.

``start`` is 'earliest', 'latest', an offset (int, applied to every partition) or
``("timestamp", ms)``. An offset below the log start (retention deleted it) moves to the log
start; an offset past the end moves to the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from rustmq.client.admin import Admin
from rustmq.client.connection import Connection, Response, check, response_within
from rustmq.client.errors import BrokerError
from rustmq.client.groups import GroupConsumer
from rustmq.client.messages import Message, decode_batches
from rustmq.client.routing import Routes, backoff, merge_fetches, retriable
from rustmq.protocol import batch as record_batch
from rustmq.protocol.api import EARLIEST, LATEST, ApiKey, ErrorCode


class Consumer:
    """Reads chosen partitions (default: all) from a start position, tracking positions itself.

    ``Consumer(bootstrap, topic, group="billing", ...)`` returns a ``GroupConsumer`` instead (the
    broker assigns partitions and keeps committed offsets): one entry point, as with Kafka's
    ``group_id``; both iterate the same ``Message`` tuples.
    """

    def __new__(cls, *args: Any, group: str | None = None, **options: Any) -> Any:
        if group is not None and cls is Consumer:
            for option in ("partitions", "min_bytes"):
                if options.pop(option, None) is not None:
                    raise TypeError(f"{option} does not apply to a group consumer (the broker assigns partitions)")
            return GroupConsumer(*args, group=group, **options)
        return super().__new__(cls)

    def __init__(
        self,
        bootstrap: str = "localhost:9092",
        topic: str = "default",
        *,
        group: None = None,
        partitions: list[int] | None = None,
        start: str | int | tuple[str, int] = "earliest",
        max_bytes: int = 4 << 20,
        max_wait_ms: int = 500,
        min_bytes: int = 1,
        timeout_s: float = 30.0,
        external: bool = False,
        client_rack: str | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.start_at = start
        self.max_bytes = max_bytes
        self.max_wait_ms = max_wait_ms
        self.min_bytes = min_bytes
        self.timeout_s = timeout_s
        self.positions: dict[int, int] = {}
        self.high_watermarks: dict[int, int] = {}
        self._admin = Admin(bootstrap.split(",")[0], timeout=timeout_s)
        self._routes = Routes(bootstrap, timeout=timeout_s, external=external, client_rack=client_rack)
        self._connection: Connection | None = None
        self._next: asyncio.Future[Response] | None = None
        # The broker resolves a timestamp to the first *batch* whose max timestamp reaches it;
        # records before the timestamp in that batch are dropped here, once per partition.
        self._not_before: dict[int, int] = {}
        self._failures = 0

    async def start(self) -> Consumer:
        try:
            return await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> Consumer:
        metadata = await self._routes.metadata([self.topic])
        if self._routes.clustered:
            return await self._start_clustered(metadata)
        await self._admin.start()
        partitions = self._choose_partitions(metadata)
        broker = metadata["brokers"][0]
        host = broker.get("host") or self._admin.host
        port = broker.get("consumer_port") or self._admin.port
        self._connection = await Connection.open(host, port)
        for partition in partitions:
            self.positions[partition] = await self._resolve(partition, self.start_at)
        return self

    async def _start_clustered(self, metadata: dict[str, Any]) -> Consumer:
        for partition in self._choose_partitions(metadata):
            self.positions[partition] = await self._resolve(partition, self.start_at)
        return self

    def _choose_partitions(self, metadata: dict[str, Any]) -> list[int]:
        """Check the topic and the requested partitions against METADATA (default: all of them)."""
        (entry,) = metadata["topics"]
        if entry["error"]:
            raise BrokerError(entry["error"], f"topic {self.topic!r}")
        available = [p["partition"] for p in entry["partitions"]]
        chosen = available if self.partitions is None else self.partitions
        for partition in chosen:
            if partition not in available:
                raise BrokerError(ErrorCode.UNKNOWN_PARTITION, f"topic {self.topic!r} has no partition {partition}")
        self.partitions = chosen
        return chosen

    async def _list_offset(self, partition: int, at: int | str) -> int:
        if not self._routes.clustered:
            return await self._admin.list_offset(self.topic, partition, at)
        where = {"earliest": EARLIEST, "latest": LATEST}.get(at, at) if isinstance(at, str) else at
        attempt = 0
        while True:
            try:
                connection = await self._routes.leader_connection(self.topic, partition, "consumer")
                response = await connection.request(
                    {"api": int(ApiKey.LIST_OFFSETS), "topic": self.topic, "partition": partition, "at": where},
                    timeout=self.timeout_s)
                return int(response.header["offset"])
            except Exception as exc:
                if not retriable(exc, True) or attempt >= 40:
                    raise
                self._routes.invalidate(self.topic)
                await asyncio.sleep(backoff(attempt))
                attempt += 1

    async def _resolve(self, partition: int, start: str | int | tuple[str, int]) -> int:
        if isinstance(start, tuple):
            self._not_before[partition] = int(start[1])
            return await self._list_offset(partition, int(start[1]))
        if isinstance(start, int):
            return start
        return await self._list_offset(partition, start)

    async def seek(self, partition: int, offset: int) -> None:
        self._discard_prefetch()
        self._not_before.pop(partition, None)
        self.positions[partition] = offset

    async def close(self) -> None:
        self._discard_prefetch()
        if self._connection is not None:
            self._connection.close()
        self._routes.close()
        await self._admin.close()

    async def __aenter__(self) -> Consumer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _discard_prefetch(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None

    def _send_fetch(self) -> asyncio.Future[Response]:
        assert self._connection is not None, "call start() first"
        header = {
            "api": int(ApiKey.FETCH),
            "max_wait_ms": self.max_wait_ms,
            "min_bytes": self.min_bytes,
            "max_bytes": self.max_bytes,
            "partitions": [
                {"topic": self.topic, "partition": partition, "offset": offset}
                for partition, offset in self.positions.items()
            ],
        }
        future = self._connection.send(header)
        assert future is not None
        return future

    async def fetch_raw(self) -> list[tuple[int, memoryview, int]]:
        """One fetch: (partition, raw batches, position they were fetched from) per partition with data.

        Advances positions past the fetched batches and has the next fetch sent before returning
        (against a cluster: one fetch per partition leader at a time, no prefetch; NOT_LEADER, a
        lost connection or a timeout refresh the metadata and are retried by the next call).
        """
        if self._routes.clustered:
            return await self._fetch_clustered()
        future = self._next or self._send_fetch()
        self._next = None
        response = check(await response_within(future, self.timeout_s + self.max_wait_ms / 1000))
        payload = memoryview(response.payload)
        out = []
        pos = 0
        for entry in response.header["partitions"]:
            partition, size = entry["partition"], entry.get("size", 0)
            data = payload[pos : pos + size]
            pos += size
            if entry["error"]:
                await self._recover(partition, entry)
                continue
            self.high_watermarks[partition] = entry["high_watermark"]
            if size:
                fetched_from = self.positions[partition]
                self.positions[partition] = _next_position(data, fetched_from)
                out.append((partition, data, fetched_from))
        self._next = self._send_fetch()
        return out

    async def _fetch_clustered(self) -> list[tuple[int, memoryview, int]]:
        routes = self._routes
        if self.topic not in routes.leaders:
            try:
                await routes.metadata([self.topic])
            except Exception:
                await asyncio.sleep(backoff(self._failures))
                self._failures += 1
                return []
        groups: dict[int, list[int]] = {}
        for partition in self.positions:
            groups.setdefault(routes.reader_of(self.topic, partition), []).append(partition)
        results = await asyncio.gather(*(self._fetch_from(partitions) for partitions in groups.values()),
                                       return_exceptions=True)
        out, failed = merge_fetches(results)
        if failed:
            routes.invalidate(self.topic)
            if not out:
                await asyncio.sleep(backoff(self._failures))
                self._failures += 1
        else:
            self._failures = 0
        return out

    async def _fetch_from(self, partitions: list[int]) -> tuple[list[tuple[int, memoryview, int]], bool]:
        connection = await self._routes.leader_connection(self.topic, partitions[0], "consumer", read=True)
        header = {
            "api": int(ApiKey.FETCH), "max_wait_ms": self.max_wait_ms, "min_bytes": self.min_bytes,
            "max_bytes": self.max_bytes,
            "partitions": [{"topic": self.topic, "partition": p, "offset": self.positions[p]} for p in partitions],
        }
        if self._routes.client_rack is not None:
            header["follower_read"] = True
        response = await connection.request(header, timeout=self.timeout_s + self.max_wait_ms / 1000)
        payload = memoryview(response.payload)
        out = []
        pos = 0
        stale = False
        for entry in response.header["partitions"]:
            partition, size = entry["partition"], entry.get("size", 0)
            data = payload[pos : pos + size]
            pos += size
            if entry["error"]:
                if retriable(BrokerError(entry["error"], ""), True):
                    stale = True
                    continue
                await self._recover(partition, entry)
                continue
            self.high_watermarks[partition] = entry["high_watermark"]
            if size:
                fetched_from = self.positions[partition]
                self.positions[partition] = _next_position(data, fetched_from)
                out.append((partition, data, fetched_from))
        return out, stale

    async def _recover(self, partition: int, entry: dict[str, Any]) -> None:
        if entry["error"] == ErrorCode.OFFSET_OUT_OF_RANGE:
            position = self.positions[partition]
            start = await self._list_offset(partition, "earliest")
            end = await self._list_offset(partition, "latest")
            self.positions[partition] = start if position < start else end
            return
        raise BrokerError(entry["error"], entry.get("message", ""))

    async def batches(self) -> AsyncIterator[list[Message]]:
        """Decoded batches as they arrive (one list per partition per fetch)."""
        while True:
            for partition, data, fetched_from in await self.fetch_raw():
                messages = self._decode(partition, data, fetched_from)
                if messages:
                    yield messages

    def _decode(self, partition: int, data: memoryview, fetched_from: int) -> list[Message]:
        messages, _ = decode_batches(self.topic, partition, data, fetched_from)
        not_before = self._not_before.get(partition)
        if not_before is not None and messages:
            for index, message in enumerate(messages):
                if message.timestamp_ms >= not_before:
                    del self._not_before[partition]
                    return messages[index:]
            return []
        return messages

    async def __aiter__(self) -> AsyncIterator[Message]:
        async for batch in self.batches():
            for message in batch:
                yield message

    async def getmany(self, max_messages: int = 10_000, timeout_s: float = 1.0) -> list[Message]:
        """Whatever arrives within timeout_s (at most max_messages; the rest is refetched later)."""
        out: list[Message] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(out) < max_messages and loop.time() < deadline:
            for partition, data, fetched_from in await self.fetch_raw():
                messages = self._decode(partition, data, fetched_from)
                room = max_messages - len(out)
                if len(messages) > room:
                    await self.seek(partition, messages[room].offset)
                    messages = messages[:room]
                out.extend(messages)
            if out:
                break
        return out


def _next_position(data: memoryview, position: int) -> int:
    for _, header in record_batch.iter_batches(data):
        position = max(position, header.base_offset + header.record_count)
    return position
