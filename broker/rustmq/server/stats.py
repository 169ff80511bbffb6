"""Broker counters and latency histograms as plain Python objects.

Updated on the event loop thread once per batch or request (never per message), read by the
admin layer's Prometheus collector at scrape time. Gauges (offsets, sizes, connection counts)
are not stored here at all: the collector computes them from the live objects when scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS_S: tuple[float, ...] = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)


class Histogram:
    """Cumulative-at-read histogram with fixed upper bounds (Prometheus semantics)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs ending with '+Inf', as Prometheus wants them."""
        out, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class TopicStats:
    messages_in: int = 0
    bytes_in: int = 0
    batches_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0


@dataclass(slots=True)
class MaintenanceStats:
    """What the periodic retention and compaction task did (rustmq.app), since start."""

    retention_segments_deleted: int = 0
    compactions: int = 0  # partitions whose sealed segments were rewritten
    compaction_failures: int = 0
    compaction_bytes_reclaimed: int = 0  # segment bytes before minus after
    compaction_records_removed: int = 0  # superseded values and expired tombstones


@dataclass(slots=True)
class BrokerStats:
    topics: dict[str, TopicStats] = field(default_factory=dict)
    request_errors: Counter[str] = field(default_factory=Counter)  # by ErrorCode name
    requests: Counter[str] = field(default_factory=Counter)  # by ApiKey name (plus "SIMPLE_PRODUCE")
    connections_accepted: int = 0
    connections_rejected: int = 0
    connections_idle_closed: int = 0  # closed by the broker after idle_timeout_s
    produce_latency: Histogram = field(default_factory=Histogram)  # receive to append done
    durable_latency: Histogram = field(default_factory=Histogram)  # append done to fsync done
    fetch_latency: Histogram = field(default_factory=Histogram)  # receive to response written
    maintenance: MaintenanceStats = field(default_factory=MaintenanceStats)

    def topic(self, name: str) -> TopicStats:
        stats = self.topics.get(name)
        if stats is None:
            stats = self.topics[name] = TopicStats()
        return stats
