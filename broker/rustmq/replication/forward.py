"""Placing a client's records on a partition's leader, wherever it is (clients that cannot route).

The seed's simple produce (docs/protocol.md section 8) has no metadata and no error handling
beyond a code: a client behind one load balancer reaches an arbitrary broker. In cluster mode
the receiving connection builds one batch per (topic, partition) and pass, and ``Forwarder``
places it:

- on this broker when it leads the partition: appended here, answered once the in-sync replicas
  have it (acks=all; fsynced too on a ``flush.mode: always`` topic);
- otherwise as a PRODUCE with acks=all to the leader's producer port, over one connection per
  leader broker (rustmq.client.connection, so TLS whenever the brokers speak TLS, exactly as the
  replica fetchers do), pipelined, at most ``max_inflight`` forwarded requests at once in all.

Retries happen only after a *definite* refusal (NOT_LEADER, FENCED_LEADER_EPOCH, an unknown
topic or partition on a leader that has not read the state yet, a connection that could not be
opened): nothing was written, so a retry cannot duplicate. A request whose connection dropped
after it was sent, or that outlived ``timeout_s``, has an unknown outcome and is answered with
REQUEST_TIMEOUT, never retried. Every attempt is bounded by the same deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from rustmq.client.connection import Connection
from rustmq.client.errors import ClientError
from rustmq.cluster import state as cstate
from rustmq.protocol.api import ApiKey, ErrorCode, RequestError

if TYPE_CHECKING:
    from rustmq.server.broker import Broker
    from rustmq.server.replicated import ClusterRoles


class _NodeSettings(Protocol):
    @property
    def broker_id(self) -> int: ...

    @property
    def poll_s(self) -> float: ...


class ForwardingNode(Protocol):
    """What the forwarder needs of its cluster node (rustmq.replication.node.ClusterNode)."""

    broker: Broker
    roles: ClusterRoles
    members: dict[int, dict[str, Any]]

    @property
    def settings(self) -> _NodeSettings: ...

    def request_sync(self) -> None: ...


log = logging.getLogger("rustmq.replication.forward")

# Refusals after which nothing was written: the leader moved or has not caught up with the state.
RETRIABLE = frozenset({ErrorCode.NOT_LEADER, ErrorCode.FENCED_LEADER_EPOCH, ErrorCode.UNKNOWN_TOPIC,
                       ErrorCode.UNKNOWN_PARTITION})
CONNECT_TIMEOUT_S = 2.0


class _Retry(Exception):
    """A definite refusal: nothing was written; look the leader up again."""


class Forwarder:
    def __init__(self, node: ForwardingNode, *, timeout_s: float, max_inflight: int) -> None:
        self._node = node
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_inflight)
        self._connections: dict[int, Connection] = {}
        self._connecting: dict[int, asyncio.Lock] = {}
        self.forwarded_batches = 0

    async def place(self, topic: str, partition: int, batch: bytes, record_count: int) -> int:
        """Append batch (built by this broker) to topic/partition's log on its leader once the
        in-sync replicas have it; the base offset, or RequestError with the code to answer."""
        node = self._node
        deadline = time.monotonic() + self.timeout_s
        pause = node.settings.poll_s
        last = "no leader"
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    state = node.roles.topics.get(topic)
                    if state is None:
                        raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"unknown topic {topic!r}")
                    if partition >= len(state.partitions):
                        raise RequestError(ErrorCode.UNKNOWN_PARTITION, f"topic {topic!r} has {len(state.partitions)} partitions")
                    leader = state.partitions[partition].leader
                    try:
                        if leader == node.settings.broker_id:
                            return await self._here(topic, partition, batch, record_count)
                        if leader != cstate.NO_LEADER:
                            return await self._there(leader, topic, partition, batch, deadline)
                    except _Retry as exc:
                        last = str(exc)
                    node.request_sync()
                    await asyncio.sleep(pause)
        except TimeoutError:
            raise RequestError(ErrorCode.REQUEST_TIMEOUT, f"{topic}/{partition}: not placed on its leader within "
                               f"{self.timeout_s} s ({last}); the records may or may not be stored") from None

    async def _here(self, topic: str, partition: int, batch: bytes, record_count: int) -> int:
        broker = self._node.broker
        try:
            produced = broker.produce(topic, partition, None, batch, built_here=record_count, require_insync=True)
        except RequestError as exc:
            if exc.code in RETRIABLE:
                raise _Retry(exc.message) from None
            raise
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finish(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def replicated(error: BaseException | None) -> None:
            if error is None and produced.always_durable:
                try:
                    broker.when_durable(produced.log, produced.last_offset, finish)
                except Exception as exc:
                    finish(exc)
                return
            finish(error)

        self._node.roles.when_replicated(produced.role, produced.last_offset + 1, replicated)
        await done  # a NOT_LEADER here (lease lost, leadership moved) has an unknown outcome: not retried
        return produced.base_offset

    async def _there(self, leader: int, topic: str, partition: int, batch: bytes, deadline: float) -> int:
        async with self._slots:
            connection = await self._connection(leader)
            remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                future = connection.send({"api": int(ApiKey.PRODUCE), "topic": topic, "partition": partition,
                                          "acks": 3, "timeout_ms": remaining_ms}, batch)
            except ClientError as exc:  # closed before the write: nothing sent
                raise _Retry(f"broker {leader}: {exc}") from None
            assert future is not None
            self.forwarded_batches += 1
            try:
                response = await future
            except ClientError as exc:
                raise RequestError(ErrorCode.REQUEST_TIMEOUT, f"forwarding to broker {leader}: {exc}; "
                                   "the records may or may not be stored") from None
        header: dict[str, Any] = response.header
        code = int(header.get("error", 0))
        if code:
            try:
                error = ErrorCode(code)
            except ValueError:
                error = ErrorCode.INTERNAL_ERROR
            message = f"leader {leader}: {header.get('message', error.name)}"
            if error in RETRIABLE:
                raise _Retry(message)
            raise RequestError(error, message)
        return int(header["base_offset"])

    async def _connection(self, broker_id: int) -> Connection:
        connection = self._connections.get(broker_id)
        if connection is not None and not connection.closed:
            return connection
        lock = self._connecting.setdefault(broker_id, asyncio.Lock())
        async with lock:
            connection = self._connections.get(broker_id)
            if connection is not None and not connection.closed:
                return connection
            member = self._node.members.get(broker_id)
            if member is None:
                raise _Retry(f"broker {broker_id} is not a live member")
            try:
                connection = await Connection.open(member["host"], member["producer_port"], timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError, ClientError) as exc:
                raise _Retry(f"cannot reach broker {broker_id}: {exc}") from None
            self._connections[broker_id] = connection
            return connection

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
