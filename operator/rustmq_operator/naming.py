"""Names and labels of everything the operator creates for one RustMQCluster (like _helpers.tpl).

Children carry an explicit label set built here and nothing copied from the CR: copying the
CR's labels (ArgoCD's ``app.kubernetes.io/instance``) or annotations (its tracking id) onto
children makes ArgoCD adopt and prune them in a loop. ``app.kubernetes.io/instance`` is
therefore taken from the CR *name*. The pod selector is a subset that never changes, because a
StatefulSet's selector is immutable. Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

MANAGED_BY: Final = "rustmq-operator"
FIELD_MANAGER: Final = "rustmq-operator"
CLUSTER_LABEL: Final = "rustmq.io/cluster"
CONFIG_HASH_ANNOTATION: Final = "rustmq.io/config-hash"
DATA_VOLUME: Final = "data"
POD_NAME_LABEL: Final = "statefulset.kubernetes.io/pod-name"  # set on each pod by the StatefulSet controller
BROKER_LABEL: Final = "rustmq.io/broker"
TLS_VOLUME: Final = "tls"
TLS_DIR: Final = "/etc/rustmq/tls"  # tls.crt, tls.key, ca.crt of the Secret (no subPath: updates reach the pod)
AUTH_VOLUME: Final = "auth"
AUTH_DIR: Final = "/etc/rustmq/auth"  # tokens, acl.yaml, broker-token of the auth Secret (whole: updates reach the pod)


def statefulset(cluster: str) -> str:
    return cluster


def client_service(cluster: str) -> str:
    return cluster


def headless_service(cluster: str) -> str:
    return f"{cluster}-headless"


def metrics_service(cluster: str) -> str:
    return f"{cluster}-metrics"


def external_service(cluster: str) -> str:
    return f"{cluster}-external"


def config_map(cluster: str) -> str:
    return f"{cluster}-config"


def listeners_config_map(cluster: str) -> str:
    """Per-broker external addresses (``broker-<id>: <host>``), read by the brokers."""
    return f"{cluster}-listeners"


def broker_external_service(cluster: str, ordinal: int) -> str:
    """The LoadBalancer Service of one broker (``services.external.perBroker``).

    Short on purpose: cluster names go up to 52 characters and ordinals to 63, and a Service
    name is a DNS label of at most 63 (``<cluster>-<n>-external`` would need 64)."""
    return f"{cluster}-ext-{ordinal}"


def auth_secret(cluster: str, secret_name: str | None) -> str:
    """The Secret with the token file, the ACL file and the brokers' own token (spec.auth)."""
    return secret_name or f"{cluster}-auth"


def tls_secret(cluster: str, secret_name: str | None) -> str:
    """The Secret the brokers' certificate comes from (spec.tls.secretName, default <name>-tls)."""
    return secret_name or f"{cluster}-tls"


def certificate(cluster: str) -> str:
    """The cert-manager Certificate that fills the TLS Secret (spec.tls.certManager)."""
    return cluster


def broker_service_account(cluster: str) -> str:
    """ServiceAccount, Role and RoleBinding of the brokers (coordination through the API)."""
    return f"{cluster}-broker"


def pod(cluster: str, ordinal: int) -> str:
    return f"{cluster}-{ordinal}"


def claim(cluster: str, ordinal: int) -> str:
    """The PVC the StatefulSet controller creates for a broker from the ``data`` template."""
    return f"{DATA_VOLUME}-{cluster}-{ordinal}"


def selector_labels(cluster: str) -> dict[str, str]:
    """Labels that select the broker pods; also the StatefulSet's immutable selector."""
    return {
        "app.kubernetes.io/name": "rustmq",
        "app.kubernetes.io/component": "broker",
        CLUSTER_LABEL: cluster,
    }


def labels(cluster: str) -> dict[str, str]:
    """The full label set on every child."""
    return {
        **selector_labels(cluster),
        "app.kubernetes.io/instance": cluster,
        "app.kubernetes.io/part-of": "rustmq",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector_string(cluster: str) -> str:
    """The pod selector in the string form of the scale subresource's labelSelectorPath."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(cluster).items()))


def listener_key(ordinal: int) -> str:
    return f"broker-{ordinal}"


def ordinal_of(pod_name: str, cluster: str) -> int | None:
    """The StatefulSet ordinal of ``<cluster>-<n>``, or None for a pod of another set."""
    prefix = f"{cluster}-"
    suffix = pod_name[len(prefix) :] if pod_name.startswith(prefix) else ""
    return int(suffix) if suffix.isdigit() else None
