"""Rendering: golden files, byte-stable output, a config hash that ignores replicas, values that
cannot escape their field, and every child valid against the Kubernetes OpenAPI models.

Golden files live in tests/operator/golden/<case>.yaml (all children of the case, in apply
order). After an intended change, regenerate them with
``RUSTMQ_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/operator/test_rendering.py`` and
review the diff.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, models

from rustmq_operator import naming, rendering

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden")

CASES: dict[str, dict[str, Any]] = {
    "name-only": {"apiVersion": "rustmq.io/v1alpha1", "kind": "RustMQCluster", "metadata": {"name": "rustmq", "namespace": "data-pipeline"}},
    "seed-minimal": yaml.safe_load((ROOT / "examples" / "rustmq-minimal.yaml").read_text()),
    "production": yaml.safe_load((ROOT / "examples" / "rustmq-production.yaml").read_text()),
    "per-broker-cluster-mode": {
        "apiVersion": "rustmq.io/v1alpha1",
        "kind": "RustMQCluster",
        "metadata": {"name": "rmq", "namespace": "data-pipeline"},
        "spec": {
            "replicas": 3,
            "services": {
                "external": {
                    "enabled": True,
                    "labels": {"bgp": "blue"},
                    "annotations": {"lbipam.cilium.io/ips": "10.0.50.10"},
                    "perBroker": {"enabled": True, "annotations": {"lbipam.cilium.io/sharing-key": "rmq"}},
                }
            },
        },
    },
}
CASES["tls-mutual-cert-manager"] = {
    "apiVersion": "rustmq.io/v1alpha1",
    "kind": "RustMQCluster",
    "metadata": {"name": "rustmq", "namespace": "data-pipeline"},
    "spec": {
        "tls": {
            "enabled": True,
            "mutual": True,
            "certManager": {"issuerRef": {"name": "data-pipeline-ca"}, "dnsNames": ["rustmq.example.net"], "ipAddresses": ["10.0.50.10"]},
        },
    },
}
CASES["tls-admin"] = {
    "apiVersion": "rustmq.io/v1alpha1",
    "kind": "RustMQCluster",
    "metadata": {"name": "rustmq", "namespace": "data-pipeline"},
    "spec": {"tls": {"enabled": True, "admin": True, "certManager": {"issuerRef": {"name": "data-pipeline-ca"}}}},
}
# Decisions a reconcile pass would make from what it observed (render_cr's keyword arguments).
DECISIONS: dict[str, dict[str, Any]] = {
    "per-broker-cluster-mode": {"listener_hosts": {0: "10.0.50.11", 2: "rmq-2.lb.example"}, "cluster_mode": True},
    "tls-mutual-cert-manager": {"certificate": True},
    "tls-admin": {"certificate": True},
}

OPENAPI_MODELS = {
    "ConfigMap": models.V1ConfigMap,
    "Service": models.V1Service,
    "StatefulSet": models.V1StatefulSet,
    "PodDisruptionBudget": models.V1PodDisruptionBudget,
    "ServiceAccount": models.V1ServiceAccount,
    "Role": models.V1Role,
    "RoleBinding": models.V1RoleBinding,
    "NetworkPolicy": models.V1NetworkPolicy,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendering_matches_golden_file(case: str, render_cr: Callable[..., rendering.Rendered]) -> None:
    rendered = render_cr(CASES[case], **DECISIONS.get(case, {})).objects
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("RUSTMQ_UPDATE_GOLDEN") == "1":
        golden.write_text(yaml.safe_dump_all(rendered, sort_keys=False))
    assert rendered == list(yaml.safe_load_all(golden.read_text()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_core_object_fits_the_kubernetes_openapi_model(
    case: str, render_cr: Callable[..., rendering.Rendered]
) -> None:
    """Round trip through the client's models generated from the Kubernetes OpenAPI: a missing
    required field or a wrong type raises, an unknown field is dropped and fails the equality."""
    client = ApiClient()
    for obj in render_cr(CASES[case], **DECISIONS.get(case, {})).objects:
        if obj["kind"] not in OPENAPI_MODELS:
            continue
        model = OPENAPI_MODELS[obj["kind"]].from_dict(copy.deepcopy(obj))
        assert client.sanitize_for_serialization(model) == obj, obj["kind"]


def test_the_openapi_round_trip_does_catch_unknown_fields_and_wrong_types() -> None:
    client = ApiClient()
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIp": "None"}}
    assert client.sanitize_for_serialization(models.V1Service.from_dict(service)) != service
    with pytest.raises(ValueError):
        models.V1ServicePort.from_dict({"port": "9092"})


def test_rendered_monitoring_objects_have_the_fields_prometheus_operator_requires(
    render_cr: Callable[..., rendering.Rendered],
) -> None:
    rendered = render_cr(CASES["production"])
    (monitor,) = rendered.by_kind("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    (metrics_service,) = [s for s in rendered.by_kind("Service") if s["metadata"]["name"] == "rustmq-metrics"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service["metadata"]["labels"].items()
    assert [p["name"] for p in metrics_service["spec"]["ports"]] == ["metrics"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (rule,) = rendered.by_kind("PrometheusRule")
    alerts = [r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {"RustMQBrokerDown", "RustMQVolumeFillingUp", "RustMQOfflinePartitions", "RustMQUnderReplicatedPartitions"} <= set(alerts)
    exprs = {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}
    assert exprs["RustMQOfflinePartitions"].startswith("max(rustmq_offline_partitions{")
    assert exprs["RustMQUnderReplicatedPartitions"].startswith("sum(rustmq_under_replicated_partitions{")


def test_same_cr_renders_byte_identical_children(render_cr: Callable[..., rendering.Rendered]) -> None:
    first = json.dumps(render_cr(CASES["production"]).objects)
    second = json.dumps(render_cr(copy.deepcopy(CASES["production"])).objects)
    assert first == second


def test_children_are_named_as_in_the_seed(render_cr: Callable[..., rendering.Rendered]) -> None:
    rendered = render_cr(CASES["seed-minimal"])
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered.objects}
    assert names == {
        ("ServiceAccount", "rustmq-broker"),
        ("Role", "rustmq-broker"),
        ("RoleBinding", "rustmq-broker"),
        ("ConfigMap", "rustmq-listeners"),
        ("ConfigMap", "rustmq-config"),
        ("Service", "rustmq"),
        ("Service", "rustmq-headless"),
        ("Service", "rustmq-metrics"),
        ("Service", "rustmq-external"),
        ("PodDisruptionBudget", "rustmq"),
        ("StatefulSet", "rustmq"),
        ("ServiceMonitor", "rustmq"),
    }
    external = next(o for o in rendered.objects if o["metadata"]["name"] == "rustmq-external")
    assert external["spec"]["type"] == "LoadBalancer"
    assert external["metadata"]["labels"]["bgp"] == "blue"
    assert [p["port"] for p in external["spec"]["ports"]] == [9092, 9093, 9094]
    headless = next(o for o in rendered.objects if o["metadata"]["name"] == "rustmq-headless")
    assert headless["spec"]["clusterIP"] == "None"


def test_every_child_is_owned_by_the_cluster_and_labelled_explicitly(render_cr: Callable[..., rendering.Rendered]) -> None:
    cr = copy.deepcopy(CASES["production"])
    cr["metadata"]["labels"] = {"app.kubernetes.io/instance": "argocd-app", "team": "data"}
    cr["metadata"]["annotations"]["argocd.argoproj.io/tracking-id"] = "rustmq:rustmq.io/RustMQCluster:data-pipeline/rustmq"
    for obj in render_cr(cr).objects:
        meta = obj["metadata"]
        (owner,) = meta["ownerReferences"]
        assert owner["kind"] == "RustMQCluster" and owner["controller"] is True
        assert meta["labels"]["app.kubernetes.io/instance"] == "rustmq"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "rustmq-operator"
        assert "team" not in meta["labels"]
        assert not any(key.startswith("argocd.argoproj.io") for key in meta.get("annotations", {}))


def test_config_hash_ignores_replicas_but_not_what_brokers_run(render_cr: Callable[..., rendering.Rendered]) -> None:
    base = CASES["seed-minimal"]
    one = render_cr(base, replicas=1)
    three = render_cr(base, replicas=3)
    assert one.config_hash == three.config_hash
    assert one.statefulset()["spec"]["replicas"] == 1 and three.statefulset()["spec"]["replicas"] == 3

    def variant(**spec: Any) -> str:
        cr = copy.deepcopy(base)
        cr["spec"].update(spec)
        return render_cr(cr).config_hash

    assert variant(image="rustmq:0.2.0") != one.config_hash
    assert variant(config={"retentionHours": 24}) != one.config_hash
    assert variant(partitions=24) != one.config_hash
    assert variant(resources={"limits": {"cpu": "2"}}) != one.config_hash
    annotations = one.statefulset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations[naming.CONFIG_HASH_ANNOTATION] == one.config_hash


def test_user_strings_cannot_escape_their_field(render_cr: Callable[..., rendering.Rendered]) -> None:
    hostile = 'x", "injected": "yes"}\nspec: {type: NodePort}\n# {{ evil }}'
    cr = copy.deepcopy(CASES["seed-minimal"])
    cr["spec"]["services"]["external"]["annotations"] = {"note": hostile}
    cr["spec"]["image"] = "rustmq:0.1.0\n  command: [sh]"
    rendered = render_cr(cr)
    external = next(o for o in rendered.objects if o["metadata"]["name"] == "rustmq-external")
    assert external["metadata"]["annotations"] == {"note": hostile}
    assert external["spec"]["type"] == "LoadBalancer"
    (container,) = rendered.statefulset()["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "rustmq:0.1.0\n  command: [sh]"
    assert "command" not in container


def test_broker_environment_carries_the_seed_settings() -> None:
    from rustmq_operator import spec as specs

    env = rendering.broker_environment(
        specs.with_defaults({"partitions": 24, "config": {"retentionHours": 12, "extra": {"SEGMENT_INDEX_BYTES": "4096"}}})
    )
    assert env["RUSTMQ_PARTITIONS"] == "24"
    assert env["RUSTMQ_DATA_DIR"] == "/data/rustmq"
    assert env["RUSTMQ_PRODUCER_PORT"] == "9092"
    assert env["RUSTMQ_CONSUMER_PORT"] == "9093"
    assert env["RUSTMQ_METRICS_PORT"] == "9094"
    assert json.loads(env["RUSTMQ_LOG"]) == {"flush": {"mode": "interval", "interval_ms": 1000}, "retention_ms": 12 * 3_600_000}
    assert env["RUSTMQ_SEGMENT_INDEX_BYTES"] == "4096"


def test_optional_children_follow_the_spec(render_cr: Callable[..., rendering.Rendered]) -> None:
    cr = {
        "metadata": {"name": "lean"},
        "spec": {
            "services": {"metrics": {"enabled": False}},
            "monitoring": {"serviceMonitor": {"enabled": False}},
            "podDisruptionBudget": {"enabled": False},
        },
    }
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render_cr(cr, service_monitor=False).objects)
    assert kinds == [
        ("ConfigMap", "lean-config"),
        ("ConfigMap", "lean-listeners"),
        ("Role", "lean-broker"),
        ("RoleBinding", "lean-broker"),
        ("Service", "lean"),
        ("Service", "lean-headless"),
        ("ServiceAccount", "lean-broker"),
        ("StatefulSet", "lean"),
    ]


def test_claim_template_follows_the_decided_size_and_class(render_cr: Callable[..., rendering.Rendered]) -> None:
    cr = {"metadata": {"name": "r"}, "spec": {"storage": {"size": "20Gi", "storageClassName": "fast"}}}
    (template,) = render_cr(cr, claim_size="10Gi").statefulset()["spec"]["volumeClaimTemplates"]
    assert template["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert template["spec"]["storageClassName"] == "fast"


def test_pod_security_context_merges_over_the_secure_defaults(render_cr: Callable[..., rendering.Rendered]) -> None:
    cr = {
        "metadata": {"name": "r"},
        "spec": {"podTemplate": {"securityContext": {"fsGroup": 2000, "supplementalGroups": [3000], "seccompProfile": {"type": "Localhost", "localhostProfile": "rustmq.json"}}}},
    }
    context = render_cr(cr).statefulset()["spec"]["template"]["spec"]["securityContext"]
    assert context["fsGroup"] == 2000 and context["supplementalGroups"] == [3000]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == rendering.BROKER_UID
    assert context["seccompProfile"] == {"type": "Localhost", "localhostProfile": "rustmq.json"}
    plain = render_cr({"metadata": {"name": "r"}}).statefulset()["spec"]["template"]["spec"]["securityContext"]
    assert plain == rendering.DEFAULT_POD_SECURITY_CONTEXT


def test_the_broker_role_grants_exactly_the_contract_verbs(render_cr: Callable[..., rendering.Rendered]) -> None:
    rendered = render_cr(CASES["seed-minimal"])
    (role,) = rendered.by_kind("Role")
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch", "create", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "update", "delete"]},
    ]
    (binding,) = rendered.by_kind("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "rustmq-broker"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rustmq-broker", "namespace": "data-pipeline"}]
    (account,) = rendered.by_kind("ServiceAccount")
    assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("cluster_mode", [False, True])
def test_a_token_is_mounted_only_in_cluster_mode(cluster_mode: bool, render_cr: Callable[..., rendering.Rendered]) -> None:
    rendered = render_cr(CASES["seed-minimal"], cluster_mode=cluster_mode)
    pod = rendered.statefulset()["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "rustmq-broker"
    assert pod["automountServiceAccountToken"] is cluster_mode
    (config,) = [c for c in rendered.by_kind("ConfigMap") if c["metadata"]["name"] == "rustmq-config"]
    (container,) = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    if cluster_mode:
        assert config["data"]["RUSTMQ_CLUSTER_MODE"] == "kubernetes"
        assert config["data"]["RUSTMQ_CLUSTER_NAME"] == "rustmq"
        assert env["RUSTMQ_CLUSTER_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["RUSTMQ_INTERNAL_HOST"]["value"] == "$(RUSTMQ_POD_NAME).rustmq-headless.$(RUSTMQ_POD_NAMESPACE).svc"
        assert env["RUSTMQ_BROKER_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    else:
        assert not any(name.startswith("RUSTMQ_CLUSTER") for name in [*config["data"], *env])
        assert "RUSTMQ_INTERNAL_HOST" not in env


def test_per_broker_services_and_the_listeners_config_map(render_cr: Callable[..., rendering.Rendered]) -> None:
    case = "per-broker-cluster-mode"
    rendered = render_cr(CASES[case], **DECISIONS[case])
    per_broker = [s for s in rendered.by_kind("Service") if s["metadata"]["name"].startswith("rmq-ext-")]
    assert [s["metadata"]["name"] for s in per_broker] == ["rmq-ext-0", "rmq-ext-1", "rmq-ext-2"]
    for ordinal, service in enumerate(per_broker):
        assert service["spec"]["type"] == "LoadBalancer"
        assert service["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == f"rmq-{ordinal}"
        assert service["metadata"]["labels"]["bgp"] == "blue"
        assert service["metadata"]["labels"]["rustmq.io/broker"] == str(ordinal)
        assert service["metadata"]["annotations"] == {"lbipam.cilium.io/sharing-key": "rmq"}
        assert [p["name"] for p in service["spec"]["ports"]] == ["producer", "consumer"]
    (listeners,) = [c for c in rendered.by_kind("ConfigMap") if c["metadata"]["name"] == "rmq-listeners"]
    assert listeners["data"] == {"broker-0": "10.0.50.11", "broker-1": "", "broker-2": "rmq-2.lb.example"}
    # Addresses are not broker settings: they change nothing the brokers run.
    moved = render_cr(CASES[case], listener_hosts={0: "10.0.50.99"}, cluster_mode=True)
    assert moved.config_hash == rendered.config_hash
    off = copy.deepcopy(CASES[case])
    off["spec"]["services"]["external"]["perBroker"]["enabled"] = False
    plain = render_cr(off, **DECISIONS[case])
    assert not [s for s in plain.by_kind("Service") if s["metadata"]["name"].startswith("rmq-ext-")]
    (listeners,) = [c for c in plain.by_kind("ConfigMap") if c["metadata"]["name"] == "rmq-listeners"]
    assert listeners["data"] == {"broker-0": "", "broker-1": "", "broker-2": ""}


def test_network_policy_admits_clients_metrics_and_brokers_only(render_cr: Callable[..., rendering.Rendered]) -> None:
    (policy,) = render_cr(CASES["production"]).by_kind("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == naming.selector_labels("rustmq")
    clients, metrics, brokers = policy["spec"]["ingress"]
    assert clients["from"] == [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert [p["port"] for p in clients["ports"]] == ["producer", "consumer"]
    assert metrics == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"port": "metrics", "protocol": "TCP"}],
    }
    assert brokers == {"from": [{"podSelector": {"matchLabels": naming.selector_labels("rustmq")}}]}
    # No clients at all: the rule is left out, since `from: []` would admit everyone.
    closed = copy.deepcopy(CASES["production"])
    closed["spec"]["networkPolicy"]["clients"] = []
    (policy,) = render_cr(closed).by_kind("NetworkPolicy")
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])
    assert not any(p["port"] == "producer" for rule in policy["spec"]["ingress"] for p in rule.get("ports", []))
    assert not render_cr(CASES["seed-minimal"]).by_kind("NetworkPolicy")


def test_tls_mounts_the_secret_and_points_the_broker_at_it(render_cr: Callable[..., rendering.Rendered]) -> None:
    case = "tls-mutual-cert-manager"
    rendered = render_cr(CASES[case], **DECISIONS[case])
    (config,) = [c for c in rendered.by_kind("ConfigMap") if c["metadata"]["name"] == "rustmq-config"]
    assert {k: v for k, v in config["data"].items() if k.startswith("RUSTMQ_TLS")} == {
        "RUSTMQ_TLS_CERT_FILE": "/etc/rustmq/tls/tls.crt",
        "RUSTMQ_TLS_KEY_FILE": "/etc/rustmq/tls/tls.key",
        "RUSTMQ_TLS_CLIENT_CA_FILE": "/etc/rustmq/tls/ca.crt",
        "RUSTMQ_TLS_CLIENT_AUTH": "required",
        "RUSTMQ_TLS_PEER_CA_FILE": "/etc/rustmq/tls/ca.crt",
    }
    pod = rendered.statefulset()["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"] == {"secretName": "rustmq-tls", "defaultMode": 0o440}
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert mount == {"name": "tls", "mountPath": "/etc/rustmq/tls", "readOnly": True}  # no subPath: updates arrive
    (certificate,) = rendered.by_kind("Certificate")
    assert certificate["spec"]["secretName"] == "rustmq-tls"
    assert certificate["spec"]["issuerRef"] == {"name": "data-pipeline-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert "*.rustmq-headless.data-pipeline.svc" in certificate["spec"]["dnsNames"]
    assert "rustmq.example.net" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["ipAddresses"] == ["10.0.50.10"]
    assert "client auth" in certificate["spec"]["usages"]  # brokers present it to their peers
    # Without cert-manager's CRD no Certificate is rendered (the reconciler reports Stalled).
    assert not render_cr(CASES[case]).by_kind("Certificate")
    # The Secret's content is not in the pod template: a renewal restarts nothing. Its name is.
    renamed = copy.deepcopy(CASES[case])
    renamed["spec"]["tls"]["secretName"] = "other"
    assert render_cr(renamed, **DECISIONS[case]).config_hash != rendered.config_hash
    plain = render_cr({"metadata": {"name": "rustmq"}}).statefulset()["spec"]["template"]["spec"]
    assert not [v for v in plain["volumes"] if v["name"] == "tls"]


def test_auth_mounts_its_secret_read_only_and_a_content_change_rolls_nothing(
    render_cr: Callable[..., rendering.Rendered],
) -> None:
    cr = {"metadata": {"name": "rustmq", "namespace": "apps"},
          "spec": {"auth": {"enabled": True, "adminAuth": "all", "certPrincipal": "san"}}}
    rendered = render_cr(cr)
    pod = rendered.statefulset()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (config,) = [c for c in rendered.by_kind("ConfigMap") if c["metadata"]["name"] == "rustmq-config"]
    env = config["data"]
    assert env["RUSTMQ_AUTH_TOKEN_FILE"] == "/etc/rustmq/auth/tokens"
    assert env["RUSTMQ_AUTH_ACL_FILE"] == "/etc/rustmq/auth/acl.yaml"
    assert env["RUSTMQ_AUTH_BROKER_TOKEN_FILE"] == "/etc/rustmq/auth/broker-token"
    assert env["RUSTMQ_AUTH_CERT_PRINCIPAL"] == "san" and env["RUSTMQ_ADMIN_AUTH"] == "all"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "auth"]
    assert volume["secret"] == {"secretName": "rustmq-auth", "defaultMode": 0o440}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "auth"]
    assert mount == {"name": "auth", "mountPath": "/etc/rustmq/auth", "readOnly": True}  # whole: updates arrive
    # Only the Secret's name is in the pod template, never its content.
    renamed = copy.deepcopy(cr)
    renamed["spec"]["auth"]["secretName"] = "other"
    assert render_cr(renamed).config_hash != rendered.config_hash
    no_broker_token = copy.deepcopy(cr)
    no_broker_token["spec"]["auth"]["brokerToken"] = False
    (config,) = [c for c in render_cr(no_broker_token).by_kind("ConfigMap") if c["metadata"]["name"] == "rustmq-config"]
    assert "RUSTMQ_AUTH_BROKER_TOKEN_FILE" not in config["data"]
    plain = render_cr({"metadata": {"name": "rustmq"}}).statefulset()["spec"]["template"]["spec"]
    assert not [v for v in plain["volumes"] if v["name"] == "auth"]
