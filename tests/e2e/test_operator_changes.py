"""Changes to a running RustMQCluster on the real control plane: scale-up (also through the
scale subresource) that never restarts running brokers, a scale-down that waits for a health
report kwok never gives (drains with a stand-in controller: test_operator_scaling.py), hibernation, a
configuration change rolled one broker at a time, storage growth with the StatefulSet
re-created under running pods, and a storage class that cannot grow."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

import operator_e2e as ops

pytestmark = pytest.mark.slow
crd_installed = ops.crd_installed
operator = ops.operator


def uids(kubectl: Any) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in kubectl.pods()}


@pytest.mark.timeout(300)
def test_scale_up_then_a_scale_down_that_waits_for_the_brokers(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace))
    kubectl.wait_condition("Ready", "True", timeout=150)
    first = uids(kubectl)

    kubectl.run("scale", "rmq/rustmq", "--replicas=3")
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    status = kubectl.cluster_status()
    assert (status["replicas"], status["readyReplicas"]) == (3, 3)
    after_scale = uids(kubectl)
    assert after_scale["rustmq-0"] == first["rustmq-0"], "scaling up restarted a running broker"
    scale = json_of(kubectl.run("get", "--raw", f"/apis/rustmq.io/v1alpha1/namespaces/{namespace}/rustmqclusters/rustmq/scale").stdout)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == status["selector"]

    # kwok runs no broker, so no health report ever says a broker is empty: the drain waits and
    # nothing is removed (test_operator_scaling.py plays the controller and sees it finish).
    kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 1}})
    waiting = kubectl.wait_condition("Reconciling", "True", "Draining")
    assert "rustmq-2" in waiting["message"] and "no health report" in waiting["message"]
    time.sleep(5)
    assert (kubectl.get("rmq", "rustmq") or {})["spec"]["replicas"] == 1, "the operator must not write the spec"
    assert (kubectl.get("statefulset", "rustmq") or {})["spec"]["replicas"] == 3
    assert uids(kubectl) == after_scale, "an unconfirmed drain must leave the pods alone"
    assert kubectl.cluster_status()["drain"]["phase"] == "Pending"

    kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 3}})
    kubectl.wait_condition("Ready", "True", "Reconciled")
    assert "drain" not in kubectl.cluster_status()


@pytest.mark.timeout(240)
def test_hibernate_keeps_claims_and_wakes_up(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, replicas=2))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 0}})
    kubectl.wait_condition("Ready", "True", "Hibernated", timeout=120)
    ops.wait_for("the brokers to stop", lambda: kubectl.pods() == [] or None)
    assert sorted(c["metadata"]["name"] for c in kubectl.list("pvc")) == ["data-rustmq-0", "data-rustmq-1"]
    assert kubectl.cluster_status()["lastNonZeroReplicas"] == 2
    # Waking up smaller brings back every broker that holds data, then drains (which waits here).
    kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 1}})
    kubectl.wait_condition("Reconciling", "True", "Draining", timeout=120)
    assert (kubectl.get("statefulset", "rustmq") or {})["spec"]["replicas"] == 2
    kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 2}})
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)


@pytest.mark.timeout(300)
def test_config_change_rolls_one_broker_at_a_time(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, replicas=3))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    old_hash = kubectl.cluster_status()["configHash"]
    before = uids(kubectl)

    kubectl.patch("rmq", "rustmq", {"spec": {"config": {"logLevel": "DEBUG"}}})
    worst = 0
    seen: dict[str, set[str]] = {name: {uid} for name, uid in before.items()}
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        pods = kubectl.pods()
        down = 3 - sum(1 for p in pods if ops.pod_ready(p))
        worst = max(worst, down)
        for pod in pods:
            seen.setdefault(pod["metadata"]["name"], set()).add(pod["metadata"]["uid"])
        status = kubectl.cluster_status()
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        if status.get("configHash") != old_hash and ready.get("status") == "True" and status.get("updatedReplicas") == 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the roll did not finish: {kubectl.cluster_status()}\n{operator.log_tail()}")
    assert worst <= 1, f"{worst} brokers were down at once"
    assert all(len(uid_set) == 2 for uid_set in seen.values()), f"each broker restarts exactly once: {seen}"
    new_hash = kubectl.cluster_status()["configHash"]
    assert all(p["metadata"]["annotations"]["rustmq.io/config-hash"] == new_hash for p in kubectl.pods())
    assert (kubectl.get("configmap", "rustmq-config") or {})["data"]["RUSTMQ_LOG_LEVEL"] == "DEBUG"
    reasons = [e["reason"] for e in kubectl.list("events")]
    assert reasons.count("RestartingBroker") == 3


@pytest.mark.timeout(300)
def test_a_broker_stuck_on_a_bad_revision_is_replaced_once_the_spec_is_fixed(cluster: Any, namespace: str, operator: Any) -> None:
    """A node selector no node matches leaves the first restarted broker Pending (the kwok
    nodes stand in for a bad image): the roll stops there with the others serving; fixing the
    spec replaces the stuck pod without anyone deleting it, and the roll completes."""
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, replicas=3))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    before = uids(kubectl)
    kubectl.patch("rmq", "rustmq", {"spec": {"podTemplate": {"nodeSelector": {"rustmq.io/e2e-no-such-node": "true"}}}})

    def stuck() -> dict[str, Any] | None:
        pods = {p["metadata"]["name"]: p for p in kubectl.pods()}
        broken = pods.get("rustmq-2")
        if broken and broken["metadata"]["uid"] != before["rustmq-2"] and broken["status"].get("phase") == "Pending":
            return broken
        return None

    ops.wait_for("rustmq-2 to be stuck Pending on the bad revision", stuck, timeout=60)
    time.sleep(6)
    now = uids(kubectl)
    assert (now["rustmq-0"], now["rustmq-1"]) == (before["rustmq-0"], before["rustmq-1"]), "the roll went on past a broken broker"
    # kwok runs no broker: no health report, so the operator claims nothing about the data.
    assert kubectl.condition("Available")["reason"] == "NoHealthReport"
    assert kubectl.condition("Ready")["reason"] in ("RollingUpdate", "WaitingForBrokers")

    kubectl.run("patch", "rmq", "rustmq", "--type=json", "-p", '[{"op": "remove", "path": "/spec/podTemplate/nodeSelector"}]')
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    assert kubectl.cluster_status()["updatedReplicas"] == 3
    reasons = [e["reason"] for e in kubectl.list("events")]
    assert "ReplacingBroker" in reasons


@pytest.mark.timeout(240)
def test_a_roll_waits_for_the_pod_disruption_budget(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, replicas=2, podDisruptionBudget={"maxUnavailable": 0}))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    before = uids(kubectl)
    kubectl.patch("rmq", "rustmq", {"spec": {"image": "rustmq:0.1.1"}})
    waiting = kubectl.wait_condition("Reconciling", "True", "RollingUpdate")
    ops.wait_for(
        "the operator to report the budget",
        lambda: "PodDisruptionBudget" in kubectl.condition("Reconciling").get("message", ""),
        timeout=30,
    )
    time.sleep(5)
    assert uids(kubectl) == before, f"a broker was restarted against the budget: {waiting}"
    kubectl.patch("rmq", "rustmq", {"spec": {"podDisruptionBudget": {"maxUnavailable": 1}}})
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    assert all(p["spec"]["containers"][0]["image"] == "rustmq:0.1.1" for p in kubectl.pods())


@pytest.mark.timeout(240)
def test_storage_growth_expands_claims_without_restarting_brokers(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    storage_class = f"{namespace}-expandable"
    default = next(
        sc for sc in json_of(cluster.kubectl("get", "storageclass", "-o", "json").stdout)["items"]
        if sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"
    )
    cluster.kubectl("apply", "-f", "-", input=yaml_of({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": storage_class},
        "provisioner": default["provisioner"], "allowVolumeExpansion": True,
    }))
    try:
        kubectl.apply(ops.cluster_cr(namespace, replicas=2, storage={"size": "1Gi", "storageClassName": storage_class}))
        kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
        sts_uid = (kubectl.get("statefulset", "rustmq") or {})["metadata"]["uid"]
        before = uids(kubectl)

        kubectl.patch("rmq", "rustmq", {"spec": {"storage": {"size": "2Gi"}}})
        def grown() -> bool:
            sts = kubectl.get("statefulset", "rustmq")
            claims = kubectl.list("pvc")
            return bool(
                sts and sts["metadata"]["uid"] != sts_uid
                and sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
                and len(claims) == 2
                and all(c["spec"]["resources"]["requests"]["storage"] == "2Gi" for c in claims)
            )
        ops.wait_for("claims and claim template at 2Gi", grown, timeout=120)
        kubectl.wait_condition("Ready", "True", "Reconciled", timeout=120)
        assert uids(kubectl) == before, "growing storage restarted brokers"
        assert kubectl.cluster_status()["storageSize"] == "2Gi"
    finally:
        kubectl.run("delete", "rmq", "rustmq", "--wait=true", check=False)
        cluster.kubectl("delete", "storageclass", storage_class, check=False)


@pytest.mark.timeout(200)
def test_storage_class_without_expansion_stalls(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    kubectl.patch("rmq", "rustmq", {"spec": {"storage": {"size": "20Gi"}}})
    stalled = kubectl.wait_condition("Stalled", "True", "StorageExpansionUnsupported")
    assert "does not allow volume expansion" in stalled["message"]
    assert [c["spec"]["resources"]["requests"]["storage"] for c in kubectl.list("pvc")] == ["10Gi"]


def json_of(text: str) -> Any:
    return json.loads(text)


def yaml_of(obj: Any) -> str:
    return str(yaml.safe_dump(obj))
