"""The operator keeps a cluster as specified when things go wrong around it: children edited or
deleted by hand are restored within seconds, an operator restarted in the middle of a roll
finishes it without restarting any broker twice, and the pause annotation stops all changes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

import operator_e2e as ops

pytestmark = pytest.mark.slow
crd_installed = ops.crd_installed
operator = ops.operator


@pytest.mark.timeout(240)
def test_children_edited_or_deleted_by_hand_are_restored(cluster: Any, namespace: str, operator: Any, lb_ipam: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.example("rustmq-minimal.yaml", namespace))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)

    for kind, name in [("service", "rustmq-headless"), ("configmap", "rustmq-config"), ("poddisruptionbudget", "rustmq")]:
        uid = (kubectl.get(kind, name) or {})["metadata"]["uid"]
        kubectl.run("delete", kind, name)
        restored = ops.wait_for(
            f"{kind}/{name} to be re-created",
            lambda k=kind, n=name, u=uid: (obj := kubectl.get(k, n)) and obj["metadata"]["uid"] != u and obj,
            timeout=30,
        )
        assert restored["metadata"]["ownerReferences"][0]["name"] == "rustmq"

    kubectl.run("label", "service", "rustmq-external", "bgp=green", "--overwrite")
    ops.wait_for(
        "the external Service's bgp label to be restored",
        lambda: (kubectl.get("service", "rustmq-external") or {})["metadata"]["labels"].get("bgp") == "blue",
        timeout=30,
    )
    kubectl.patch("service", "rustmq", {"spec": {"ports": [{"name": "producer", "port": 1234, "targetPort": "producer"}]}})
    ops.wait_for(
        "the client Service's ports to be restored",
        lambda: [p["port"] for p in (kubectl.get("service", "rustmq") or {})["spec"]["ports"]] == [9092, 9093],
        timeout=30,
    )
    # Emptied by hand: it grows back at once (grown by hand, it is drained back, which needs the
    # brokers' health report: test_operator_scaling.py).
    kubectl.run("scale", "statefulset", "rustmq", "--replicas=0")
    ops.wait_for(
        "the StatefulSet's size to be restored",
        lambda: (kubectl.get("statefulset", "rustmq") or {})["spec"]["replicas"] == 1,
        timeout=30,
    )
    kubectl.run("delete", "statefulset", "rustmq", "--cascade=orphan")
    ops.wait_for("the StatefulSet to be re-created", lambda: kubectl.get("statefulset", "rustmq"), timeout=30)
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=120)


@pytest.mark.timeout(300)
def test_operator_restarted_mid_roll_finishes_without_duplicate_restarts(
    cluster: Any, namespace: str, operator: Any
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, replicas=3))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    seen: dict[str, set[str]] = {}

    def record() -> None:
        for pod in kubectl.pods():
            seen.setdefault(pod["metadata"]["name"], set()).add(pod["metadata"]["uid"])

    record()
    kubectl.patch("rmq", "rustmq", {"spec": {"image": "rustmq:0.1.1"}})
    ops.wait_for("the first broker restart", lambda: (record(), any(len(u) > 1 for u in seen.values()))[1], timeout=60, interval=0.2)
    operator.stop()
    record()
    time.sleep(3)
    record()
    operator.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        record()
        status = kubectl.cluster_status()
        if status.get("updatedReplicas") == 3 and kubectl.condition("Ready").get("status") == "True":
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"roll did not finish after the restart: {kubectl.cluster_status()}\n{operator.log_tail()}")
    record()
    assert all(len(uid_set) == 2 for uid_set in seen.values()), f"each broker restarts exactly once: {seen}"
    assert all(
        p["spec"]["containers"][0]["image"] == "rustmq:0.1.1" for p in kubectl.pods()
    )


@pytest.mark.timeout(200)
def test_pause_annotation_stops_changes_until_removed(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    kubectl.run("annotate", "rmq", "rustmq", "rustmq.io/pause-reconciliation=true")
    kubectl.wait_condition("Paused", "True", "PausedByAnnotation")
    assert kubectl.condition("Ready")["reason"] == "Paused"
    kubectl.run("delete", "service", "rustmq-metrics")
    kubectl.patch("rmq", "rustmq", {"spec": {"config": {"logLevel": "DEBUG"}}})
    time.sleep(8)
    assert kubectl.get("service", "rustmq-metrics") is None
    assert (kubectl.get("configmap", "rustmq-config") or {})["data"]["RUSTMQ_LOG_LEVEL"] == "INFO"
    kubectl.run("annotate", "rmq", "rustmq", "rustmq.io/pause-reconciliation-")
    ops.wait_for("the metrics Service to be restored", lambda: kubectl.get("service", "rustmq-metrics"), timeout=30)
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=120)
    assert (kubectl.get("configmap", "rustmq-config") or {})["data"]["RUSTMQ_LOG_LEVEL"] == "DEBUG"


@pytest.mark.timeout(240)
def test_a_failing_broker_stalls_the_cluster_until_the_spec_is_fixed(cluster: Any, namespace: str, operator: Any) -> None:
    """kwok runs no containers, so the test writes the status a kubelet would report for a
    crash-looping broker; the operator must say Stalled/BrokerFailing (ArgoCD: Degraded), keep
    the other brokers, and replace the broken one as soon as a spec change gives it a new
    configuration."""
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, replicas=3))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in kubectl.pods()}
    crash = {
        "status": {
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{
                "name": "broker", "image": "rustmq/broker:0.1.0", "imageID": "", "ready": False, "restartCount": 5,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}},
            }],
        }
    }
    kubectl.run("patch", "pod", "rustmq-1", "--subresource=status", "--type=merge", "-p", json.dumps(crash))
    stalled = kubectl.wait_condition("Stalled", "True", "BrokerFailing", timeout=60)
    assert "rustmq-1: CrashLoopBackOff" in stalled["message"]
    assert kubectl.condition("Available")["reason"] == "NoHealthReport"  # kwok: no broker, no report
    assert kubectl.condition("Ready")["reason"] == "BrokerFailing"
    time.sleep(4)
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in kubectl.pods()} == before

    kubectl.patch("rmq", "rustmq", {"spec": {"image": "rustmq:0.1.1"}})
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    assert kubectl.condition("Stalled")["status"] == "False"
    reasons = [e["reason"] for e in kubectl.list("events")]
    assert "ReplacingBroker" in reasons and "BrokerFailing" in reasons
    assert all(p["spec"]["containers"][0]["image"] == "rustmq:0.1.1" for p in kubectl.pods())


@pytest.mark.timeout(200)
def test_a_namespace_is_deleted_even_with_the_operator_gone(cluster: Any, namespace: str, operator: Any) -> None:
    """No finalizer on the CR: with the operator stopped, deleting the whole namespace completes."""
    doomed = f"{namespace[:50]}-gone"
    cluster.kubectl("create", "namespace", doomed)
    kubectl = ops.Kubectl(cluster, doomed)
    ops.wait_for("the default ServiceAccount", lambda: kubectl.get("serviceaccount", "default"), timeout=30)
    kubectl.apply(ops.cluster_cr(doomed))
    kubectl.wait_condition("Ready", "True", timeout=150)
    operator.stop()
    try:
        started = time.monotonic()
        cluster.kubectl("delete", "namespace", doomed, "--wait=true", "--timeout=90s")
        assert time.monotonic() - started < 90
        assert cluster.kubectl("get", "namespace", doomed, check=False).returncode != 0
    finally:
        operator.start()
