"""The RustMQCluster spec as the operator reads it: defaults, quantities and semantic checks.

The API server already defaults and validates a CR against the CRD schema (crds/), so in a
healthy cluster every field below is present by the time the operator sees it. The operator
still applies the same defaults itself, for two reasons: objects stored before a default was
added come back without it, and the rendering tests can start from a bare spec. A unit test
walks the CRD schema and asserts that its defaults and ``DEFAULTS`` agree, so the two cannot
drift apart.

``problems()`` repeats the CEL rules that do not need the previous object (distinct ports, a
positive size, perBroker with a LoadBalancer) for CRs admitted before a rule existed: a violation makes the
cluster Stalled with reason InvalidSpec instead of rendering something broken. Pure: no I/O.
"""

from __future__ import annotations

import copy
import decimal
import re
from collections.abc import Mapping
from typing import Any, Final

GROUP: Final = "rustmq.io"
VERSION: Final = "v1alpha1"
PLURAL: Final = "rustmqclusters"
KIND: Final = "RustMQCluster"
API_VERSION: Final = f"{GROUP}/{VERSION}"

PAUSE_ANNOTATION: Final = "rustmq.io/pause-reconciliation"

DEFAULTS: Final[dict[str, Any]] = {
    "replicas": 1,
    "image": "rustmq/broker:0.1.0",
    "imagePullPolicy": "IfNotPresent",
    "partitions": 12,
    "ports": {"producer": 9092, "consumer": 9093, "metrics": 9094},
    "config": {
        "dataDir": "/data/rustmq",
        "logLevel": "INFO",
        "flush": {"mode": "interval", "intervalMs": 1000},
    },
    "resources": {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "1000m", "memory": "2Gi"},
    },
    "storage": {
        "size": "10Gi",
        "retentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Drain"},
    },
    "services": {
        "headless": {"publishNotReadyAddresses": True},
        "client": {},
        "metrics": {"enabled": True},
        "external": {
            "enabled": False,
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Cluster",
            "loadBalancerSourceRanges": [],
            "exposeMetrics": True,
            "perBroker": {"enabled": False},
        },
    },
    "monitoring": {
        "serviceMonitor": {"enabled": True, "interval": "30s", "scrapeTimeout": "10s"},
        "prometheusRule": {"enabled": False},
    },
    "podTemplate": {"terminationGracePeriodSeconds": 60},
    "scaling": {"drainTimeoutSeconds": 3600, "handoverTimeoutSeconds": 120},
    "rack": {"topologyKey": "topology.kubernetes.io/zone"},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "networkPolicy": {"enabled": False, "clients": [{"podSelector": {}}], "monitoringNamespace": "monitoring"},
    "tls": {"enabled": False, "mutual": False, "admin": False},
    "auth": {"enabled": False, "brokerToken": True, "certPrincipal": "cn", "adminAuth": "writes"},
}

# Broker settings in spec.config that are plain RUSTMQ_<FIELD> variables of rustmq.config.
CONFIG_ENV: Final[dict[str, str]] = {
    "dataDir": "RUSTMQ_DATA_DIR",
    "maxFrameBytes": "RUSTMQ_MAX_FRAME_BYTES",
    "maxConnections": "RUSTMQ_MAX_CONNECTIONS",
    "logLevel": "RUSTMQ_LOG_LEVEL",
}

_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIX: Final[dict[str, decimal.Decimal]] = {
    "": decimal.Decimal(1),
    "n": decimal.Decimal("1e-9"),
    "u": decimal.Decimal("1e-6"),
    "m": decimal.Decimal("1e-3"),
    "k": decimal.Decimal(10) ** 3,
    "M": decimal.Decimal(10) ** 6,
    "G": decimal.Decimal(10) ** 9,
    "T": decimal.Decimal(10) ** 12,
    "P": decimal.Decimal(10) ** 15,
    "E": decimal.Decimal(10) ** 18,
    "Ki": decimal.Decimal(2) ** 10,
    "Mi": decimal.Decimal(2) ** 20,
    "Gi": decimal.Decimal(2) ** 30,
    "Ti": decimal.Decimal(2) ** 40,
    "Pi": decimal.Decimal(2) ** 50,
    "Ei": decimal.Decimal(2) ** 60,
}


class InvalidQuantityError(ValueError):
    """A string that is not a Kubernetes resource quantity."""


def parse_quantity(value: str | int) -> decimal.Decimal:
    """Return a Kubernetes quantity ("10Gi", "500m", 3) as a number of base units."""
    if isinstance(value, int):
        return decimal.Decimal(value)
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise InvalidQuantityError(f"{value!r} is not a quantity such as 10Gi or 500m")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return decimal.Decimal(number) * decimal.Decimal(10) ** int(suffix[1:])
    return decimal.Decimal(number) * _SUFFIX[suffix]


def with_defaults(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a deep copy of ``spec`` with every missing field filled from ``DEFAULTS``.

    Objects merge key by key; lists and scalars given by the user replace the default whole,
    which is how the API server's structural defaulting behaves too.
    """
    return _merge(DEFAULTS, dict(spec or {}))


def _merge(default: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = copy.deepcopy(dict(given))
    for key, value in default.items():
        if key not in merged or merged[key] is None:
            merged[key] = copy.deepcopy(value)
        elif isinstance(value, Mapping) and isinstance(merged[key], Mapping):
            merged[key] = _merge(value, merged[key])
    return merged


def problems(spec: Mapping[str, Any]) -> list[str]:
    """Return human-readable reasons why a defaulted spec cannot be rendered (empty if fine)."""
    found: list[str] = []
    if spec["replicas"] < 0:
        found.append("replicas cannot be negative (use 0 to hibernate the cluster)")
    ports = spec["ports"]
    numbers = [ports["producer"], ports["consumer"], ports["metrics"]]
    if len(set(numbers)) != len(numbers):
        found.append("ports must be distinct: producer, consumer and metrics each need their own port")
    try:
        if parse_quantity(spec["storage"]["size"]) <= 0:
            found.append("storage.size must be a positive quantity such as 10Gi")
    except InvalidQuantityError as error:
        found.append(f"storage.size: {error}")
    external = spec["services"]["external"]
    if external["perBroker"]["enabled"] and (not external["enabled"] or external["type"] != "LoadBalancer"):
        found.append(
            "services.external.perBroker needs services.external.enabled with type LoadBalancer "
            "(each broker gets its own load balancer address)"
        )
    monitoring_wanted = spec["monitoring"]["serviceMonitor"]["enabled"]
    if monitoring_wanted and not spec["services"]["metrics"]["enabled"]:
        found.append(
            "monitoring.serviceMonitor.enabled needs services.metrics.enabled, "
            "since the ServiceMonitor scrapes the metrics Service"
        )
    if spec["tls"]["admin"] and not spec["tls"]["enabled"]:
        found.append("tls.admin needs tls.enabled: the admin port serves the same certificate")
    return found


def is_paused(metadata: Mapping[str, Any]) -> bool:
    """True when the CR carries ``rustmq.io/pause-reconciliation: "true"``."""
    annotations = metadata.get("annotations") or {}
    return str(annotations.get(PAUSE_ANNOTATION, "")).lower() == "true"
