"""Where a request goes: the metadata cache, connections per broker, retry and backoff rules.

``Routes`` takes a bootstrap list ('host:port,host:port'), asks any broker that answers for
METADATA, and keeps the brokers' addresses and each partition's leader. Against a standalone
broker (METADATA without ``cluster``) every request goes to the bootstrap broker that answered,
exactly as before. Against a cluster, produce and fetch go to the partition's leader; callers
that get a retriable error (``retriable``) call ``invalidate``, wait ``backoff(attempt)``
(jittered exponential, 50 ms doubling to 1 s) and retry until their own deadline. Connections
are opened on first use and re-opened after they close, so a rolling restart costs retries, not
failures.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from rustmq.client.connection import Connection, parse_address
from rustmq.client.errors import BrokerError, ConnectionClosedError
from rustmq.protocol.api import ApiKey, ErrorCode

RETRIABLE_CODES = frozenset({
    ErrorCode.NOT_LEADER, ErrorCode.FENCED_LEADER_EPOCH, ErrorCode.CLUSTER_UNAVAILABLE,
    ErrorCode.NOT_ENOUGH_REPLICAS, ErrorCode.REQUEST_TIMEOUT, ErrorCode.SHUTTING_DOWN,
    ErrorCode.LOAD_IN_PROGRESS,
})
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 1.0


def backoff(attempt: int) -> float:
    """Full-jitter exponential backoff: uniform in [0.5, 1] of min(max, start * 2**attempt)."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_START_S * (2 ** min(attempt, 16)))
    return ceiling * (0.5 + random.random() / 2)


def retriable(exc: BaseException, clustered: bool) -> bool:
    """Whether a failed request may be retried after a metadata refresh."""
    if isinstance(exc, ConnectionClosedError | TimeoutError | OSError):
        return True
    if isinstance(exc, BrokerError):
        # Right after a create, a broker may not have applied the new topic yet.
        return exc.code in RETRIABLE_CODES or (clustered and exc.code == ErrorCode.UNKNOWN_TOPIC)
    return False


def merge_fetches(results: list[Any]) -> tuple[list[Any], bool]:
    """Merge the answers of one fetch per leader (asyncio.gather(..., return_exceptions=True),
    each answer a (fetched items, stale) pair): the items that arrived, and whether a retriable
    failure or a stale entry asks for a metadata refresh. Any other failure is raised."""
    out: list[Any] = []
    failed = False
    for result in results:
        if isinstance(result, BaseException):
            if not retriable(result, True):
                raise result
            failed = True
        else:
            got, stale = result
            out += got
            failed = failed or stale
    return out, failed


class Routes:
    def __init__(self, bootstrap: str, *, timeout: float = 30.0, external: bool = False,
                 client_rack: str | None = None) -> None:
        self.bootstrap = [parse_address(address.strip()) for address in bootstrap.split(",") if address.strip()]
        if not self.bootstrap:
            raise ValueError("the bootstrap list is empty")
        self.timeout = timeout
        # external=True: reach brokers at the addresses the operator advertises for clients
        # outside the cluster (METADATA `external_host`, one LoadBalancer per broker).
        self.external = external
        # client_rack: consumers read from an in-sync replica in this rack when there is one
        # (Kafka's fetch from the closest replica), else from the leader.
        self.client_rack = client_rack or None
        self.clustered = False
        self.brokers: dict[int, dict[str, Any]] = {}
        self.leaders: dict[str, list[int]] = {}
        self.readers: dict[str, list[int]] = {}  # per partition: the broker consumers read from
        self.metadata_header: dict[str, Any] = {}
        self._answered: tuple[str, int] = self.bootstrap[0]
        self._connections: dict[tuple[str, int], Connection] = {}
        self._lock = asyncio.Lock()

    async def connection(self, host: str, port: int) -> Connection:
        key = (host, port)
        connection = self._connections.get(key)
        if connection is None or connection.closed:
            connection = await Connection.open(host, port, timeout=min(self.timeout, 10.0))
            raced = self._connections.get(key)
            if raced is not None and not raced.closed:  # a concurrent caller opened one first: keep one
                connection.close()
                return raced
            self._connections[key] = connection
        return connection

    async def metadata(self, topics: list[str] | None = None, *, create: bool = False) -> dict[str, Any]:
        """Ask the first broker that answers (known brokers first, then the bootstrap list)."""
        candidates = [(b["host"], b["producer_port"]) for b in self.brokers.values() if b.get("host")]
        candidates = [self._answered, *candidates, *self.bootstrap]
        last: BaseException | None = None
        for address in dict.fromkeys(candidates):
            try:
                connection = await self.connection(*address)
                response = await connection.request({"api": int(ApiKey.METADATA), "topics": topics, "create": create},
                                                    timeout=self.timeout)
            except (ConnectionClosedError, TimeoutError, OSError) as exc:
                last = exc
                continue
            self._answered = address
            self._learn(response.header)
            return response.header
        raise ConnectionClosedError(f"no broker of {[f'{h}:{p}' for h, p in dict.fromkeys(candidates)]} answered: {last}")

    def _learn(self, header: dict[str, Any]) -> None:
        self.metadata_header = header
        self.clustered = bool(header.get("cluster"))
        if self.clustered:
            self.brokers = {int(b["id"]): b for b in header.get("brokers", [])}
        for entry in header.get("topics", []):
            if not entry.get("error"):
                self.leaders[entry["name"]] = [int(p.get("leader", -1)) for p in entry["partitions"]]
                self.readers[entry["name"]] = [self._reader(p) for p in entry["partitions"]]

    def _reader(self, partition: dict[str, Any]) -> int:
        """The leader, or with client_rack an in-sync replica in that rack if the leader is not."""
        leader = int(partition.get("leader", -1))
        if self.client_rack is None or leader < 0:
            return leader
        same_rack = [b for b in partition.get("isr", ()) if self.brokers.get(b, {}).get("rack") == self.client_rack]
        return leader if leader in same_rack or not same_rack else min(same_rack)

    async def any_connection(self) -> Connection:
        """A connection to the broker that last answered METADATA (for broker-wide requests)."""
        return await self.connection(*self._answered)

    def invalidate(self, topic: str) -> None:
        self.leaders.pop(topic, None)
        self.readers.pop(topic, None)

    async def partitions(self, topic: str, *, create: bool = False) -> int:
        if topic not in self.leaders:
            header = await self.metadata([topic], create=create)
            (entry,) = [t for t in header["topics"] if t["name"] == topic]
            if entry["error"]:
                raise BrokerError(entry["error"], f"topic {topic!r}")
        return len(self.leaders[topic])

    async def leader_connection(self, topic: str, partition: int, port: str = "producer", *,
                                read: bool = False) -> Connection:
        """The connection for a partition's leader ('producer' or 'consumer' port); with
        `read`, for the replica consumers read from (`reader_of`)."""
        if not self.clustered:
            if port == "consumer" and self.metadata_header.get("brokers"):
                broker = self.metadata_header["brokers"][0]
                host = broker.get("host") or self._answered[0]
                return await self.connection(host, broker.get("consumer_port") or self._answered[1])
            return await self.connection(*self._answered)
        async with self._lock:
            if topic not in self.leaders:
                await self.metadata([topic])
        leaders = self.leaders.get(topic)
        if not leaders or partition >= len(leaders):
            # A broker that has not read the cluster state yet (just restarted) may answer without
            # the topic: retriable, unlike a partition the topic really lacks.
            raise BrokerError(ErrorCode.NOT_LEADER, f"{topic}/{partition} is not in the metadata yet")
        leader = self.readers[topic][partition] if read else leaders[partition]
        broker = self.brokers.get(leader)
        if leader < 0 or broker is None:
            raise BrokerError(ErrorCode.NOT_LEADER, f"{topic}/{partition} has no live leader right now")
        host = broker.get("external_host") if self.external else None
        return await self.connection(host or broker["host"], broker[f"{port}_port"])

    def leader_of(self, topic: str, partition: int) -> int:
        leaders = self.leaders.get(topic) or []
        return leaders[partition] if partition < len(leaders) else -1

    def reader_of(self, topic: str, partition: int) -> int:
        """The broker a consumer fetches this partition from: its leader, or a rack-local
        in-sync follower (client_rack), which answers up to its own high watermark."""
        readers = self.readers.get(topic) or []
        return readers[partition] if partition < len(readers) else -1

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
