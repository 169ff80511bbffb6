"""Render the children of one RustMQCluster from the Jinja2 templates in ``templates/``.

Templates are files, one child kind each, so a reader sees the manifests the cluster gets. Every
value is written through ``| tojson``: JSON scalars and flow collections are valid YAML, so a
user's string (a label value, an annotation, an image name) can never break out of its field,
which YAML assembled by string formatting cannot promise. ``StrictUndefined`` turns a missing
key into an error instead of an empty string. The output is parsed back with ``yaml.safe_load``
and returned as plain dicts in a fixed order, ready for server-side apply; the same inputs give
byte-identical objects.

The config hash covers the rendered pod template and the broker environment, and nothing else:
``replicas`` is not in either, so scaling never restarts the brokers that already run, while any
change a broker would notice (image, settings, resources, pod placement) changes the hash and is
rolled out by the operator one broker at a time. Pure: no I/O.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

import jinja2
import yaml

from rustmq_operator import naming
from rustmq_operator import spec as specs

_ENVIRONMENT: Final = jinja2.Environment(
    loader=jinja2.PackageLoader("rustmq_operator", "templates"),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)

BROKER_UID: Final = 10001
CLUSTER_MODE: Final = True  # see Target.cluster_mode

DEFAULT_POD_SECURITY_CONTEXT: Final[dict[str, Any]] = {
    "runAsNonRoot": True,
    "runAsUser": BROKER_UID,
    "runAsGroup": BROKER_UID,
    "fsGroup": BROKER_UID,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}


class RenderError(Exception):
    """A template could not be rendered from this spec (a bug, or a spec the schema let through)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Everything the children depend on: the CR's identity, its spec and the operator's decisions."""

    name: str
    namespace: str
    uid: str
    spec: Mapping[str, Any]  # defaulted, see spec.with_defaults()
    replicas: int  # what the StatefulSet should run now (may differ from spec while refused)
    claim_size: str  # what the StatefulSet's claim template asks for
    service_monitor: bool = False  # wanted and its CRD exists
    prometheus_rule: bool = False
    # broker ordinal -> the address of its perBroker LoadBalancer Service (from its status)
    listener_hosts: Mapping[int, str] = dataclasses.field(default_factory=dict)
    # Tell the brokers to coordinate through the Kubernetes API: the RUSTMQ_CLUSTER_*
    # environment and a ServiceAccount token (every cluster, even of one broker, so that scaling
    # up needs no mode change; tests/operator/test_broker_contract.py checks every variable).
    cluster_mode: bool = CLUSTER_MODE
    certificate: bool = False  # spec.tls.certManager given and cert-manager's CRD served


@dataclasses.dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]
    config_hash: str

    def by_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def statefulset(self) -> dict[str, Any]:
        (found,) = self.by_kind("StatefulSet")
        return found


def owner_reference(target: Target) -> dict[str, Any]:
    return {
        "apiVersion": specs.API_VERSION,
        "kind": specs.KIND,
        "name": target.name,
        "uid": target.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def broker_environment(
    spec: Mapping[str, Any], cluster: str | None = None, cluster_mode: bool = False
) -> dict[str, str]:
    """The RUSTMQ_* settings the brokers read (the ConfigMap's data), all as strings.

    Names are rustmq.config's: ``RUSTMQ_<FIELD>`` for plain fields and ``RUSTMQ_LOG`` (JSON)
    for the default log settings of every topic (segments, retention, flush policy).
    """
    config = spec["config"]
    env: dict[str, str] = {}
    if cluster_mode:
        if cluster is None:
            raise RenderError("cluster mode needs the cluster's name")
        env.update(RUSTMQ_CLUSTER_MODE="kubernetes", RUSTMQ_CLUSTER_NAME=cluster)
    env |= {
        "RUSTMQ_PARTITIONS": str(spec["partitions"]),
        "RUSTMQ_PRODUCER_PORT": str(spec["ports"]["producer"]),
        "RUSTMQ_CONSUMER_PORT": str(spec["ports"]["consumer"]),
        "RUSTMQ_METRICS_PORT": str(spec["ports"]["metrics"]),
        "RUSTMQ_HOST": "0.0.0.0",
        "RUSTMQ_LOG": json.dumps(log_settings(config), sort_keys=True, separators=(",", ":")),
    }
    tls = spec["tls"]
    if tls["enabled"]:
        env["RUSTMQ_TLS_CERT_FILE"] = f"{naming.TLS_DIR}/tls.crt"
        env["RUSTMQ_TLS_KEY_FILE"] = f"{naming.TLS_DIR}/tls.key"
        if tls["mutual"]:
            env["RUSTMQ_TLS_CLIENT_CA_FILE"] = f"{naming.TLS_DIR}/ca.crt"
            env["RUSTMQ_TLS_CLIENT_AUTH"] = "required"
        if tls["admin"]:
            env["RUSTMQ_ADMIN_TLS"] = "true"  # HTTPS on the metrics port: probes and scrapes follow
        if tls["mutual"] or tls.get("certManager"):
            # Brokers check each other (replica fetches) against the Secret's CA, which both
            # cases guarantee; otherwise against the system's CAs (a publicly signed certificate).
            env["RUSTMQ_TLS_PEER_CA_FILE"] = f"{naming.TLS_DIR}/ca.crt"
    auth = spec["auth"]
    if auth["enabled"]:
        # Files of the auth Secret, re-read by the broker when the kubelet updates them: a new
        # token or ACL rule reaches the running brokers without a roll.
        env["RUSTMQ_AUTH_TOKEN_FILE"] = f"{naming.AUTH_DIR}/tokens"
        env["RUSTMQ_AUTH_ACL_FILE"] = f"{naming.AUTH_DIR}/acl.yaml"
        env["RUSTMQ_AUTH_CERT_PRINCIPAL"] = auth["certPrincipal"]
        env["RUSTMQ_ADMIN_AUTH"] = auth["adminAuth"]
        if auth["brokerToken"]:
            env["RUSTMQ_AUTH_BROKER_TOKEN_FILE"] = f"{naming.AUTH_DIR}/broker-token"
    for field, variable in specs.CONFIG_ENV.items():
        if config.get(field) is not None:
            env[variable] = str(config[field])
    for key, value in (config.get("extra") or {}).items():
        env.setdefault(f"RUSTMQ_{key}", str(value))
    return dict(sorted(env.items()))


def log_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """spec.config's log fields in the shape of the broker's LogConfig (snake case, ms)."""
    flush = config["flush"]
    settings: dict[str, Any] = {
        "flush": {"mode": flush["mode"], "interval_ms": flush["intervalMs"]},
    }
    if flush.get("bytes") is not None:
        settings["flush"]["bytes"] = flush["bytes"]
    if config.get("segmentBytes") is not None:
        settings["segment_bytes"] = config["segmentBytes"]
    if config.get("retentionHours") is not None:
        settings["retention_ms"] = config["retentionHours"] * 3_600_000
    if config.get("retentionBytes") is not None:
        settings["retention_bytes"] = config["retentionBytes"]
    return settings


# Downward-API helpers that only feed $(...) expansion below; not broker settings.
POD_ENV_HELPERS: Final = frozenset({"RUSTMQ_POD_NAME", "RUSTMQ_POD_NAMESPACE"})


def container_env(
    cluster: str, spec: Mapping[str, Any], cluster_mode: bool = False
) -> list[dict[str, Any]]:
    """Per-pod settings from the downward API, then the user's extra variables."""
    host = f"$(RUSTMQ_POD_NAME).{naming.headless_service(cluster)}.$(RUSTMQ_POD_NAMESPACE).svc"
    downward: list[dict[str, Any]] = [
        {"name": "RUSTMQ_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RUSTMQ_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {
            "name": "RUSTMQ_BROKER_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}},
        },
        {"name": "RUSTMQ_ADVERTISED_HOST", "value": host},
    ]
    if cluster_mode:
        downward += [
            {"name": "RUSTMQ_CLUSTER_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "RUSTMQ_INTERNAL_HOST", "value": host},
        ]
        rack_label = spec["rack"]["topologyKey"]
        if rack_label:  # a pod without the label gets "" (no rack), not an error
            downward.append({"name": "RUSTMQ_RACK",
                             "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{rack_label}']"}}})
    return downward + [dict(item) for item in spec["podTemplate"].get("env") or []]


def listeners(target: Target) -> dict[str, str]:
    """The ``<cluster>-listeners`` data: ``broker-<id>`` for every broker, its perBroker
    LoadBalancer address where one is assigned, else empty."""
    per_broker = target.spec["services"]["external"]["perBroker"]["enabled"]
    return {
        naming.listener_key(ordinal): (target.listener_hosts.get(ordinal, "") if per_broker else "")
        for ordinal in range(target.replicas)
    }


def certificate_dns_names(target: Target) -> list[str]:
    """Every name a client may dial a broker by inside the cluster, then the user's."""
    name, namespace = target.name, target.namespace
    client, headless = naming.client_service(name), naming.headless_service(name)
    found = [
        client,
        f"{client}.{namespace}",
        f"{client}.{namespace}.svc",
        f"{headless}.{namespace}.svc",
        f"*.{headless}.{namespace}.svc",
    ]
    extra = (target.spec["tls"].get("certManager") or {}).get("dnsNames") or []
    return found + [dns for dns in extra if dns not in found]


def pod_security_context(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The secure defaults with ``podTemplate.securityContext`` merged over them key by key
    (``seccompProfile`` too), so setting one field (``fsGroup``, ``supplementalGroups``) keeps
    the others instead of silently dropping runAsNonRoot and the seccomp profile."""
    given = spec["podTemplate"].get("securityContext") or {}
    merged = copy.deepcopy(DEFAULT_POD_SECURITY_CONTEXT)
    for key, value in given.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def default_affinity(cluster: str) -> dict[str, Any]:
    """Prefer one broker per node: a node failure then takes down at most one broker."""
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": naming.selector_labels(cluster)},
                    },
                }
            ]
        }
    }


def default_topology_spread(cluster: str) -> list[dict[str, Any]]:
    return [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": naming.selector_labels(cluster)},
        }
    ]


def config_hash(pod_template: Mapping[str, Any], environment: Mapping[str, str]) -> str:
    """sha256 over the canonical JSON of what the brokers run; 16 hex digits are plenty here."""
    canonical = json.dumps(
        {"podTemplate": pod_template, "environment": environment},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _templates(target: Target) -> list[tuple[str, dict[str, Any]]]:
    """(template, extra context) of every child, in apply order: identity and RBAC before the
    pods that use them."""
    spec = target.spec
    names: list[tuple[str, dict[str, Any]]] = [
        ("serviceaccount.yaml.j2", {}),
        ("role.yaml.j2", {}),
        ("rolebinding.yaml.j2", {}),
        ("configmap.yaml.j2", {}),
        ("configmap-listeners.yaml.j2", {}),
        ("service-headless.yaml.j2", {}),
        ("service-client.yaml.j2", {}),
    ]
    external = spec["services"]["external"]
    if spec["services"]["metrics"]["enabled"]:
        names.append(("service-metrics.yaml.j2", {}))
    if external["enabled"]:
        names.append(("service-external.yaml.j2", {}))
        if external["perBroker"]["enabled"]:
            for ordinal in range(target.replicas):
                names.append((
                    "service-broker-external.yaml.j2",
                    {
                        "ordinal": ordinal,
                        "pod_name": naming.pod(target.name, ordinal),
                        "names": {"broker_external_service": naming.broker_external_service(target.name, ordinal)},
                    },
                ))
    if spec["networkPolicy"]["enabled"]:
        names.append(("networkpolicy.yaml.j2", {}))
    if spec["podDisruptionBudget"]["enabled"]:
        names.append(("poddisruptionbudget.yaml.j2", {}))
    names.append(("statefulset.yaml.j2", {}))
    if target.certificate:
        names.append(("certificate.yaml.j2", {}))
    if target.service_monitor:
        names.append(("servicemonitor.yaml.j2", {}))
    if target.prometheus_rule:
        names.append(("prometheusrule.yaml.j2", {}))
    return names


def render(target: Target) -> Rendered:
    """Render every child the cluster should have, in apply order.

    Raises RenderError when a template fails; the caller reports it on the CR.
    """
    spec = target.spec
    environment = broker_environment(spec, target.name, target.cluster_mode)
    context: dict[str, Any] = {
        "cluster": {"name": target.name, "namespace": target.namespace},
        "spec": spec,
        "replicas": target.replicas,
        "claim_size": target.claim_size,
        "labels": naming.labels(target.name),
        "selector": naming.selector_labels(target.name),
        "owner": owner_reference(target),
        "broker_env": environment,
        "env": container_env(target.name, spec, target.cluster_mode),
        "cluster_mode": target.cluster_mode,
        "listeners": listeners(target),
        "broker_label": naming.BROKER_LABEL,
        "pod_name_label": naming.POD_NAME_LABEL,
        "tls_dir": naming.TLS_DIR,
        "auth_dir": naming.AUTH_DIR,
        "certificate_dns_names": certificate_dns_names(target),
        "pod_security_context": pod_security_context(spec),
        "default_affinity": default_affinity(target.name),
        "default_topology_spread": default_topology_spread(target.name),
        "names": {
            "statefulset": naming.statefulset(target.name),
            "client_service": naming.client_service(target.name),
            "headless_service": naming.headless_service(target.name),
            "metrics_service": naming.metrics_service(target.name),
            "external_service": naming.external_service(target.name),
            "config_map": naming.config_map(target.name),
            "listeners_config_map": naming.listeners_config_map(target.name),
            "service_account": naming.broker_service_account(target.name),
            "tls_secret": naming.tls_secret(target.name, spec["tls"].get("secretName")),
            "tls_volume": naming.TLS_VOLUME,
            "auth_secret": naming.auth_secret(target.name, spec["auth"].get("secretName")),
            "auth_volume": naming.AUTH_VOLUME,
            "certificate": naming.certificate(target.name),
            "data_volume": naming.DATA_VOLUME,
        },
    }
    objects: list[dict[str, Any]] = []
    for template_name, extra in _templates(target):
        local = {**context, **extra}
        if "names" in extra:
            local["names"] = {**context["names"], **extra["names"]}
        try:
            text = _ENVIRONMENT.get_template(template_name).render(local)
            obj = yaml.safe_load(text)
        except (jinja2.TemplateError, TypeError, yaml.YAMLError) as error:
            # StrictUndefined fed into tojson raises TypeError rather than UndefinedError.
            raise RenderError(f"{template_name}: {error}") from error
        if not isinstance(obj, dict):
            raise RenderError(f"{template_name} did not render an object")
        objects.append(obj)

    statefulset = next(obj for obj in objects if obj["kind"] == "StatefulSet")
    pod_template = statefulset["spec"]["template"]
    digest = config_hash(copy.deepcopy(pod_template), environment)
    pod_template["metadata"]["annotations"][naming.CONFIG_HASH_ANNOTATION] = digest
    return Rendered(objects=objects, config_hash=digest)
