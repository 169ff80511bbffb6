"""The internal replicated topic that holds the coordination state in cluster mode.

``__rustmq_coordination`` (Kafka's ``__consumer_offsets`` idea, docs/cluster.md) is created by
the controller with `PARTITIONS` partitions and the default replication factor; the coordinator
of a consumer group is the leader of partition `partition_for(group)`. Records are the offset
store's journal entries (rustmq.coordination.offsets, rustmq.coordination.journal). Clients
cannot create, delete or write it, and it is left out of topic listings.

The hash is crc32c of the UTF-8 key, so every broker (and any tool) maps a key to the same
partition; the partition count is read from the cluster state, never from this constant, once
the topic exists.
"""

from __future__ import annotations

from typing import Any, Final

import crc32c

TOPIC: Final = "__rustmq_coordination"
INTERNAL_PREFIX: Final = "__rustmq"
PARTITIONS: Final = 8
# Nothing in it expires by retention: its coordinators compact it themselves (a snapshot of the
# live state, then the segments below it deleted; rustmq.coordination.journal.LogJournal).
CONFIG: Final[dict[str, Any]] = {"retention_ms": None, "retention_bytes": None, "retention_messages": None}


def config(segment_bytes: int) -> dict[str, Any]:
    """The topic's configuration at creation: no retention, and segments of the compaction
    threshold's size, so that the segments before a snapshot can be deleted soon after it."""
    return {**CONFIG, "segment_bytes": segment_bytes}


def partition_for(key: str, partitions: int) -> int:
    return crc32c.crc32c(key.encode()) % partitions


def queue_key(topic: str) -> str:
    """The key the queue subscriptions of `topic` are coordinated under. A topic name is
    [a-zA-Z0-9._-] only, so the NUL-led prefix keeps these keys apart from every topic and
    from every group id a client can send (FIND_COORDINATOR names the kind of key besides)."""
    return f"\x00queue\x00{topic}"


def is_internal(topic: str) -> bool:
    return topic.startswith(INTERNAL_PREFIX)
