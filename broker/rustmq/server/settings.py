"""Every limit and policy of the TCP server, in one frozen dataclass with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass

from rustmq.protocol import frames


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "0.0.0.0"
    producer_port: int = 9092
    consumer_port: int = 9093
    advertised_host: str | None = None  # host reported by METADATA; None: clients keep theirs
    broker_id: int = 0

    max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES  # larger frames: FRAME_TOO_LARGE + close
    max_connections: int = 1024  # per broker; beyond: TOO_MANY_CONNECTIONS + close
    # Requests read ahead of their responses on one connection; beyond it the socket is paused.
    max_inflight_requests: int = 256
    # Bytes queued in a transport before it is paused; with max_fetch_bytes it bounds the memory a
    # consumer that stops reading can pin: about write_buffer_high_bytes + max_fetch_bytes.
    write_buffer_high_bytes: int = 4 << 20
    max_fetch_bytes: int = 8 << 20  # cap on one fetch response's payload
    frame_timeout_s: float = 30.0  # a partially received frame older than this closes the connection
    # A connection with nothing owed to it and nothing received for this long is closed (Kafka's
    # connections.max.idle.ms is 10 minutes too); clients reconnect on their next request.
    idle_timeout_s: float = 600.0

    # Count limits (beyond them: LIMIT_REACHED, or INVALID_CONFIG for one topic's own values).
    max_topics: int = 1000  # topics per broker, DLQ topics included
    max_partitions: int = 10_000  # partitions of all topics together
    max_partitions_per_topic: int = 10_000  # at most the protocol's 10,000
    max_segment_bytes: int = 1 << 30  # largest segment_bytes a client may set on a topic
    # Long-poll FETCH / QUEUE_FETCH / HEARTBEAT waiting at once on one connection; beyond it a
    # long poll is answered at once with what there is (as if max_wait_ms were 0).
    max_long_polls_per_connection: int = 16
    # File descriptors and memory maps kept free: new connections (TOO_MANY_CONNECTIONS) and
    # new topics, partitions and produce that may roll segments (LIMIT_REACHED) are refused
    # before the process runs out of either.
    fd_headroom: int = 64
    map_headroom: int = 1000

    # After a failed write, /readyz answers 503 while the data directory has less free space.
    readiness_min_free_bytes: int = 16 << 20

    auto_create_topics: bool = True  # produce to an unknown topic creates it with default_partitions
    default_partitions: int = 12
    default_topic: str = "default"  # where simple produce messages without a topic go

    shutdown_timeout_s: float = 10.0  # how long SIGTERM waits for in-flight requests
    # Cluster mode: a coordination partition's tail since its last snapshot beyond which its
    # coordinator appends a new snapshot (also the internal topic's segment size; docs/cluster.md).
    coordination_compact_bytes: int = 8 << 20
