"""Topic administration for both of a broker's front doors: the binary protocol's requests
(CREATE_TOPIC, DELETE_TOPIC, ADD_PARTITIONS, ALTER_TOPIC_CONFIG, DESCRIBE_TOPIC) and the admin
port's HTTP topic routes (rustmq.admin.app).

A standalone broker changes its own log at once (synchronously: a request pipelined after a
CREATE_TOPIC on the same connection must find the topic). In cluster mode every change goes
through the cluster state in the Kubernetes API (rustmq.replication), so it applies to every
broker whichever one was asked; the answer comes when the change is stored. Having one module
for both doors keeps them from drifting apart: before it, the HTTP routes created a topic on
the answering broker only, a stranger to the rest of the cluster.

Answers are plain dicts (the wire header fields, the HTTP JSON body). `describe` in cluster mode
merges the cluster's view of each partition (leader, epoch, replicas, in-sync set) with this
broker's local replica figures where it holds one.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from rustmq.coordination import internal_topic
from rustmq.protocol import api
from rustmq.protocol.api import ErrorCode, RequestError
from rustmq.server.broker import Broker


def clustered(broker: Broker) -> bool:
    return broker.cluster is not None


# -- standalone: synchronous ------------------------------------------------------------------

def create_here(broker: Broker, request: api.CreateTopicRequest) -> dict[str, Any]:
    topic = broker.create_topic(request.topic, request.partitions, request.config)
    return {"topic": topic.name, "partitions": len(topic.partitions)}


def delete_here(broker: Broker, name: str) -> dict[str, Any]:
    broker.delete_topic(name)
    return {"topic": name}


def add_partitions_here(broker: Broker, name: str, total: int) -> dict[str, Any]:
    topic = broker.add_partitions(name, total)
    return {"topic": name, "partitions": len(topic.partitions)}


def alter_config_here(broker: Broker, request: api.AlterTopicConfigRequest) -> dict[str, Any]:
    topic = broker.alter_topic_config(request.topic, request.changes, request.reset)
    return {**broker.describe(topic), "overrides": topic.overrides}


# -- cluster mode: through the cluster state -------------------------------------------------

async def create_in_cluster(broker: Broker, request: api.CreateTopicRequest) -> dict[str, Any]:
    topic = await broker.cluster.admin.create_topic(
        request.topic, request.partitions, request.config, request.replication_factor, request.min_insync_replicas)
    return {"topic": topic.name, "partitions": len(topic.partitions), "replication_factor": topic.replication_factor,
            "min_insync_replicas": topic.min_insync}


async def delete_in_cluster(broker: Broker, name: str) -> dict[str, Any]:
    await broker.cluster.admin.delete_topic(name)
    return {"topic": name}


async def add_partitions_in_cluster(broker: Broker, name: str, total: int) -> dict[str, Any]:
    topic = await broker.cluster.topic_changes.add_partitions(name, total)
    return {"topic": name, "partitions": len(topic.partitions)}


async def alter_config_in_cluster(broker: Broker, request: api.AlterTopicConfigRequest) -> dict[str, Any]:
    topic, config = await broker.cluster.topic_changes.alter_topic_config(request.topic, request.changes, request.reset)
    return {"topic": topic.name, "config": config.to_dict(), "overrides": topic.config}


# -- either mode -------------------------------------------------------------------------------

async def _now(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


def create(broker: Broker, request: api.CreateTopicRequest) -> Awaitable[dict[str, Any]]:
    """The change for either mode as an awaitable; a standalone broker has made it already when
    this returns (only its answer is awaited), so callers may rely on the ordering."""
    return create_in_cluster(broker, request) if clustered(broker) else _now(create_here(broker, request))


def delete(broker: Broker, name: str) -> Awaitable[dict[str, Any]]:
    return delete_in_cluster(broker, name) if clustered(broker) else _now(delete_here(broker, name))


def add_partitions(broker: Broker, name: str, total: int) -> Awaitable[dict[str, Any]]:
    if clustered(broker):
        return add_partitions_in_cluster(broker, name, total)
    return _now(add_partitions_here(broker, name, total))


def alter_config(broker: Broker, request: api.AlterTopicConfigRequest) -> Awaitable[dict[str, Any]]:
    return alter_config_in_cluster(broker, request) if clustered(broker) else _now(alter_config_here(broker, request))


def names(broker: Broker) -> list[str]:
    """Every topic clients may see: the cluster's (wherever its replicas are) or this broker's."""
    found = broker.cluster.topics if clustered(broker) else (topic.name for topic in broker.log.topics())
    return sorted(name for name in found if not internal_topic.is_internal(name))


def describe(broker: Broker, name: str) -> dict[str, Any]:
    if not clustered(broker):
        return broker.describe(broker.topic(name))
    state = broker.cluster.topics.get(name)
    if state is None or internal_topic.is_internal(name):
        raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"unknown topic {name!r}")
    local = _local_partitions(broker, name)
    return {
        "topic": name,
        "config": broker.log.default_config.merged(state.config).to_dict(),
        "overrides": state.config,
        "replication_factor": state.replication_factor,
        "min_insync_replicas": state.min_insync,
        "partitions": [
            {"partition": index, "leader": p.leader, "leader_epoch": p.leader_epoch, "replicas": list(p.replicas),
             "isr": list(p.isr), **({"local": local[index]} if index in local else {})}
            for index, p in enumerate(state.partitions)
        ],
    }


def _local_partitions(broker: Broker, name: str) -> dict[int, dict[str, Any]]:
    try:
        here = broker.describe(broker.topic(name))
    except RequestError:
        return {}  # no replica of this topic on this broker
    return {part.pop("partition"): part for part in here["partitions"]}
