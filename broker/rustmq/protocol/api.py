"""API keys, error codes and the typed requests of the RustMQ protocol.

Every request header carries ``api`` (an ApiKey) and ``corr`` (a u32 correlation id the response
echoes). Every response header carries ``corr`` and ``error`` (an ErrorCode, 0 on success) and,
when ``error`` is not 0, a human ``message``. The parse_* functions here turn a decoded header
into a NamedTuple or raise RequestError(INVALID_REQUEST) naming the offending field, so a wrong
type in a field gets the same answer from every API. docs/protocol.md lists every field.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Final, NamedTuple

import crc32c

MAX_CORRELATION_ID: Final = 2**32 - 1
MAX_PARTITIONS_PER_TOPIC: Final = 10_000


class ApiKey(IntEnum):
    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    CREATE_TOPIC = 4
    DELETE_TOPIC = 5
    DESCRIBE_TOPIC = 6
    LIST_TOPICS = 7
    BROKER_STATS = 8
    ADD_PARTITIONS = 9
    ALTER_TOPIC_CONFIG = 10
    # Consumer coordination (issue 4; rustmq.server.coordination_handlers, docs/protocol.md)
    INIT_PRODUCER = 20
    JOIN_GROUP = 21
    HEARTBEAT = 22
    LEAVE_GROUP = 23
    COMMIT_OFFSETS = 24
    FETCH_OFFSETS = 25
    DESCRIBE_GROUP = 26
    LIST_GROUPS = 27
    FIND_COORDINATOR = 28  # cluster mode: which broker coordinates a group (docs/cluster.md)
    QUEUE_FETCH = 30
    QUEUE_ACK = 31
    QUEUE_NACK = 32
    QUEUE_EXTEND = 33
    DLQ_REPLAY = 34
    PRODUCE_IDEMPOTENT = 35
    QUEUE_CONFIGURE = 36
    QUEUE_DESCRIBE = 37
    # Security (docs/security.md)
    AUTHENTICATE = 60


class ErrorCode(IntEnum):
    """Wire error codes; the same numbers are the low 16 bits of a simple-produce error reply."""

    NONE = 0
    MALFORMED_FRAME = 1  # header length does not fit, msgpack does not decode, not a map
    UNKNOWN_API = 2
    INVALID_REQUEST = 3  # a missing field or a field of the wrong type or range
    UNKNOWN_TOPIC = 4
    UNKNOWN_PARTITION = 5
    CORRUPT_BATCH = 6  # bad CRC, bad framing or bad counts in a record batch
    OFFSET_OUT_OF_RANGE = 7
    TOPIC_EXISTS = 8
    INVALID_CONFIG = 9  # invalid topic name, partition count or log config
    STORAGE_FULL = 10
    STORAGE_ERROR = 11
    FRAME_TOO_LARGE = 12  # sent once, then the connection is closed
    SHUTTING_DOWN = 13
    REQUEST_TIMEOUT = 14
    TOO_MANY_CONNECTIONS = 15  # sent once, then the connection is closed
    BATCH_TOO_LARGE = 16  # one batch is larger than a whole segment of the topic
    LIMIT_REACHED = 17  # a broker-wide limit: topics, partitions, groups, subscriptions, fds, maps
    LOAD_IN_PROGRESS = 18  # a producer table or a coordinator partition is being rebuilt from its log: retry
    # Consumer coordination (docs/semantics.md)
    UNKNOWN_MEMBER = 20  # session expired or left: join again
    ILLEGAL_GENERATION = 21  # a rebalance happened: heartbeat, adopt the assignment, retry
    PARTITION_NOT_ASSIGNED = 22
    INVALID_SESSION_TIMEOUT = 23
    GROUP_FULL = 24
    INVALID_COMMIT = 25
    INVALID_QUEUE_REQUEST = 26
    OUT_OF_ORDER_SEQUENCE = 27
    PRODUCER_FENCED = 28
    GROUP_ERROR = 29  # any other refused group request (e.g. a join without topics)
    # Cluster mode (docs/cluster.md)
    NOT_LEADER = 40  # this broker does not lead the partition (or its lease is in doubt): refresh metadata, retry
    NOT_ENOUGH_REPLICAS = 41  # acks=all refused: the in-sync set is below min_insync_replicas
    FENCED_LEADER_EPOCH = 42  # a request carried an older leader epoch than the partition's
    CLUSTER_UNAVAILABLE = 43  # the coordination store (Kubernetes API) did not answer; retry
    NOT_COORDINATOR = 44  # another broker coordinates this group now: FIND_COORDINATOR again, retry
    # Security (docs/security.md); the connection stays open after both
    AUTHENTICATION_FAILED = 50  # a token that does not check out, or no token file on the broker
    AUTHORIZATION_FAILED = 51  # the principal may not do this (the message names the verb and resource)
    INTERNAL_ERROR = 99


class Acks(IntEnum):
    NONE = 0  # no response at all; errors are only logged and counted
    LEADER = 1  # respond once the batches are in the log (page cache)
    DURABLE = 2  # respond once the batches are fsynced (group commit)
    ALL = 3  # cluster mode: respond once every in-sync replica has the batches (standalone: as LEADER)


EARLIEST: Final = -2
LATEST: Final = -1


class RequestError(Exception):
    """A request the broker answers with an error code (the connection stays open)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProduceRequest(NamedTuple):
    topic: str
    partition: int | None
    key: bytes | None
    acks: Acks
    timeout_ms: int


class FetchPartition(NamedTuple):
    topic: str
    partition: int
    offset: int
    max_bytes: int
    leader_epoch: int = -1  # replica fetch: the leader epoch the follower knows (-1: unchecked)
    last_fetched_epoch: int = -1  # replica fetch: epoch of the follower's last batch (-1: none)


class FetchRequest(NamedTuple):
    partitions: list[FetchPartition]
    max_wait_ms: int
    min_bytes: int
    max_bytes: int
    replica_id: int | None = None  # set by a follower broker: a replication fetch
    follower_read: bool = False  # a consumer that may read from an in-sync follower (its client_rack)


class ListOffsetsRequest(NamedTuple):
    topic: str
    partition: int
    at: int  # EARLIEST, LATEST, or a timestamp in ms


class CreateTopicRequest(NamedTuple):
    topic: str
    partitions: int | None
    config: dict[str, Any]
    replication_factor: int | None = None  # cluster mode; None: min(3, brokers)
    min_insync_replicas: int | None = None  # cluster mode; None: min(2, replication factor)


def _field(header: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = ...) -> Any:
    value = header.get(name, default)
    if value is ...:
        raise RequestError(ErrorCode.INVALID_REQUEST, f"missing field {name!r}")
    if value is None and default is None:
        return None
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in _as_tuple(kinds):
        raise RequestError(
            ErrorCode.INVALID_REQUEST,
            f"field {name!r} must be {_kind_names(kinds)}, got {type(value).__name__}",
        )
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    return " or ".join(kind.__name__ for kind in _as_tuple(kinds))


def _int(header: dict[str, Any], name: str, low: int, high: int, default: Any = ...) -> Any:
    value = _field(header, name, int, default)
    if value is not None and not low <= value <= high:
        raise RequestError(ErrorCode.INVALID_REQUEST, f"field {name!r} must be in [{low}, {high}], got {value}")
    return value


def parse_envelope(header: dict[str, Any]) -> tuple[int, int]:
    """The (api, corr) of a request header; corr is validated first so errors can echo it."""
    corr = _int(header, "corr", 0, MAX_CORRELATION_ID)
    api = _int(header, "api", 0, 2**16 - 1)
    return api, corr


def parse_produce(header: dict[str, Any]) -> ProduceRequest:
    acks = _int(header, "acks", 0, 3, int(Acks.LEADER))
    return ProduceRequest(
        topic=_field(header, "topic", str),
        partition=_int(header, "partition", 0, MAX_PARTITIONS_PER_TOPIC - 1, None),
        key=_field(header, "key", bytes, None),
        acks=Acks(acks),
        timeout_ms=_int(header, "timeout_ms", 0, 3_600_000, 30_000),
    )


def parse_fetch(header: dict[str, Any], broker_max_bytes: int) -> FetchRequest:
    raw = _field(header, "partitions", list)
    if not raw:
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'partitions' must not be empty")
    max_bytes = min(_int(header, "max_bytes", 1, 2**31 - 1, broker_max_bytes), broker_max_bytes)
    partitions = []
    for item in raw:
        if not isinstance(item, dict):
            raise RequestError(ErrorCode.INVALID_REQUEST, "each entry of 'partitions' must be a map")
        partitions.append(
            FetchPartition(
                topic=_field(item, "topic", str),
                partition=_int(item, "partition", 0, MAX_PARTITIONS_PER_TOPIC - 1),
                # A negative offset is that partition's OFFSET_OUT_OF_RANGE, not the request's error.
                offset=_int(item, "offset", -(2**63), 2**63 - 1),
                max_bytes=min(_int(item, "max_bytes", 1, 2**31 - 1, max_bytes), max_bytes),
                leader_epoch=_int(item, "leader_epoch", -1, 2**31 - 1, -1),
                last_fetched_epoch=_int(item, "last_fetched_epoch", -1, 2**31 - 1, -1),
            )
        )
    return FetchRequest(
        partitions=partitions,
        max_wait_ms=_int(header, "max_wait_ms", 0, 600_000, 500),
        min_bytes=_int(header, "min_bytes", 0, 2**31 - 1, 1),
        max_bytes=max_bytes,
        replica_id=_int(header, "replica_id", 0, 2**31 - 1, None),
        follower_read=_field(header, "follower_read", bool, False),
    )


def parse_list_offsets(header: dict[str, Any]) -> ListOffsetsRequest:
    return ListOffsetsRequest(
        topic=_field(header, "topic", str),
        partition=_int(header, "partition", 0, MAX_PARTITIONS_PER_TOPIC - 1),
        at=_int(header, "at", EARLIEST, 2**63 - 1),
    )


def parse_topic_names(header: dict[str, Any]) -> list[str] | None:
    names = _field(header, "topics", list, None)
    if names is not None and not all(isinstance(name, str) for name in names):
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'topics' must be a list of strings")
    return names


def parse_create_topic(header: dict[str, Any]) -> CreateTopicRequest:
    return CreateTopicRequest(
        topic=_field(header, "topic", str),
        partitions=_int(header, "partitions", 1, MAX_PARTITIONS_PER_TOPIC, None),
        config=_field(header, "config", dict, None) or {},
        replication_factor=_int(header, "replication_factor", 1, 255, None),
        min_insync_replicas=_int(header, "min_insync_replicas", 1, 255, None),
    )


def parse_topic(header: dict[str, Any]) -> str:
    return _field(header, "topic", str)


class AlterTopicConfigRequest(NamedTuple):
    topic: str
    changes: dict[str, Any]  # config key -> new override (checked by rustmq.storage.config)
    reset: list[str]  # keys whose override is dropped (back to the broker default)


def parse_alter_topic_config(header: dict[str, Any]) -> AlterTopicConfigRequest:
    changes = _field(header, "set", dict, None) or {}
    reset = _field(header, "reset", list, None) or []
    if not all(isinstance(key, str) for key in reset):
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'reset' must be a list of config keys")
    if not changes and not reset:
        raise RequestError(ErrorCode.INVALID_REQUEST, "give 'set' and/or 'reset'")
    return AlterTopicConfigRequest(_field(header, "topic", str), changes, reset)


def parse_add_partitions(header: dict[str, Any]) -> tuple[str, int]:
    return _field(header, "topic", str), _int(header, "partitions", 1, MAX_PARTITIONS_PER_TOPIC)


class QueueConfigureRequest(NamedTuple):
    topic: str
    subscription: str | None  # None: the topic layer, inherited by every subscription
    values: dict[str, Any]  # setting -> value (checked by rustmq.coordination.queue)
    reset: list[str]  # settings to drop back to the inherited value


def _subscription(header: dict[str, Any]) -> str | None:
    name = _field(header, "subscription", str, None)
    if name is not None and not 1 <= len(name) <= 255:
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'subscription' must be 1 to 255 characters or nil")
    return name


def parse_queue_configure(header: dict[str, Any]) -> QueueConfigureRequest:
    values = _field(header, "set", dict, None) or {}
    reset = _field(header, "reset", list, None) or []
    if not all(isinstance(name, str) for name in values):
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'set' must map setting names (str) to values")
    if not all(isinstance(name, str) for name in reset):
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'reset' must be a list of setting names")
    if not values and not reset:
        raise RequestError(ErrorCode.INVALID_REQUEST, "give 'set' and/or 'reset'")
    return QueueConfigureRequest(_field(header, "topic", str), _subscription(header), values, reset)


def parse_queue_describe(header: dict[str, Any]) -> tuple[str, str | None]:
    return _field(header, "topic", str), _subscription(header)


def partition_for_key(key: bytes, partition_count: int) -> int:
    """The partition of a keyed record: CRC-32C (Castagnoli) of the key bytes modulo the count.

    Clients and the broker use the same function, so records with equal keys land together no
    matter who picks the partition.
    """
    return crc32c.crc32c(key) % partition_count


def error_header(corr: int | None, code: ErrorCode, message: str) -> dict[str, Any]:
    """The response header for a failed request (corr is None when the frame had no usable id)."""
    return {"corr": corr, "error": int(code), "message": message}
