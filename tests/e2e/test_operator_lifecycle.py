"""The seed's minimal RustMQCluster on the real control plane, reconciled by the real
`rustmq-operator` process: every child with the right fields, Ready once kwok runs the pods,
the external address reported, printer columns, monitoring with and without its CRD,
deletion that garbage-collects the children and keeps the claims."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import pytest

import operator_e2e as ops

pytestmark = pytest.mark.slow
crd_installed = ops.crd_installed
operator = ops.operator


CHILDREN = [
    ("statefulset", "rustmq"),
    ("service", "rustmq"),
    ("service", "rustmq-headless"),
    ("service", "rustmq-metrics"),
    ("service", "rustmq-external"),
    ("configmap", "rustmq-config"),
    ("poddisruptionbudget", "rustmq"),
]


@pytest.mark.timeout(240)
def test_seed_minimal_cluster_gets_its_children_and_becomes_ready(
    cluster: Any, namespace: str, operator: Any, lb_ipam: Any
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.example("rustmq-minimal.yaml", namespace))
    children = {
        (kind, name): ops.wait_for(f"{kind}/{name}", lambda k=kind, n=name: kubectl.get(k, n, managed_fields=True))
        for kind, name in CHILDREN
    }
    cr = kubectl.get("rmq", "rustmq") or {}
    for obj in children.values():
        (owner,) = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("RustMQCluster", "rustmq", cr["metadata"]["uid"], True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "rustmq-operator"
        managers = {entry["manager"] for entry in obj["metadata"]["managedFields"] if entry["operation"] == "Apply"}
        assert managers == {"rustmq-operator"}

    sts = children[("statefulset", "rustmq")]
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == "rustmq-headless"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    assert [p["containerPort"] for p in container["ports"]] == [9092, 9093, 9094]
    assert children[("service", "rustmq-headless")]["spec"]["clusterIP"] == "None"
    assert children[("service", "rustmq")]["spec"]["type"] == "ClusterIP"
    external = children[("service", "rustmq-external")]
    assert external["spec"]["type"] == "LoadBalancer"
    assert external["metadata"]["labels"]["bgp"] == "blue"
    assert [p["port"] for p in external["spec"]["ports"]] == [9092, 9093, 9094]
    config = children[("configmap", "rustmq-config")]["data"]
    assert config["RUSTMQ_PARTITIONS"] == "12" and config["RUSTMQ_DATA_DIR"] == "/data/rustmq"

    ready = kubectl.wait_condition("Ready", "True", "Reconciled", timeout=180)
    assert ready["observedGeneration"] == cr["metadata"]["generation"]
    # kwok runs no broker, so there is no health report: Available says so rather than guessing.
    assert kubectl.condition("Available")["reason"] == "NoHealthReport"
    assert kubectl.condition("Degraded")["status"] == "Unknown"
    status = ops.wait_for(
        "the external IP in status", lambda: (s := kubectl.cluster_status()).get("endpoints", {}).get("external") and s
    )
    external_ip = status["endpoints"]["external"]["ip"]
    assert ipaddress.ip_address(external_ip) in lb_ipam.network
    assert status["endpoints"]["headless"] == f"rustmq-headless.{namespace}.svc"
    assert status["endpoints"]["producer"] == f"rustmq.{namespace}.svc:9092"
    assert (status["replicas"], status["readyReplicas"], status["updatedReplicas"]) == (1, 1, 1)
    assert status["selector"] == "app.kubernetes.io/component=broker,app.kubernetes.io/name=rustmq,rustmq.io/cluster=rustmq"
    (pod,) = kubectl.pods()
    assert pod["metadata"]["annotations"]["rustmq.io/config-hash"] == status["configHash"]
    claims = kubectl.list("pvc")
    assert [c["metadata"]["name"] for c in claims] == ["data-rustmq-0"]

    table = kubectl.run("get", "rmq").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "DESIRED", "CURRENT", "PARTITIONS", "REASON", "EXTERNAL", "IP", "AGE"]
    assert table[1].split()[:7] == ["rustmq", "True", "1", "1", "12", "Reconciled", external_ip]
    # No ServiceMonitor CRD in this cluster: said so, and nothing else suffers.
    monitoring = kubectl.condition("MonitoringReady")
    assert (monitoring["status"], monitoring["reason"]) == ("False", "ServiceMonitorCRDMissing")


@pytest.mark.timeout(180)
def test_status_settles_no_hot_loop(cluster: Any, namespace: str, operator: Any) -> None:
    """Once Ready, the CR's resourceVersion stops moving: the status is written only on change."""
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace))
    kubectl.wait_condition("Ready", "True", timeout=150)
    time.sleep(3)
    before = (kubectl.get("rmq", "rustmq") or {})["metadata"]["resourceVersion"]
    children_before = {
        name: (kubectl.get(kind, name) or {})["metadata"]["resourceVersion"]
        for kind, name in [("statefulset", "rustmq"), ("service", "rustmq"), ("configmap", "rustmq-config")]
    }
    time.sleep(35)  # longer than the operator's periodic drift check
    after = (kubectl.get("rmq", "rustmq") or {})["metadata"]["resourceVersion"]
    assert after == before
    for kind, name in [("service", "rustmq"), ("configmap", "rustmq-config")]:
        assert (kubectl.get(kind, name) or {})["metadata"]["resourceVersion"] == children_before[name]
    assert "rustmq_operator_reconcile_total" in operator.metrics()


@pytest.mark.timeout(180)
def test_servicemonitor_appears_with_its_crd(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, monitoring={"serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}}}))
    kubectl.wait_condition("MonitoringReady", "False", "ServiceMonitorCRDMissing")
    kubectl.wait_condition("Ready", "True", timeout=150)
    with ops.service_monitor_crd(cluster):
        monitor = ops.wait_for("the ServiceMonitor", lambda: kubectl.get("servicemonitor", "rustmq"), timeout=60)
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        metrics_service = kubectl.get("service", "rustmq-metrics") or {}
        assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
        kubectl.wait_condition("MonitoringReady", "True", "ServiceMonitorApplied", timeout=60)
        kubectl.patch("rmq", "rustmq", {"spec": {"monitoring": {"serviceMonitor": {"enabled": False}}}})
        ops.wait_for("the ServiceMonitor to be pruned", lambda: kubectl.get("servicemonitor", "rustmq") is None)


@pytest.mark.timeout(180)
def test_prometheus_rule_is_optional_and_follows_its_crd(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, replicas=2, monitoring={"prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}))
    kubectl.wait_condition("Ready", "True", timeout=150)
    with ops.installed_crd(cluster, ops.PROMETHEUS_RULE_CRD):
        rule = ops.wait_for("the PrometheusRule", lambda: kubectl.get("prometheusrule", "rustmq"), timeout=60)
        alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
        assert set(alerts) == {
            "RustMQBrokerDown", "RustMQBrokersMissing", "RustMQOfflinePartitions",
            "RustMQUnderReplicatedPartitions", "RustMQVolumeFillingUp",
        }
        assert f'namespace="{namespace}"' in alerts["RustMQBrokerDown"]["expr"]
        assert alerts["RustMQBrokersMissing"]["expr"].endswith("< 2")
        assert rule["metadata"]["labels"]["release"] == "kps"
        kubectl.patch("rmq", "rustmq", {"spec": {"monitoring": {"prometheusRule": {"enabled": False}}}})
        ops.wait_for("the PrometheusRule to be pruned", lambda: kubectl.get("prometheusrule", "rustmq") is None, timeout=30)


@pytest.mark.timeout(180)
def test_deleting_the_cluster_collects_children_and_keeps_claims(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace))
    kubectl.wait_condition("Ready", "True", timeout=150)
    assert not (kubectl.get("rmq", "rustmq") or {})["metadata"].get("finalizers")
    started = time.monotonic()
    kubectl.run("delete", "rmq", "rustmq", "--timeout=30s")
    assert time.monotonic() - started < 30
    for kind, name in [("statefulset", "rustmq"), ("service", "rustmq"), ("service", "rustmq-headless"), ("configmap", "rustmq-config")]:
        ops.wait_for(f"{kind}/{name} to be garbage-collected", lambda k=kind, n=name: kubectl.get(k, n) is None, timeout=60)
    assert [c["metadata"]["name"] for c in kubectl.list("pvc")] == ["data-rustmq-0"]
