"""Topic administration and cluster metadata over the protocol (what ``rustmq topic`` uses)."""

from __future__ import annotations

import asyncio
from typing import Any

from rustmq.client.connection import Connection, parse_address
from rustmq.client.errors import BrokerError, ConnectionClosedError
from rustmq.client.routing import backoff
from rustmq.protocol.api import EARLIEST, LATEST, ApiKey, ErrorCode


class Admin:
    """Metadata and topic operations against the broker at ``bootstrap`` ('host:port')."""

    def __init__(self, bootstrap: str = "localhost:9092", *, timeout: float = 30.0) -> None:
        # A bootstrap list ('host:port,host:port') is tried in order; the first that answers is used.
        self.addresses = [parse_address(a.strip()) for a in bootstrap.split(",") if a.strip()]
        self.host, self.port = self.addresses[0]
        self._timeout = timeout
        self._connection: Connection | None = None

    async def start(self) -> Admin:
        for index, (host, port) in enumerate(self.addresses):
            try:
                self._connection = await Connection.open(host, port, timeout=self._timeout)
            except OSError:
                if index == len(self.addresses) - 1:
                    raise
                continue
            self.host, self.port = host, port
            break
        return self

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

    async def __aenter__(self) -> Admin:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, api: ApiKey, **fields: Any) -> dict[str, Any]:
        assert self._connection is not None, "call start() first"
        response = await self._connection.request({"api": int(api), **fields}, timeout=self._timeout)
        header = dict(response.header)
        for key in ("corr", "error"):
            header.pop(key, None)
        return header

    async def metadata(self, topics: list[str] | None = None, *, create: bool = False) -> dict[str, Any]:
        """Brokers and topics; with create=True missing topics are auto-created (if the broker allows)."""
        return await self._call(ApiKey.METADATA, topics=topics, create=create)

    async def create_topic(self, name: str, partitions: int | None = None, config: dict[str, Any] | None = None, *,
                           replication_factor: int | None = None, min_insync_replicas: int | None = None) -> dict[str, Any]:
        """Create a topic; in a cluster, on every broker: replication_factor defaults to
        min(3, brokers), min_insync_replicas to min(2, replication_factor)."""
        fields: dict[str, Any] = {"topic": name, "partitions": partitions, "config": config}
        if replication_factor is not None:
            fields["replication_factor"] = replication_factor
        if min_insync_replicas is not None:
            fields["min_insync_replicas"] = min_insync_replicas
        return await self._call(ApiKey.CREATE_TOPIC, **fields)

    async def delete_topic(self, name: str) -> dict[str, Any]:
        return await self._call(ApiKey.DELETE_TOPIC, topic=name)

    async def describe_topic(self, name: str) -> dict[str, Any]:
        return await self._call(ApiKey.DESCRIBE_TOPIC, topic=name)

    async def list_topics(self) -> list[str]:
        return list((await self._call(ApiKey.LIST_TOPICS))["topics"])

    async def add_partitions(self, name: str, total: int) -> dict[str, Any]:
        return await self._call(ApiKey.ADD_PARTITIONS, topic=name, partitions=total)

    async def alter_topic_config(self, name: str, changes: dict[str, Any] | None = None, *,
                                 reset: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """Set config overrides of a topic and/or drop some (`reset`); returns the topic's
        description with its new `config` and `overrides`. INVALID_CONFIG changes nothing."""
        return await self._call(ApiKey.ALTER_TOPIC_CONFIG, topic=name, set=changes or {}, reset=list(reset))

    async def broker_stats(self) -> dict[str, Any]:
        return await self._call(ApiKey.BROKER_STATS)

    async def configure_queue(self, topic: str, subscription: str | None = None, *,
                              reset: list[str] | tuple[str, ...] = (), **settings: Any) -> dict[str, Any]:
        """Override queue settings for one subscription of `topic`, or with subscription=None
        for every subscription of the topic (the topic layer, e.g. a per-topic ``ttl_ms``).

        Settings: ack_wait_ms, max_deliveries, max_in_flight, max_lookahead, priority_weights,
        default_priority, ttl_ms (None: no TTL), max_delay_ms; `reset` names settings to drop
        back to the inherited value. Durable once this returns; returns what describe_queue does.
        """
        return await self._queue_call(ApiKey.QUEUE_CONFIGURE, topic=topic, subscription=subscription,
                                      set=settings, reset=list(reset))

    async def describe_queue(self, topic: str, subscription: str | None = None) -> dict[str, Any]:
        """Broker defaults, topic and subscription overrides, effective settings; with a
        subscription also per-partition state (ack floor, in flight, counters), without one the
        topic's subscription names."""
        return await self._queue_call(ApiKey.QUEUE_DESCRIBE, topic=topic, subscription=subscription)

    async def _queue_call(self, api: ApiKey, *, topic: str, **fields: Any) -> dict[str, Any]:
        """A queue request at the coordinator of the topic's subscriptions: this broker when it
        is (or in standalone mode); else, against a cluster, the one FIND_COORDINATOR names,
        retried with backoff while it moves (NOT_COORDINATOR) until the timeout."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        attempt = 0
        while True:
            try:
                return await self._call(api, topic=topic, **fields)
            except BrokerError as exc:
                if exc.code is not ErrorCode.NOT_COORDINATOR:
                    raise
                last: Exception = exc
            try:
                found = await self._call(ApiKey.FIND_COORDINATOR, key_type="queue", topic=topic)
                coordinator = await Connection.open(found["host"], found["producer_port"], timeout=self._timeout)
                try:
                    response = await coordinator.request({"api": int(api), "topic": topic, **fields}, timeout=self._timeout)
                finally:
                    coordinator.close()
                return {k: v for k, v in response.header.items() if k not in ("corr", "error")}
            except (BrokerError, ConnectionClosedError, OSError, TimeoutError) as exc:
                if isinstance(exc, BrokerError) and exc.code is not ErrorCode.NOT_COORDINATOR:
                    raise
                last = exc
            if asyncio.get_running_loop().time() > deadline:
                raise last
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def list_offset(self, topic: str, partition: int, at: int | str) -> int:
        """Offset at 'earliest', 'latest' or a timestamp in ms (first offset at or after it)."""
        where = {"earliest": EARLIEST, "latest": LATEST}.get(at, at) if isinstance(at, str) else at
        return int((await self._call(ApiKey.LIST_OFFSETS, topic=topic, partition=partition, at=where))["offset"])
