"""Stream consumer groups: ``GroupConsumer(bootstrap, topic, group=...)`` joins a group, reads
the partitions the broker assigns to it from their committed offsets, and commits.

Membership runs on its own connection: a long-poll HEARTBEAT that the broker answers at once
when the group rebalances (or after ``heartbeat_wait_ms``), so a member adopts a new assignment
one round trip after a join, leave or session expiry. Fetches and commits use a second
connection. Positions of partitions kept across a rebalance stay; partitions gained start from
their committed offset (or ``start`` when the group never committed). A commit after a
rebalance the member has not seen yet fails with ILLEGAL_GENERATION; that progress is then
redelivered to the partition's next owner: at-least-once (docs/semantics.md).

``auto_commit`` (default on) commits the positions of everything yielded so far before each
fetch and on close, i.e. a message counts as processed once the next one is asked for::

    async with GroupConsumer("localhost:9092", "orders", group="billing") as consumer:
        async for message in consumer:
            handle(message)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from rustmq.client.admin import Admin
from rustmq.client.connection import Connection, check, response_within
from rustmq.client.consumer import Message, decode_batches
from rustmq.client.errors import BrokerError, ConnectionClosedError
from rustmq.client.sync import SyncClient
from rustmq.protocol.api import ApiKey, ErrorCode

log = logging.getLogger(__name__)


class GroupConsumer:
    def __init__(self, bootstrap: str = "localhost:9092", topic: str | list[str] = "default", *, group: str,
                 start: str = "earliest", client_id: str = "consumer", instance_id: str | None = None,
                 session_timeout_ms: int = 10_000, heartbeat_wait_ms: int = 3_000, auto_commit: bool = True,
                 max_bytes: int = 4 << 20, max_wait_ms: int = 500, timeout_s: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.topics = [topic] if isinstance(topic, str) else list(topic)
        self.group = group
        self.start_at = start
        self.client_id = client_id
        self.instance_id = instance_id
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_wait_ms = min(heartbeat_wait_ms, session_timeout_ms // 3)
        self.auto_commit = auto_commit
        self.max_bytes = max_bytes
        self.max_wait_ms = max_wait_ms
        self.timeout_s = timeout_s
        self.member_id: str | None = None
        self.generation = -1
        self.assignment: list[tuple[str, int]] = []
        self.positions: dict[tuple[str, int], int] = {}
        self.rebalances = 0
        self._committed: dict[tuple[str, int], int] = {}
        self._admin = Admin(bootstrap, timeout=timeout_s)
        self._data: Connection | None = None
        self._membership: Connection | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._pending_view: dict[str, Any] | None = None
        self._failure: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> GroupConsumer:
        try:
            await self._admin.start()
            metadata = await self._admin.metadata(self.topics)
            for entry in metadata["topics"]:
                if entry["error"]:
                    raise BrokerError(entry["error"], f"topic {entry['name']!r}")
            broker = metadata["brokers"][0]
            host = broker.get("host") or self._admin.host
            port = broker.get("consumer_port") or self._admin.port
            self._data = await Connection.open(host, port)
            self._membership = await Connection.open(host, port)
            view = await self._join()
            await self._adopt(view)
            self._heartbeats = asyncio.get_running_loop().create_task(self._heartbeat_loop())
            return self
        except BaseException:
            await self.close(leave=False)
            raise

    async def close(self, leave: bool = True) -> None:
        """Commit (auto_commit), leave the group (its partitions move at once), disconnect."""
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._heartbeats
            self._heartbeats = None
        try:
            if leave and self.member_id is not None and self._data is not None and not self._data.closed:
                if self.auto_commit:
                    with contextlib.suppress(BrokerError):
                        await self.commit()
                await self._data.request({"api": int(ApiKey.LEAVE_GROUP), "group": self.group, "member_id": self.member_id},
                                         timeout=self.timeout_s)
        finally:
            for connection in (self._data, self._membership):
                if connection is not None:
                    connection.close()
            await self._admin.close()

    async def __aenter__(self) -> GroupConsumer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- membership -----------------------------------------------------------------------------

    async def _join(self) -> dict[str, Any]:
        assert self._membership is not None
        header: dict[str, Any] = {"api": int(ApiKey.JOIN_GROUP), "group": self.group, "topics": self.topics,
                                  "client_id": self.client_id, "session_timeout_ms": self.session_timeout_ms}
        if self.instance_id is not None:
            header["instance_id"] = self.instance_id
        response = await self._membership.request(header, timeout=self.timeout_s)
        return response.header

    async def _heartbeat_loop(self) -> None:
        assert self._membership is not None
        # Heartbeats carry the newest generation seen (adopted or pending), so a pending
        # rebalance is answered once and the next heartbeat is held again instead of spinning.
        seen_generation, member_id = self.generation, self.member_id
        while True:
            try:
                response = await self._membership.request(
                    {"api": int(ApiKey.HEARTBEAT), "group": self.group, "member_id": member_id,
                     "generation": seen_generation, "max_wait_ms": self.heartbeat_wait_ms},
                    timeout=self.timeout_s + self.heartbeat_wait_ms / 1000,
                )
                view = response.header
            except BrokerError as exc:
                if exc.code is not ErrorCode.UNKNOWN_MEMBER:
                    raise
                log.warning("group %s: %s; joining again", self.group, exc.message)
                view = await self._join()
            except (TimeoutError, ConnectionClosedError) as exc:
                self._failure = exc
                return
            if view["status"] != "ok" or view["generation"] != seen_generation:
                self._pending_view = view
                seen_generation, member_id = view["generation"], view["member_id"]

    async def _adopt(self, view: dict[str, Any]) -> None:
        """Take a new generation and assignment: kept partitions keep their positions."""
        self.member_id = view["member_id"]
        self.generation = view["generation"]
        assignment = [(t, p) for t, p in view["assignment"]]
        gained = [tp for tp in assignment if tp not in self.positions]
        self.positions = {tp: pos for tp, pos in self.positions.items() if tp in assignment}
        self._committed = {tp: pos for tp, pos in self._committed.items() if tp in assignment}
        self.assignment = assignment
        self.rebalances += 1
        if gained:
            committed = await self.committed(gained)
            for tp in gained:
                if tp in committed:
                    self.positions[tp] = self._committed[tp] = committed[tp]
                else:
                    self.positions[tp] = await self._admin.list_offset(tp[0], tp[1], self.start_at)

    async def _maybe_adopt(self) -> None:
        if self._failure is not None:
            raise ConnectionClosedError(f"group membership connection failed: {self._failure}")
        view, self._pending_view = self._pending_view, None
        if view is not None:
            await self._adopt(view)

    # -- offsets --------------------------------------------------------------------------------

    async def committed(self, partitions: list[tuple[str, int]] | None = None) -> dict[tuple[str, int], int]:
        assert self._data is not None
        header: dict[str, Any] = {"api": int(ApiKey.FETCH_OFFSETS), "group": self.group}
        if partitions is not None:
            header["partitions"] = [list(tp) for tp in partitions]
        response = await self._data.request(header, timeout=self.timeout_s)
        return {(t, p): o for t, p, o in response.header["offsets"]}

    async def commit(self, offsets: dict[tuple[str, int], int] | None = None) -> None:
        """Commit `offsets` (default: the current positions of the assigned partitions)."""
        assert self._data is not None
        wanted = dict(self.positions) if offsets is None else offsets
        changed = {tp: o for tp, o in wanted.items() if self._committed.get(tp) != o}
        if not changed:
            return
        await self._data.request(
            {"api": int(ApiKey.COMMIT_OFFSETS), "group": self.group, "member_id": self.member_id,
             "generation": self.generation, "offsets": [[t, p, o] for (t, p), o in changed.items()]},
            timeout=self.timeout_s,
        )
        self._committed.update(changed)

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        self.positions[(topic, partition)] = offset

    # -- consuming ------------------------------------------------------------------------------

    async def getmany(self, timeout_s: float | None = None) -> list[Message]:
        """One fetch over the assigned partitions (after applying a pending rebalance)."""
        if self.auto_commit:
            try:
                await self.commit()
            except BrokerError as exc:
                if exc.code not in (ErrorCode.ILLEGAL_GENERATION, ErrorCode.UNKNOWN_MEMBER, ErrorCode.PARTITION_NOT_ASSIGNED):
                    raise
                self._committed.clear()  # fenced: a rebalance is pending, the new owner redelivers
        await self._maybe_adopt()
        assert self._data is not None
        if not self.positions:
            await asyncio.sleep(self.max_wait_ms / 1000)
            return []
        wait = self.max_wait_ms if timeout_s is None else int(timeout_s * 1000)
        response = check(await response_within(self._data.send({  # type: ignore[arg-type]
            "api": int(ApiKey.FETCH), "max_wait_ms": wait, "min_bytes": 1, "max_bytes": self.max_bytes,
            "partitions": [{"topic": t, "partition": p, "offset": o} for (t, p), o in self.positions.items()],
        }), self.timeout_s + wait / 1000))
        payload = memoryview(response.payload)
        out: list[Message] = []
        pos = 0
        for entry in response.header["partitions"]:
            tp, size = (entry["topic"], entry["partition"]), entry.get("size", 0)
            data = payload[pos : pos + size]
            pos += size
            if entry["error"]:
                if entry["error"] == ErrorCode.OFFSET_OUT_OF_RANGE:
                    self.positions[tp] = await self._admin.list_offset(tp[0], tp[1], "earliest")
                    continue
                raise BrokerError(entry["error"], entry.get("message", ""))
            if size and tp in self.positions:
                messages, next_position = decode_batches(tp[0], tp[1], data, self.positions[tp])
                self.positions[tp] = next_position
                out.extend(messages)
        return out

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            for message in await self.getmany():
                yield message


class SyncGroupConsumer(SyncClient):
    """Blocking GroupConsumer for scripts. Membership heartbeats run only while a call is in
    progress (the private event loop is idle otherwise), so call poll() at least every
    session_timeout_ms / 2."""

    def __init__(self, bootstrap: str = "localhost:9092", topic: str | list[str] = "default", **options: Any) -> None:
        super().__init__(GroupConsumer(bootstrap, topic, **options))

    @property
    def assignment(self) -> list[tuple[str, int]]:
        return self._client.assignment

    def poll(self, timeout_s: float | None = None) -> list[Message]:
        return self._run(self._client.getmany(timeout_s))

    def commit(self) -> None:
        self._run(self._client.commit())
