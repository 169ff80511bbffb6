"""Stream consumer groups: ``GroupConsumer(bootstrap, topic, group=...)`` joins a group, reads
the partitions the broker assigns to it from their committed offsets, and commits.

Membership runs on its own connection: a long-poll HEARTBEAT that the broker answers at once
when the group rebalances (or after ``heartbeat_wait_ms``), so a member adopts a new assignment
one round trip after a join, leave or session expiry. Fetches and commits use a second
connection. Positions of partitions kept across a rebalance stay; partitions gained start from
their committed offset (or ``start`` when the group never committed). A commit after a
rebalance the member has not seen yet fails with ILLEGAL_GENERATION; that progress is then
redelivered to the partition's next owner: at-least-once (docs/semantics.md).

Against a cluster (METADATA says ``cluster``) membership and commits go to the group's
coordinator, found with FIND_COORDINATOR (the leader of the group's partition of the internal
topic, docs/cluster.md), and fetches go to each partition's leader. NOT_COORDINATOR, a lost
connection or a timeout find the coordinator again and retry with backoff (a commit until
``timeout_s``); after a coordinator failover the member joins again (UNKNOWN_MEMBER at the new
coordinator), keeps the positions of the partitions it keeps and reads the committed offsets of
the ones it gains, so nothing committed is lost and at most uncommitted progress is redelivered.

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
from rustmq.client.errors import BrokerError, ConnectionClosedError
from rustmq.client.messages import Message, decode_batches
from rustmq.client.routing import Routes, backoff, merge_fetches, retriable
from rustmq.protocol.api import EARLIEST, LATEST, ApiKey, ErrorCode

log = logging.getLogger(__name__)


class GroupConsumer:
    def __init__(self, bootstrap: str = "localhost:9092", topic: str | list[str] = "default", *, group: str,
                 start: str = "earliest", client_id: str = "consumer", instance_id: str | None = None,
                 session_timeout_ms: int = 10_000, heartbeat_wait_ms: int = 3_000, auto_commit: bool = True,
                 max_bytes: int = 4 << 20, max_wait_ms: int = 500, timeout_s: float = 30.0,
                 external: bool = False, client_rack: str | None = None) -> None:
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
        self._routes = Routes(bootstrap, timeout=timeout_s, external=external, client_rack=client_rack)
        self.external = external  # brokers at their advertised external addresses (see Routes)
        self.clustered = False
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
            self.clustered = bool(metadata.get("cluster"))
            if self.clustered:
                await self._routes.metadata(self.topics)
                self._data = await self._coordinator_connection()
                self._membership = await self._coordinator_connection()
            else:
                broker = metadata["brokers"][0]
                host = broker.get("host") or self._admin.host
                port = broker.get("consumer_port") or self._admin.port
                self._data = await Connection.open(host, port)
                self._membership = await Connection.open(host, port)
            view = await self._first_join()
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
                try:
                    await self._data.request({"api": int(ApiKey.LEAVE_GROUP), "group": self.group,
                                              "member_id": self.member_id}, timeout=self.timeout_s)
                except Exception as exc:
                    if not self.clustered or not self._retriable(exc):
                        raise
                    # the coordinator moved: it forgot this member already
        finally:
            for connection in (self._data, self._membership):
                if connection is not None:
                    connection.close()
            await self._admin.close()
            self._routes.close()

    # -- cluster: the coordinator ---------------------------------------------------------------

    async def _coordinator_connection(self) -> Connection:
        """A new connection to the group's coordinator (FIND_COORDINATOR on any broker), retried
        with backoff until timeout_s while the coordinator moves or is not elected yet."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        attempt = 0
        while True:
            try:
                connection = await self._routes.any_connection()
                found = (await connection.request({"api": int(ApiKey.FIND_COORDINATOR), "group": self.group},
                                                  timeout=self.timeout_s)).header
                host = (found.get("external_host") if self.external else None) or found["host"]
                return await Connection.open(host, found["consumer_port"], timeout=min(self.timeout_s, 10.0))
            except Exception as exc:
                if not self._retriable(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                with contextlib.suppress(Exception):
                    await self._routes.metadata()  # the broker asked may be the one that died

    @staticmethod
    def _retriable(exc: BaseException) -> bool:
        return retriable(exc, True) or (isinstance(exc, BrokerError) and exc.code == ErrorCode.NOT_COORDINATOR)

    async def _data_request(self, header: dict[str, Any]) -> dict[str, Any]:
        """A request on the data connection; against a cluster retried at the (new) coordinator."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        attempt = 0
        while True:
            try:
                if self._data is None or self._data.closed:
                    self._data = await self._coordinator_connection()
                return (await self._data.request(header, timeout=self.timeout_s)).header
            except Exception as exc:
                if not self.clustered or not self._retriable(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
                if self._data is not None:
                    self._data.close()
                await asyncio.sleep(backoff(attempt))
                attempt += 1

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

    async def _first_join(self) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                return await self._join()
            except Exception as exc:
                if not self.clustered or not self._retriable(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
                await self._membership_moved(exc)

    async def _heartbeat_loop(self) -> None:
        assert self._membership is not None
        # Heartbeats carry the newest generation seen (adopted or pending), so a pending
        # rebalance is answered once and the next heartbeat is held again instead of spinning.
        seen_generation, member_id = self.generation, self.member_id
        while True:
            try:
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
            except Exception as exc:
                if not self.clustered:
                    if isinstance(exc, TimeoutError | ConnectionClosedError):
                        self._failure = exc
                        return
                    raise
                if not self._retriable(exc):
                    self._failure = exc
                    raise
                await self._membership_moved(exc)
                continue
            if view["status"] != "ok" or view["generation"] != seen_generation:
                self._pending_view = view
                seen_generation, member_id = view["generation"], view["member_id"]

    async def _membership_moved(self, error: BaseException) -> None:
        """Cluster: the coordinator moved or died; reconnect to the new one (the next heartbeat
        there gets UNKNOWN_MEMBER and joins again)."""
        log.warning("group %s: coordinator lost (%s); finding it again", self.group, error)
        if self._membership is not None:
            self._membership.close()
        await asyncio.sleep(backoff(0))
        try:
            self._membership = await self._coordinator_connection()
        except Exception as exc:
            self._failure = exc
            raise

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
                    self.positions[tp] = await self._list_offset(tp[0], tp[1], self.start_at)

    async def _list_offset(self, topic: str, partition: int, at: str) -> int:
        if not self.clustered:
            return await self._admin.list_offset(topic, partition, at)
        where = {"earliest": EARLIEST, "latest": LATEST}[at]
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        attempt = 0
        while True:
            try:
                connection = await self._routes.leader_connection(topic, partition, "consumer")
                response = await connection.request({"api": int(ApiKey.LIST_OFFSETS), "topic": topic,
                                                     "partition": partition, "at": where}, timeout=self.timeout_s)
                return int(response.header["offset"])
            except Exception as exc:
                if not retriable(exc, True) or asyncio.get_running_loop().time() > deadline:
                    raise
                self._routes.invalidate(topic)
                await asyncio.sleep(backoff(attempt))
                attempt += 1

    async def _maybe_adopt(self) -> None:
        if self._failure is not None:
            raise ConnectionClosedError(f"group membership connection failed: {self._failure}")
        view, self._pending_view = self._pending_view, None
        if view is not None:
            await self._adopt(view)

    # -- offsets --------------------------------------------------------------------------------

    async def committed(self, partitions: list[tuple[str, int]] | None = None) -> dict[tuple[str, int], int]:
        header: dict[str, Any] = {"api": int(ApiKey.FETCH_OFFSETS), "group": self.group}
        if partitions is not None:
            header["partitions"] = [list(tp) for tp in partitions]
        response = await self._data_request(header)
        return {(t, p): o for t, p, o in response["offsets"]}

    async def commit(self, offsets: dict[tuple[str, int], int] | None = None) -> None:
        """Commit `offsets` (default: the current positions of the assigned partitions)."""
        wanted = dict(self.positions) if offsets is None else offsets
        changed = {tp: o for tp, o in wanted.items() if self._committed.get(tp) != o}
        if not changed:
            return
        await self._data_request(
            {"api": int(ApiKey.COMMIT_OFFSETS), "group": self.group, "member_id": self.member_id,
             "generation": self.generation, "offsets": [[t, p, o] for (t, p), o in changed.items()]})
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
        if self.clustered:
            return await self._fetch_clustered(wait)
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

    async def _fetch_clustered(self, wait: int) -> list[Message]:
        """One fetch per partition leader, at once; a retriable error refreshes the metadata and
        the partitions it concerned are fetched again by the next call."""
        by_leader: dict[int, list[tuple[str, int]]] = {}
        for topic, partition in self.positions:
            if topic not in self._routes.leaders:
                with contextlib.suppress(Exception):
                    await self._routes.metadata(self.topics)
            by_leader.setdefault(self._routes.reader_of(topic, partition), []).append((topic, partition))
        results = await asyncio.gather(*(self._fetch_from(tps, wait) for tps in by_leader.values()),
                                       return_exceptions=True)
        out, failed = merge_fetches(results)
        if failed:
            for topic in self.topics:
                self._routes.invalidate(topic)
            if not out:
                await asyncio.sleep(backoff(1))
        return out

    async def _fetch_from(self, partitions: list[tuple[str, int]], wait: int) -> tuple[list[Message], bool]:
        connection = await self._routes.leader_connection(partitions[0][0], partitions[0][1], "consumer", read=True)
        header: dict[str, Any] = {
            "api": int(ApiKey.FETCH), "max_wait_ms": wait, "min_bytes": 1, "max_bytes": self.max_bytes,
            "partitions": [{"topic": t, "partition": p, "offset": self.positions[(t, p)]} for t, p in partitions
                           if (t, p) in self.positions],
        }
        if self._routes.client_rack is not None:
            header["follower_read"] = True
        response = await connection.request(header, timeout=self.timeout_s + wait / 1000)
        payload = memoryview(response.payload)
        out: list[Message] = []
        pos = 0
        stale = False
        for entry in response.header["partitions"]:
            tp, size = (entry["topic"], entry["partition"]), entry.get("size", 0)
            data = payload[pos : pos + size]
            pos += size
            if entry["error"]:
                if retriable(BrokerError(entry["error"], ""), True):
                    stale = True
                elif entry["error"] == ErrorCode.OFFSET_OUT_OF_RANGE:
                    self.positions[tp] = await self._list_offset(tp[0], tp[1], "earliest")
                else:
                    raise BrokerError(entry["error"], entry.get("message", ""))
                continue
            if size and tp in self.positions:
                messages, next_position = decode_batches(tp[0], tp[1], data, self.positions[tp])
                self.positions[tp] = next_position
                out.extend(messages)
        return out, stale

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            for message in await self.getmany():
                yield message


async def describe_group(bootstrap: str, group: str, *, timeout_s: float = 30.0) -> dict[str, Any]:
    """DESCRIBE_GROUP at the group's coordinator (against a cluster: found with FIND_COORDINATOR,
    retried with backoff while it moves)."""
    routes = Routes(bootstrap, timeout=timeout_s)
    try:
        await routes.metadata([])
        deadline = asyncio.get_running_loop().time() + timeout_s
        attempt = 0
        while True:
            try:
                connection = await routes.any_connection()
                if routes.clustered:
                    found = (await connection.request({"api": int(ApiKey.FIND_COORDINATOR), "group": group},
                                                      timeout=timeout_s)).header
                    connection = await routes.connection(found["host"], found["producer_port"])
                header = (await connection.request({"api": int(ApiKey.DESCRIBE_GROUP), "group": group},
                                                   timeout=timeout_s)).header
                return {k: v for k, v in header.items() if k not in ("corr", "error")}
            except Exception as exc:
                if not (routes.clustered and GroupConsumer._retriable(exc)) or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                with contextlib.suppress(Exception):
                    await routes.metadata([])
    finally:
        routes.close()


async def list_groups(bootstrap: str, *, timeout_s: float = 30.0) -> list[str]:
    """Every group with members or committed offsets (against a cluster: the union of what each
    live broker coordinates)."""
    routes = Routes(bootstrap, timeout=timeout_s)
    try:
        await routes.metadata([])
        if not routes.clustered:
            connection = await routes.any_connection()
            return list((await connection.request({"api": int(ApiKey.LIST_GROUPS)}, timeout=timeout_s)).header["groups"])
        names: set[str] = set()
        for broker in routes.brokers.values():
            connection = await routes.connection(broker["host"], broker["producer_port"])
            names.update((await connection.request({"api": int(ApiKey.LIST_GROUPS)}, timeout=timeout_s)).header["groups"])
        return sorted(names)
    finally:
        routes.close()
