"""Cluster-wide topic changes after creation: ADD_PARTITIONS and ALTER_TOPIC_CONFIG.

Both are one compare-and-swap on the topic's state shard (retried on conflict), exactly as topic
creation is (rustmq.replication.node): the new partitions are placed by the same balancing rule
as a new topic's, over the live brokers and counting every topic's existing replicas and leaders
(rustmq.cluster.state.grow); a config change replaces the topic's stored overrides. Every broker
then applies the stored topic in its state sync (``apply_local``): it creates the new partitions
in its own log and gives its partitions the new config, so each replica enforces retention (and
every other per-partition setting) on its own copy, as Kafka's replicas do.

What is refused in cluster mode, and why (``unsafe_in_cluster``):

- ``cleanup_policy`` compact or compact,delete. Compaction leaves gaps between the offsets of
  the batches it keeps, and a follower appends its leader's batches at its own log end: a
  follower fetching a compacted range would hold the records at other offsets than its leader.

Retention holds (``retain_until_consumed_by``, ``retain_until_settled``) work: the partition
leader asks the groups' and the topic's queue coordinators and followers follow its log start
(rustmq.replication.holds).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from rustmq.cluster import state as cstate
from rustmq.cluster.state import TopicState
from rustmq.cluster.store import Conflict
from rustmq.coordination import internal_topic
from rustmq.protocol.api import ErrorCode, RequestError
from rustmq.storage import errors as storage_errors
from rustmq.storage.config import LogConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from rustmq.cluster.store import ObjectStore
    from rustmq.server.broker import Broker
    from rustmq.storage.log import Log


class _NodeSettings(Protocol):
    @property
    def cluster_name(self) -> str: ...


class TopicNode(Protocol):
    """What topic changes need of the cluster node (rustmq.replication.node.ClusterNode)."""

    broker: Broker
    store: ObjectStore
    topics: dict[str, TopicState]
    members: dict[int, dict[str, Any]]

    @property
    def settings(self) -> _NodeSettings: ...

    def racks(self) -> dict[int, str]: ...

    async def refresh(self) -> None: ...

    async def _store_call(self, call: Any) -> Any: ...

log = logging.getLogger("rustmq.replication.topics")

CAS_ATTEMPTS = 8


def unsafe_in_cluster(config: LogConfig) -> str | None:
    """Why a topic config cannot be used in cluster mode yet (module docstring), or None."""
    if config.compacted:
        return ("cleanup_policy compact is not available in cluster mode yet: followers cannot "
                "replicate the offset gaps compaction leaves (docs/cluster.md)")
    return None


def check_config(default: LogConfig, overrides: dict[str, Any]) -> LogConfig:
    """The merged config of overrides; RequestError INVALID_CONFIG if invalid or unsafe here."""
    try:
        merged = default.merged(overrides)
    except (storage_errors.InvalidConfigError, ValueError, TypeError) as exc:
        raise RequestError(ErrorCode.INVALID_CONFIG, str(exc)) from None
    refusal = unsafe_in_cluster(merged)
    if refusal is not None:
        raise RequestError(ErrorCode.INVALID_CONFIG, refusal)
    return merged


class TopicChanges:
    """ADD_PARTITIONS and ALTER_TOPIC_CONFIG on any broker, applied cluster-wide."""

    def __init__(self, node: TopicNode) -> None:
        self._node = node

    async def add_partitions(self, name: str, total: int) -> TopicState:
        node = self._node
        settings = node.broker.settings

        def grow(topic: TopicState) -> TopicState:
            if total <= len(topic.partitions):
                raise RequestError(ErrorCode.INVALID_CONFIG, f"topic {name!r} has {len(topic.partitions)} partitions; "
                                   f"can only grow, not to {total}")
            if total > settings.max_partitions_per_topic:
                raise RequestError(ErrorCode.INVALID_CONFIG, f"a topic may have at most {settings.max_partitions_per_topic} "
                                   f"partitions (max_partitions_per_topic), not {total}")
            others = [t for n, t in node.topics.items() if n != name and not internal_topic.is_internal(n)]
            try:
                return cstate.grow(topic, total, sorted(node.members), [*others, topic], racks=node.racks())
            except ValueError as exc:
                raise RequestError(ErrorCode.INVALID_CONFIG, str(exc)) from None

        grown = await self._change(name, grow)
        log.info("topic %s grown to %d partitions", name, total)
        return grown

    async def alter_topic_config(self, name: str, changes: dict[str, Any], reset: list[str]) -> tuple[TopicState, LogConfig]:
        node = self._node
        default = node.broker.log.default_config
        merged: list[LogConfig] = []

        def alter(topic: TopicState) -> TopicState:
            overrides = {key: value for key, value in topic.config.items() if key not in set(reset)}
            overrides.update(changes)
            node.broker._check_topic_config(overrides)  # this broker's max_segment_bytes
            merged.append(check_config(default, overrides))
            return replace(topic, config=overrides)

        altered = await self._change(name, alter)
        log.info("topic %s config overrides now %s", name, altered.config)
        return altered, merged[-1]

    async def _change(self, name: str, change: Callable[[TopicState], TopicState]) -> TopicState:
        node = self._node
        if internal_topic.is_internal(name):  # its partition count and config belong to the broker
            raise RequestError(ErrorCode.INVALID_REQUEST, f"{name!r} is internal to the cluster and cannot be changed")
        shard = cstate.shard_name(node.settings.cluster_name, cstate.shard_of(name))
        for _ in range(CAS_ATTEMPTS):
            current = await node._store_call(node.store.get_map(shard))
            topics = cstate.decode_shard(current.value) if current is not None else {}
            topic = topics.get(name)
            if current is None or topic is None:
                raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"unknown topic {name!r}")
            topics[name] = new = change(topic)
            try:
                await node._store_call(node.store.replace_map(shard, cstate.encode_shard(topics.values()), current.version))
            except Conflict:
                continue
            await node.refresh()
            return new
        raise RequestError(ErrorCode.CLUSTER_UNAVAILABLE, f"changing {name!r}: too many concurrent changes, retry")


def apply_local(storage: Log, topic: TopicState) -> None:
    """Bring this broker's copy of a topic it holds to the stored partition count and config."""
    local = storage.topic(topic.name)
    try:
        if len(local.partitions) < len(topic.partitions):
            storage.add_partitions(topic.name, len(topic.partitions))
        if local.overrides != topic.config:
            storage.alter_topic_config(topic.name, dict(topic.config),
                                       [key for key in local.overrides if key not in topic.config])
    except (storage_errors.StorageError, ValueError, TypeError) as exc:
        log.error("%s: cannot apply the cluster's topic state here (%s); this broker keeps the old one", topic.name, exc)
