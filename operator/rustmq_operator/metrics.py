"""The operator's own Prometheus metrics, on a registry of its own (never the global one).

* ``rustmq_operator_reconcile_total{result}``: passes, by ``ok`` or ``error``;
* ``rustmq_operator_reconcile_seconds``: how long passes take;
* ``rustmq_operator_cluster_condition{namespace,name,condition}``: 1 when the condition is True,
  so an alert can say "RustMQCluster X has been Stalled for 15 minutes" without reading CRs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = prometheus_client.CollectorRegistry(auto_describe=True)
RECONCILES = prometheus_client.Counter(
    "rustmq_operator_reconcile", "Reconcile passes, by result", ["result"], registry=REGISTRY
)
RECONCILE_SECONDS = prometheus_client.Histogram(
    "rustmq_operator_reconcile_seconds",
    "Duration of reconcile passes",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)


class _Conditions(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], dict[str, bool]] = {}

    def set(self, namespace: str, name: str, conditions: Mapping[str, bool]) -> None:
        with self._lock:
            self._values[(namespace, name)] = dict(conditions)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._values.pop((namespace, name), None)

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "rustmq_operator_cluster_condition",
            "1 when the RustMQCluster's condition is True",
            labels=["namespace", "name", "condition"],
        )
        with self._lock:
            items = sorted(self._values.items())
        for (namespace, name), conditions in items:
            for condition, value in sorted(conditions.items()):
                family.add_metric([namespace, name, condition], 1.0 if value else 0.0)
        yield family


CONDITIONS = _Conditions()
REGISTRY.register(CONDITIONS)


def serve(port: int) -> None:
    """Serve /metrics on ``port`` (all interfaces) from a daemon thread."""
    prometheus_client.start_http_server(port, addr="0.0.0.0", registry=REGISTRY)
