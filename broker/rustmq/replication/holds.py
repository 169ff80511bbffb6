"""Retention holds in cluster mode: the partition leader decides how far its log may be deleted.

``retain_until_consumed_by`` names consumer groups: retention (time, size, count) never deletes
a segment holding an offset one of them has not committed past (rustmq.storage.config). In
cluster mode a group's committed offsets live at its coordinator (the leader of the group's
partition of ``__rustmq_coordination``), which is usually another broker, so:

- Only the leader of a held partition runs its retention. Each retention pass first asks, for
  every group named by the topics it leads partitions of, the group's coordinator for the
  committed offsets of those partitions (one FETCH_OFFSETS per group, over the brokers' internal
  client: TLS and the broker token exactly as replica fetches). The partition's floor is the
  smallest committed offset of its named groups, capped at the high watermark; retention deletes
  whole segments below it only.
- Anything uncertain holds everything (floor 0): a coordinator unknown (no internal topic yet,
  its partition offline), unreachable, slow (each question is bounded by ``timeout_s``) or
  answering an error (NOT_COORDINATOR while it moves, LOAD_IN_PROGRESS while it replays); a
  group that never committed on the partition; a partition this broker led only since the
  last pass (no answer for it yet).
- ``retain_until_settled`` the same way, from the topic's queue coordinator (the leader of
  the partition ``partition_for(queue_key(topic))``): QUEUE_DESCRIBE lists the topic's
  subscriptions, one QUEUE_DESCRIBE per subscription gives each partition's ``ack_floor``; the
  smallest over the subscriptions that have state on the partition holds it (none: no hold,
  as standalone). An unanswered question holds everything.
- Followers never run retention on a held topic (their floor is 0): they delete only by
  following the leader's log start from their fetch responses (rustmq.replication.node,
  whole segments below ``min(leader's log start, own high watermark)``). So no replica deletes
  what its leader keeps, and a new leader starts from the floor of the old one at most.

The offsets asked are the coordinators' current view: a commit is applied there before it is
replicated, so a coordinator crash right after an answer can lose a commit whose data was
already deleted; the group did consume it (it committed after reading), and it reads on from
its reset point if it re-reads below the log start (docs/semantics.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

from rustmq.client.connection import Connection
from rustmq.client.errors import ClientError
from rustmq.coordination import internal_topic
from rustmq.protocol.api import ApiKey
from rustmq.storage import errors as storage_errors

if TYPE_CHECKING:
    from rustmq.server.replicated import ClusterRoles
    from rustmq.storage.log import Log, Topic

log = logging.getLogger("rustmq.replication.holds")

DEFAULT_TIMEOUT_S: Final = 5.0
NO_HOLD: Final = (1 << 63) - 1  # a floor that holds nothing (the high watermark caps it)


class RetentionHolds:
    """The floors of the held partitions this broker leads; `refresh` before each retention
    pass (asyncio), `floor` during it (the Log's retention callback, synchronous)."""

    def __init__(self, roles: ClusterRoles, log_: Log, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.roles = roles
        self.log = log_
        self.timeout_s = timeout_s
        self.floors: dict[tuple[str, int], int] = {}
        self._connections: dict[int, Connection] = {}

    def floor(self, topic: Topic, partition: int) -> int | None:
        if not (topic.config.retain_until_consumed_by or topic.config.retain_until_settled):
            return None
        role = self.roles.role(topic.name, partition)
        if role is None or role.tracker is None or role.leader != self.roles.broker_id:
            return 0  # a follower: it follows its leader's log start instead
        return min(self.floors.get((topic.name, partition), 0), role.tracker.high_watermark)

    def held(self) -> dict[str, list[tuple[str, int]]]:
        """group -> the held partitions this broker leads that name it."""
        wanted: dict[str, list[tuple[str, int]]] = {}
        for (name, index), role in list(self.roles.roles.items()):
            if role.tracker is None or role.leader != self.roles.broker_id:
                continue
            try:
                groups = self.log.topic(name).config.retain_until_consumed_by
            except storage_errors.UnknownTopicError:
                continue
            for group in groups:
                wanted.setdefault(group, []).append((name, index))
        return wanted

    def settled(self) -> dict[str, list[int]]:
        """topic -> the partitions of it this broker leads, for topics with retain_until_settled."""
        wanted: dict[str, list[int]] = {}
        for (name, index), role in list(self.roles.roles.items()):
            if role.tracker is None or role.leader != self.roles.broker_id:
                continue
            try:
                if self.log.topic(name).config.retain_until_settled:
                    wanted.setdefault(name, []).append(index)
            except storage_errors.UnknownTopicError:
                continue
        return wanted

    async def refresh(self) -> None:
        wanted, settled = self.held(), self.settled()
        groups, topics = sorted(wanted), sorted(settled)
        answers = await asyncio.gather(*(self._committed(g, wanted[g]) for g in groups))
        queue_answers = await asyncio.gather(*(self._ack_floors(t, settled[t]) for t in topics))
        floors: dict[tuple[str, int], int] = {}
        for group, committed in zip(groups, answers, strict=True):
            for tp in wanted[group]:
                offset = committed.get(tp, 0) if committed is not None else 0
                floors[tp] = min(floors.get(tp, offset), offset)
        for topic, acked in zip(topics, queue_answers, strict=True):
            for index in settled[topic]:
                # No subscription with state on the partition: no hold from queues (NO_HOLD,
                # capped at the high watermark by `floor`).
                offset = acked.get(index, NO_HOLD) if acked is not None else 0
                floors[(topic, index)] = min(floors.get((topic, index), offset), offset)
        self.floors = floors

    async def _ack_floors(self, topic: str, partitions: list[int]) -> dict[int, int] | None:
        """partition -> the smallest ack floor of the topic's subscriptions with state there,
        from the topic's queue coordinator; None: unknown."""
        coordinator = self._coordinator(internal_topic.queue_key(topic))
        if coordinator is None:
            return None
        broker_id, host, port = coordinator
        floors: dict[int, int] = {}
        try:
            async with asyncio.timeout(self.timeout_s):
                connection = await self._connect(broker_id, host, port)
                listed = await connection.request({"api": int(ApiKey.QUEUE_DESCRIBE), "topic": topic},
                                                  timeout=self.timeout_s)
                for subscription in listed.header.get("subscriptions", []):
                    described = await connection.request({"api": int(ApiKey.QUEUE_DESCRIBE), "topic": topic,
                                                          "subscription": subscription}, timeout=self.timeout_s)
                    for part in described.header.get("partitions", []):
                        index = int(part["partition"])
                        if index in partitions:
                            floors[index] = min(floors.get(index, NO_HOLD), int(part["ack_floor"]))
        except (ClientError, OSError, TimeoutError, KeyError, TypeError, ValueError) as exc:
            log.info("retention hold of topic %r's queue subscriptions: its coordinator (broker %d) did not "
                     "answer (%s); holding", topic, broker_id, exc)
            self._drop(broker_id)
            return None
        return floors

    async def _connect(self, broker_id: int, host: str, port: int) -> Connection:
        connection = self._connections.get(broker_id)
        if connection is None or connection.closed:
            connection = self._connections[broker_id] = await Connection.open(host, port, timeout=self.timeout_s)
        return connection

    async def _committed(self, group: str, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int] | None:
        """The group's committed offsets of `partitions` from its coordinator; None: unknown."""
        coordinator = self._coordinator(group)
        if coordinator is None:
            return None
        broker_id, host, port = coordinator
        try:
            async with asyncio.timeout(self.timeout_s):
                connection = await self._connect(broker_id, host, port)
                response = await connection.request({
                    "api": int(ApiKey.FETCH_OFFSETS), "group": group,
                    "partitions": [[t, p] for t, p in partitions]}, timeout=self.timeout_s)
        except (ClientError, OSError, TimeoutError) as exc:
            log.info("retention hold of group %r: its coordinator (broker %d) did not answer (%s); holding",
                     group, broker_id, exc)
            self._drop(broker_id)
            return None
        return {(t, p): o for t, p, o in response.header.get("offsets", [])}

    def _coordinator(self, key: str) -> tuple[int, str, int] | None:
        """The broker coordinating `key` (a group id, or a topic's queue key) and its address."""
        state = self.roles.topics.get(internal_topic.TOPIC)
        if state is None or not state.partitions:
            return None
        leader = state.partitions[internal_topic.partition_for(key, len(state.partitions))].leader
        broker = next((b for b in self.roles.brokers if b["id"] == leader), None)
        if broker is None:
            return None
        return leader, _host(broker), int(broker["consumer_port"])

    def _drop(self, broker_id: int) -> None:
        connection = self._connections.pop(broker_id, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        for broker_id in list(self._connections):
            self._drop(broker_id)


def _host(broker: dict[str, Any]) -> str:
    return str(broker.get("host") or "127.0.0.1")
