"""Prometheus exposition of the broker, computed at scrape time from the core's plain state.

A custom collector on a per-broker registry (never the global one, so several brokers can
live in one test process): counters come from ``BrokerStats`` (incremented per batch or request
by the core), gauges such as log end offsets, sizes and connection counts are read from the live
partition logs when /metrics is scraped, so no label set goes stale after a topic is deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from rustmq.admin import cluster_metrics, coordination_metrics
from rustmq.server.stats import BrokerStats, Histogram


class BrokerCollector(Collector):
    def __init__(self, stats: BrokerStats, get_broker: Callable[[], Any], is_ready: Callable[[], bool]) -> None:
        self._stats = stats
        self._get_broker = get_broker
        self._is_ready = is_ready

    def collect(self) -> Iterator[Any]:
        stats = self._stats
        yield _gauge("rustmq_ready", "1 once every partition is recovered and the ports listen", float(self._is_ready()))
        per_topic = {
            "messages_in": "Records appended",
            "bytes_in": "Batch bytes appended",
            "batches_in": "Record batches appended",
            "messages_out": "Offsets delivered to consumers",
            "bytes_out": "Batch bytes delivered to consumers",
        }
        for field, help_text in per_topic.items():
            family = CounterMetricFamily(f"rustmq_{field}", help_text, labels=["topic"])
            for topic, topic_stats in sorted(stats.topics.items()):
                family.add_metric([topic], getattr(topic_stats, field))
            yield family
        requests = CounterMetricFamily("rustmq_requests", "Requests received, by API", labels=["api"])
        for api_name, count in sorted(stats.requests.items()):
            requests.add_metric([api_name], count)
        yield requests
        errors = CounterMetricFamily("rustmq_request_errors", "Requests answered with an error, by code", labels=["code"])
        for code, count in sorted(stats.request_errors.items()):
            errors.add_metric([code], count)
        yield errors
        accepted = CounterMetricFamily("rustmq_connections_accepted", "Connections accepted")
        accepted.add_metric([], stats.connections_accepted)
        yield accepted
        rejected = CounterMetricFamily("rustmq_connections_rejected", "Connections refused over max_connections")
        rejected.add_metric([], stats.connections_rejected)
        yield rejected
        for field_name, help_text in (
            ("retention_segments_deleted", "Segments deleted by retention"),
            ("compactions", "Partitions whose sealed segments key compaction rewrote"),
            ("compaction_failures", "Compaction passes that failed (logged; retried later)"),
            ("compaction_bytes_reclaimed", "Segment bytes freed by key compaction"),
            ("compaction_records_removed", "Superseded records and expired tombstones removed by key compaction"),
        ):
            counter = CounterMetricFamily(f"rustmq_{field_name}", help_text)
            counter.add_metric([], getattr(stats.maintenance, field_name))
            yield counter
        yield _histogram("rustmq_produce_latency_seconds", "Produce request: received to appended", stats.produce_latency)
        yield _histogram("rustmq_durable_ack_latency_seconds", "Durable produce: appended to fsynced (group commit)", stats.durable_latency)
        yield _histogram("rustmq_fetch_latency_seconds", "Fetch request: received to response queued (long-poll wait included)", stats.fetch_latency)
        broker = self._get_broker()
        if broker is None:
            return
        yield _gauge("rustmq_connections", "Open client connections", float(broker.connections))
        committer = broker.committer
        for name, attribute, help_text in (
            ("rustmq_group_commit_flushes", "flush_count", "Flushes issued by the group committer"),
            ("rustmq_group_commit_requests", "request_count", "Durable appends handed to the group committer"),
        ):
            value = getattr(committer, attribute, None)
            if isinstance(value, int):
                counter = CounterMetricFamily(name, help_text)
                counter.add_metric([], value)
                yield counter
        gauges = {
            "log_end_offset": ("Next offset to be assigned", "end_offset"),
            "log_start_offset": ("First offset still retained", "start_offset"),
            "log_durable_offset": ("Offsets below this are fsynced", "durable_offset"),
            "log_size_bytes": ("Bytes in the partition's segments", "size_bytes"),
            "log_segments": ("Segments of the partition", "segment_count"),
        }
        families = {name: GaugeMetricFamily(f"rustmq_{name}", text, labels=["topic", "partition"]) for name, (text, _) in gauges.items()}
        for topic in broker.log.topics():
            for index, plog in enumerate(topic.partitions):
                for name, (_, attribute) in gauges.items():
                    families[name].add_metric([topic.name, str(index)], float(getattr(plog, attribute)))
        yield from families.values()
        yield from coordination_metrics.collect(getattr(broker, "coordination", None))
        yield from cluster_metrics.collect(broker.cluster)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text)
    family.add_metric([], buckets=histogram.cumulative(), sum_value=histogram.sum)
    return family


def make_registry(stats: BrokerStats, get_broker: Callable[[], Any], is_ready: Callable[[], bool]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BrokerCollector(stats, get_broker, is_ready))
    ProcessCollector(registry=registry)
    return registry
