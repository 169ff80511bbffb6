"""Cluster mode: a queue coordinator's window of a partition it holds no replica of.

The coordinator of a topic's queue subscriptions (rustmq.server.group_stores, which gets this
class from the replication runtime: the server layer does not dial other brokers itself) reads the topic's
records from its own replica when it has one. Otherwise each subscription partition it serves
gets a `RemoteWindow`: the batches from the subscription's ack floor on, fetched from the
partition's leader with ordinary consumer FETCHes (so only below the leader's high watermark)
over the brokers' internal client (rustmq.client.connection: the broker token and the peer TLS
context, as replica fetches and forwarding use), one long-polling connection per window.

Why a window from the ack floor: every record a subscription may deliver or dead-letter lies
between its ack floor and its `next_offset` (redeliveries included), so a window that keeps
everything from the floor on never misses a read; and because the window only grows while it
holds less than `max_bytes`, the memory is bounded: at most `max_bytes` (plus one fetch) per
subscription partition read remotely. A floor held by one stuck record therefore stops new
deliveries of that partition once `max_bytes` of records lie above it (the same effect as
`max_lookahead`, in bytes), until the record is settled.

The window reads like a `PartitionLog` (`start_offset`, `end_offset`, `read`): `start_offset`
is the leader's log start as last reported, `end_offset` the end of the fetched batches.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable
from typing import Any

from rustmq.client.connection import Connection
from rustmq.client.errors import ClientError
from rustmq.protocol import batch as record_batch
from rustmq.protocol.api import ApiKey, ErrorCode
from rustmq.storage.partition import FetchSlice

log = logging.getLogger("rustmq.queues")

WINDOW_BYTES = 8 << 20  # per remotely read subscription partition
FETCH_BYTES = 1 << 20
FETCH_WAIT_MS = 500


class RemoteWindow:
    def __init__(self, topic: str, index: int, start: int, *, leader: Callable[[], dict[str, Any] | None],
                 floor: Callable[[], int], wake: Callable[[], None], max_bytes: int = WINDOW_BYTES) -> None:
        self.topic = topic
        self.index = index
        self.leader = leader  # the partition's leader broker (host, consumer_port), None: none now
        self.floor = floor  # the subscription's ack floor: nothing below it is read again
        self.wake = wake  # new records arrived (long-polling queue fetches look again)
        self.max_bytes = max_bytes
        self.log_start = 0
        self.high_watermark = 0
        self.known = False  # a fetch was answered: start_offset and high_watermark are the leader's
        self._bases: list[int] = []
        self._batches: list[bytes] = []
        self._start = start  # offset of the first batch held (or where fetching starts)
        self._end = start
        self._bytes = 0
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.error = ""

    # -- reading (RecordSource) -----------------------------------------------------------------

    @property
    def start_offset(self) -> int:
        return self.log_start

    @property
    def end_offset(self) -> int:
        return self._end

    def read(self, offset: int, max_bytes: int) -> FetchSlice:
        """Whole batches from the one holding `offset`, about `max_bytes` (at least one batch);
        nothing when the window does not hold it (not fetched yet)."""
        self._trim()
        if offset >= self._end or not self._bases or offset < self._bases[0]:
            return FetchSlice([], offset, 0)
        i = bisect.bisect_right(self._bases, offset) - 1
        views: list[memoryview] = []
        size = 0
        next_offset = offset
        while i < len(self._batches) and (not views or size < max_bytes):
            data = self._batches[i]
            views.append(memoryview(data))
            size += len(data)
            next_offset = self._bases[i + 1] if i + 1 < len(self._bases) else self._end
            i += 1
        return FetchSlice(views, next_offset, size)

    # -- fetching ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"queue-window-{self.topic}-{self.index}")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._bases.clear()
        self._batches.clear()
        self._bytes = 0

    def _trim(self) -> None:
        """Drop batches wholly below the floor (settled: never read again)."""
        floor = self.floor()
        drop = 0
        while drop + 1 < len(self._bases) and self._bases[drop + 1] <= floor:
            drop += 1
        if drop == len(self._bases) - 1 and self._bases and self._end <= floor:
            drop += 1
        if drop:
            self._bytes -= sum(len(b) for b in self._batches[:drop])
            del self._bases[:drop], self._batches[:drop]
            self._start = self._bases[0] if self._bases else self._end
            self._room.set()

    def _restart(self, offset: int) -> None:
        self._bases.clear()
        self._batches.clear()
        self._bytes = 0
        self._start = self._end = offset

    async def _run(self) -> None:
        connection: Connection | None = None
        address: tuple[str, int] | None = None
        pause = 0.05
        try:
            while True:
                self._trim()
                if self._bytes >= self.max_bytes:
                    self._room.clear()
                    try:
                        async with asyncio.timeout(1.0):
                            await self._room.wait()
                    except TimeoutError:
                        pass
                    continue
                leader = self.leader()
                if leader is None:
                    self.error = "no leader"
                    await asyncio.sleep(pause)
                    pause = min(1.0, pause * 2)
                    continue
                wanted = (leader["host"], int(leader["consumer_port"]))
                try:
                    if connection is None or connection.closed or address != wanted:
                        if connection is not None:
                            connection.close()
                        connection = await Connection.open(*wanted, timeout=2.0)
                        address = wanted
                    await self._fetch_once(connection)
                    pause = 0.05
                except (ClientError, OSError, TimeoutError) as exc:
                    self.error = str(exc)
                    log.debug("queue window %s/%d: %s", self.topic, self.index, exc)
                    if connection is not None:
                        connection.close()
                        connection = None
                    await asyncio.sleep(pause)
                    pause = min(1.0, pause * 2)
        finally:
            if connection is not None:
                connection.close()

    async def _fetch_once(self, connection: Connection) -> None:
        asked = self._end
        room = max(1, min(FETCH_BYTES, self.max_bytes - self._bytes))
        future = connection.send({"api": int(ApiKey.FETCH), "max_wait_ms": FETCH_WAIT_MS, "min_bytes": 1,
                                  "max_bytes": room, "partitions": [
                                      {"topic": self.topic, "partition": self.index, "offset": asked, "max_bytes": room}]})
        assert future is not None
        async with asyncio.timeout(FETCH_WAIT_MS / 1000 + 10):
            response = await future
        header = response.header
        if header.get("error"):
            raise ClientError(f"fetch refused: {header.get('message', header['error'])}")
        (entry,) = header["partitions"]
        if asked != self._end:
            return  # restarted meanwhile
        code = int(entry.get("error", 0))
        if code:
            self.error = str(entry.get("message", code))
            if code == ErrorCode.OFFSET_OUT_OF_RANGE and "log_start_offset" in entry:
                start = int(entry["log_start_offset"])
                self.log_start = start
                self.known = True
                if asked < start:  # retention removed what the floor still needs: skip ahead
                    self._restart(start)
                    self.wake()
                    return
            raise ClientError(f"{self.topic}/{self.index}: {self.error}")  # NOT_LEADER and the like: back off
        self.error = ""
        self.log_start = int(entry.get("log_start_offset", self.log_start))
        self.high_watermark = int(entry.get("high_watermark", self.high_watermark))
        self.known = True
        size = int(entry.get("size", 0))
        if size:
            self.add(memoryview(response.payload)[:size])
        self.wake()

    def add(self, data: memoryview | bytes) -> None:
        """Keep the whole batches of `data` (fetched from the window's end on; copied: the
        connection reuses its buffer); batches that end at or below the window's end are
        skipped."""
        for position, batch_header in record_batch.iter_batches(data):
            end = batch_header.base_offset + batch_header.record_count
            if end <= self._end:
                continue
            self._bases.append(batch_header.base_offset)
            self._batches.append(bytes(data[position:position + batch_header.size]))
            self._bytes += batch_header.size
            self._end = end
        if self._bases:
            self._start = self._bases[0]

    @property
    def size_bytes(self) -> int:
        return self._bytes
