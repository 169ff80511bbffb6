"""Drain, scale-up, controlled-shutdown rolls and data conditions of the real operator process
against the real API server, on kwok nodes. No broker runs on kwok: the brokers' controller is
played by tests/support/stand_in_controller.py, which reads the operator's membership and writes
the health report. So these test the OPERATOR's side of the scaling contract alone (what it
writes, when it shrinks, when it evicts, what it reports); that data really moves is tested with
real brokers in test_operator_brokers.py."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

import operator_e2e as ops
from stand_in_controller import StandInController

pytestmark = pytest.mark.slow
crd_installed = ops.crd_installed
operator = ops.operator


def uids(kubectl: Any) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in kubectl.pods()}


def members(kubectl: Any) -> str | None:
    found = kubectl.get("configmap", "rustmq-membership")
    return None if found is None else str((found.get("data") or {}).get("brokers"))


def sts_replicas(kubectl: Any) -> int:
    return int((kubectl.get("statefulset", "rustmq") or {})["spec"]["replicas"])


def reasons(kubectl: Any) -> list[str]:
    return [e["reason"] for e in kubectl.list("events")]


def start_three(kubectl: Any, namespace: str, **spec: Any) -> None:
    kubectl.apply(ops.cluster_cr(namespace, replicas=3, **spec))
    kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
    ops.wait_for("every broker in the membership", lambda: members(kubectl) == "0,1,2", timeout=30)


@pytest.mark.timeout(300)
def test_scale_down_drains_then_shrinks_and_releases_the_claim(
    cluster: Any, namespace: str, operator: Any, api_client: client.ApiClient
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    with StandInController(api_client, namespace) as controller:
        start_three(kubectl, namespace)
        kubectl.wait_condition("Available", "True", "AllPartitionsLed", timeout=60)
        before = uids(kubectl)
        with controller.lock:
            controller.drain_seconds = 8.0
        kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 2}})
        ops.wait_for("broker 2 to leave the membership", lambda: members(kubectl) == "0,1", timeout=30)
        drain = ops.wait_for("status.drain", lambda: kubectl.cluster_status().get("drain"), timeout=30)
        assert drain["broker"] == 2 and drain["phase"] == "Draining" and drain["startedAt"]
        ops.wait_for("progress in status.drain", lambda: (kubectl.cluster_status().get("drain") or {}).get("partitionsLeft") == 6, timeout=30)
        assert kubectl.condition("Ready")["reason"] == "Draining"
        # While the broker still holds replicas, the StatefulSet keeps it.
        time.sleep(3)
        assert sts_replicas(kubectl) == 3 and "rustmq-2" in uids(kubectl)
        ops.wait_for("the StatefulSet to shrink", lambda: sts_replicas(kubectl) == 2, timeout=60)
        kubectl.wait_condition("Ready", "True", "Reconciled", timeout=120)
        ops.wait_for("the drained broker's claim to be released",
                     lambda: "data-rustmq-2" not in [c["metadata"]["name"] for c in kubectl.list("pvc")] or None, timeout=60)
        assert {"data-rustmq-0", "data-rustmq-1"} <= {c["metadata"]["name"] for c in kubectl.list("pvc")}
        status = kubectl.cluster_status()
        assert "drain" not in status and status["members"] == "0,1"
        after = uids(kubectl)
        assert after == {k: v for k, v in before.items() if k != "rustmq-2"}, "a drain restarts no remaining broker"
        assert {"Draining", "BrokerDrained", "ReleasedClaim"} <= set(reasons(kubectl))
        assert controller.error is None


@pytest.mark.timeout(300)
def test_a_drain_is_cancelled_by_raising_replicas_and_stalls_on_the_replication_factor(
    cluster: Any, namespace: str, operator: Any, api_client: client.ApiClient
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    with StandInController(api_client, namespace) as controller:
        start_three(kubectl, namespace, storage={"retentionPolicy": {"whenScaled": "Retain"}})
        with controller.lock:
            controller.holding = {2}  # the reassignment never finishes
        kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 2}})
        ops.wait_for("broker 2 to leave the membership", lambda: members(kubectl) == "0,1", timeout=30)
        time.sleep(4)
        assert sts_replicas(kubectl) == 3
        kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 3}})
        ops.wait_for("broker 2 to be a member again", lambda: members(kubectl) == "0,1,2", timeout=30)
        kubectl.wait_condition("Ready", "True", "Reconciled", timeout=60)
        assert "drain" not in kubectl.cluster_status()
        assert "DrainCancelled" in reasons(kubectl)

        with controller.lock:
            controller.holding = set()
            controller.max_replication_factor = 3
        time.sleep(1.5)
        kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 2}})
        stalled = kubectl.wait_condition("Stalled", "True", "InsufficientBrokers", timeout=60)
        assert "replication factor 3" in stalled["message"]
        assert members(kubectl) == "0,1,2" and sts_replicas(kubectl) == 3
        assert any(e["reason"] == "InsufficientBrokers" and e["type"] == "Warning" for e in kubectl.list("events"))
        kubectl.patch("rmq", "rustmq", {"spec": {"replicas": 3}})
        kubectl.wait_condition("Stalled", "False", timeout=60)
        assert controller.error is None


@pytest.mark.timeout(300)
def test_a_roll_restarts_a_broker_only_after_its_leaderships_moved(
    cluster: Any, namespace: str, operator: Any, api_client: client.ApiClient
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    with StandInController(api_client, namespace) as controller:
        start_three(kubectl, namespace)
        with controller.lock:
            controller.handover_seconds = 2.0
        before = uids(kubectl)
        restarted: dict[str, float] = {}
        kubectl.patch("rmq", "rustmq", {"spec": {"config": {"logLevel": "DEBUG"}}})
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            for name, uid in uids(kubectl).items():
                if uid != before.get(name):
                    restarted.setdefault(name, time.monotonic())
            status = kubectl.cluster_status()
            ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
            if len(restarted) == 3 and status.get("updatedReplicas") == 3 and ready.get("status") == "True":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the roll did not finish: {kubectl.cluster_status()}\n{operator.log_tail()}")
        for name, when in restarted.items():
            broker = int(name.rsplit("-", 1)[1])
            assert broker in controller.handed_over, f"{name} restarted without a controlled shutdown: {controller.seen}"
            assert controller.handed_over[broker] < when, f"{name} was evicted before it handed over its leaderships"
        shutdowns = [s for _, _, _, s in controller.seen if s is not None]
        assert shutdowns == [2, 1, 0], controller.seen  # one at a time, highest first, each cleared in between
        ops.wait_for("the shutdown to be cleared", lambda: (kubectl.get("configmap", "rustmq-membership") or {})["data"]["shutdown"] == "", timeout=30)
        assert reasons(kubectl).count("ControlledShutdown") == 3
        assert controller.error is None


@pytest.mark.timeout(240)
def test_data_conditions_follow_the_health_report(
    cluster: Any, namespace: str, operator: Any, api_client: client.ApiClient
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    with StandInController(api_client, namespace) as controller:
        # The operator believes a report for 3 lease durations of the brokers: 2 s here, so 6 s.
        start_three(kubectl, namespace, config={"extra": {"LEASE_DURATION_S": "2"}})
        kubectl.wait_condition("Available", "True", "AllPartitionsLed", timeout=60)
        assert kubectl.condition("Degraded")["status"] == "False"
        with controller.lock:
            controller.offline, controller.under_replicated = 4, 8
        kubectl.wait_condition("Available", "False", "OfflinePartitions", timeout=60)
        degraded = kubectl.wait_condition("Degraded", "True", "OfflinePartitions", timeout=30)
        assert "4 of 12" in degraded["message"]
        status = kubectl.cluster_status()
        assert (status["partitions"], status["offlinePartitions"], status["underReplicatedPartitions"]) == (12, 4, 8)
        assert any(e["reason"] == "OfflinePartitions" and e["type"] == "Warning" for e in kubectl.list("events"))
        with controller.lock:
            controller.offline = 0
        kubectl.wait_condition("Degraded", "True", "UnderReplicated", timeout=60)
        kubectl.wait_condition("Available", "True", "AllPartitionsLed", timeout=30)
        with controller.lock:
            controller.under_replicated, controller.paused = 0, True
        # A controller that stops reporting is not believed after 3 lease durations (6 s).
        kubectl.wait_condition("Available", "False", "HealthReportStale", timeout=60)
        assert kubectl.condition("Degraded")["status"] == "Unknown"
        assert controller.error is None


@pytest.mark.timeout(300)
def test_a_statefulset_grown_by_hand_is_drained_back(
    cluster: Any, namespace: str, operator: Any, api_client: client.ApiClient
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    with StandInController(api_client, namespace) as controller:
        start_three(kubectl, namespace)
        with controller.lock:
            controller.holding = {4}  # broker 4 got data while it ran (say, an old claim)
        controller.wait_for_reports()
        kubectl.run("scale", "statefulset", "rustmq", "--replicas=5")
        time.sleep(6)
        assert sts_replicas(kubectl) == 5, "a broker holding data was removed without a drain"
        assert members(kubectl) == "0,1,2"
        with controller.lock:
            controller.holding = set()
        ops.wait_for("the StatefulSet back at 3", lambda: sts_replicas(kubectl) == 3, timeout=90)
        kubectl.wait_condition("Ready", "True", "Reconciled", timeout=120)
        assert "StatefulSetResized" in reasons(kubectl)
        assert controller.error is None
