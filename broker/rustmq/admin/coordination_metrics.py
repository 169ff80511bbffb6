"""Prometheus families for consumer coordination (issue 4), computed when /metrics is scraped.

Read from the Coordinator's plain state (`Coordinator.metrics()`: lag from committed offsets
and live log end offsets, queue counters kept by the state machines, lease tables), so nothing
is counted on the request path and no label set outlives its group or subscription.

    rustmq_group_lag{group,topic,partition}            log end offset - committed offset
    rustmq_group_members{group}                        live members
    rustmq_queue_<counter>_total{subscription,topic,partition}
        delivered, redelivered, acked, nacked, lease_expired, dead_lettered, expired, skipped
    rustmq_queue_in_flight{subscription,topic,partition}   leased, not yet settled
    rustmq_queue_delayed{subscription,topic,partition}     waiting for their delivery time
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

QUEUE_COUNTERS = {
    "delivered": "Queue deliveries (first and repeated)",
    "redelivered": "Queue deliveries after a nack, lease expiry or consumer loss",
    "acked": "Queue records acknowledged",
    "nacked": "Queue records negatively acknowledged",
    "lease_expired": "Queue leases that expired unsettled",
    "dead_lettered": "Queue records moved to the dead-letter topic after max deliveries",
    "expired": "Queue records never delivered because their TTL passed",
    "skipped": "Queue records deleted by retention before they were settled",
}
_QUEUE_LABELS = ["subscription", "topic", "partition"]


def collect(coordination: Any) -> Iterator[Any]:
    """Families for `coordination` (a CoordinationService, or None when not wired)."""
    if coordination is None:
        return
    coordinator = coordination.coordinator
    snapshot = coordinator.metrics()
    lag = GaugeMetricFamily("rustmq_group_lag", "Messages a consumer group has not committed yet",
                            labels=["group", "topic", "partition"])
    for group, partitions in sorted(snapshot["group_lag"].items()):
        for key, value in sorted(partitions.items()):
            topic, _, partition = key.rpartition("/")
            lag.add_metric([group, topic, partition], float(value))
    yield lag
    members = GaugeMetricFamily("rustmq_group_members", "Live members of a consumer group", labels=["group"])
    for group_id, group in sorted(coordinator.groups.groups.items()):
        members.add_metric([group_id], float(len(group.members)))
    yield members
    counters = {name: CounterMetricFamily(f"rustmq_queue_{name}", text, labels=_QUEUE_LABELS)
                for name, text in QUEUE_COUNTERS.items()}
    in_flight = GaugeMetricFamily("rustmq_queue_in_flight", "Queue records leased and not settled", labels=_QUEUE_LABELS)
    delayed = GaugeMetricFamily("rustmq_queue_delayed", "Queue records waiting for their delivery time", labels=_QUEUE_LABELS)
    for described in snapshot["queues"]:
        labels = [str(described["subscription"]), str(described["topic"]), str(described["partition"])]
        for name, family in counters.items():
            family.add_metric(labels, float(described[name]))
        in_flight.add_metric(labels, float(described["in_flight"]))
        delayed.add_metric(labels, float(described["delayed"]))
    yield from counters.values()
    yield in_flight
    yield delayed
