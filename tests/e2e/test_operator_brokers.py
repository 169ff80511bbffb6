"""The operator and real brokers together: scaling 3 -> 5 -> 2 -> 3 and a configuration roll of
3 brokers under a steady acks=all load with a consumer group's member reading, checked by the
history checker (tests/support/checker.py: nothing acknowledged lost, nothing duplicated or
inconsistent; the member never paused reading for long, so no consumer got stuck).

Everything is real except the kubelet: the real `rustmq-operator` process against the local
control plane's API server, and one real broker process per kwok pod of the StatefulSet with the
pod's identity (tests/support/podbrokers.py: started when the pod appears, SIGTERMed when it is
deleted, its data directory kept per claim and wiped when the operator deletes the claim). The
brokers' controller writes `<name>-health` and reads the operator's `<name>-membership`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

import operator_e2e as ops
from clusterproc import FAST_TIMING
from podbrokers import PodBrokers
from rustmq.client import Admin
from workload import AcksAllLoad

pytestmark = pytest.mark.slow
crd_installed = ops.crd_installed
operator = ops.operator

TOPIC = "orders"
# The brokers read RUSTMQ_* from the environment the harness gives them; the CR carries the same
# timing so that the operator believes a health report for 3 lease durations of these brokers.
EXTRA = {key.removeprefix("RUSTMQ_"): value for key, value in FAST_TIMING.items()}


def health_of(kubectl: Any) -> dict[str, Any] | None:
    found = kubectl.get("configmap", "rustmq-health")
    return None if found is None else dict(json.loads(found["data"]["health"]))


def sts_replicas(kubectl: Any) -> int:
    return int((kubectl.get("statefulset", "rustmq") or {})["spec"]["replicas"])


async def settled(kubectl: Any, brokers: PodBrokers, size: int, timeout: float) -> dict[str, Any]:
    """The cluster at ``size`` brokers, every one a member and running, Ready, and a fresh report
    without under-replicated partitions."""
    def probe() -> dict[str, Any] | None:
        status = kubectl.cluster_status()
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        if (status.get("observedGeneration") != (kubectl.get("rmq", "rustmq") or {}).get("metadata", {}).get("generation")
                or conditions.get("Ready", {}).get("status") != "True" or status.get("members") != ",".join(map(str, range(size)))
                or status.get("underReplicatedPartitions") != 0 or sts_replicas(kubectl) != size
                or sorted(brokers.running()) != list(range(size))):
            return None
        return status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(probe)
        if found:
            return found
        if brokers.error is not None:
            raise brokers.error
        await asyncio.sleep(0.5)
    raise AssertionError(f"not settled at {size} brokers in {timeout} s: {kubectl.cluster_status()}\n"
                         f"health: {health_of(kubectl)}\n{brokers.logs()}\n{ops.RUNNING[-1].log_tail(40) if ops.RUNNING else ''}")


async def under_load(brokers: PodBrokers, scenario: Callable[[], Awaitable[None]], writers: int = 3) -> dict[str, Any]:
    """acks=all writers (one key each), steady rather than flat out on a shared machine, and a
    consumer group's member reading, while ``scenario`` runs."""
    load = AcksAllLoad(brokers.bootstrap, TOPIC, writers, pause_s=0.01, group="readers")
    return await load.run(scenario, settle_s=2, drain_s=60)


async def start_cluster(kubectl: Any, namespace: str, brokers: PodBrokers, first: int) -> None:
    """A cluster of ``first`` brokers whose controller has created its own topics (the default
    topic and __rustmq_coordination, at replication factor min(3, brokers)), plus ``orders``
    at replication factor 2 and min.insync 2."""
    kubectl.apply(ops.cluster_cr(namespace, replicas=first, config={"extra": EXTRA}))
    ops.wait_for(f"{first} running brokers", lambda: len(brokers.running()) == first or None, timeout=120)

    def controller_topics() -> dict[str, Any] | None:
        report = health_of(kubectl)
        # default (the brokers' 12 partitions) and __rustmq_coordination (8): created together
        # with the brokers stable for two lease durations.
        return report if report and report["partitions"] >= 20 else None

    report = await asyncio.to_thread(ops.wait_for, "the controller's own topics", controller_topics, 120)
    assert report["maxReplicationFactor"] == min(3, first), report
    async with Admin(brokers.bootstrap) as admin:
        deadline = time.monotonic() + 60
        while True:
            try:
                await admin.create_topic(TOPIC, 6, replication_factor=2, min_insync_replicas=2)
                break
            except Exception:  # a broker still syncing the state: ask again
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


@pytest.mark.timeout(900)
def test_scaling_3_5_2_3_under_acks_all_load_loses_nothing(
    cluster: Any, namespace: str, operator: Any, api_client: client.ApiClient, tmp_path: Path
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    timings: dict[str, float] = {}
    with PodBrokers(api_client, cluster.kubeconfig, namespace, tmp_path, env=FAST_TIMING) as brokers:

        async def scenario() -> None:
            for size in (5, 2, 3):
                started = time.monotonic()
                await asyncio.to_thread(kubectl.patch, "rmq", "rustmq", {"spec": {"replicas": size}})
                await settled(kubectl, brokers, size, timeout=240)
                timings[f"to {size}"] = round(time.monotonic() - started, 1)

        async def main() -> dict[str, Any]:
            # Started with 2 brokers, so that the controller's own topics get replication factor
            # 2 and the cluster may later shrink to 2 (from 3 brokers on they would get 3, and a
            # drain to 2 is refused as Stalled/InsufficientBrokers, as it should be).
            await start_cluster(kubectl, namespace, brokers, first=2)
            await settled(kubectl, brokers, 2, timeout=120)
            await asyncio.to_thread(kubectl.patch, "rmq", "rustmq", {"spec": {"replicas": 3}})
            await settled(kubectl, brokers, 3, timeout=180)
            return await under_load(brokers, scenario)

        report = asyncio.run(main())
        print(json.dumps({"timings_s": timings, "checker": report}))
        assert report["lost"] == 0 and report["duplicated"] == 0 and report["inconsistent"] == 0, report
        assert report["wrong_offset"] == 0 and report["reordered"] == 0, report
        assert report["acknowledged"] > 100, report  # the load was steady, not stalled
        assert report["longest_read_gap_s"] < 30, report  # the group's member never got stuck
        assert [o for _, o, _ in brokers.stopped if o >= 2] == [4, 3, 2], brokers.stopped  # one at a time, highest first
        assert sorted(brokers.wiped) == ["data-rustmq-2", "data-rustmq-3", "data-rustmq-4"]
        reasons = [e["reason"] for e in kubectl.list("events")]
        assert reasons.count("BrokerDrained") == 3 and "StatefulSetResized" not in reasons
        assert brokers.error is None


@pytest.mark.timeout(600)
def test_a_configuration_roll_under_acks_all_load_loses_nothing(
    cluster: Any, namespace: str, operator: Any, api_client: client.ApiClient, tmp_path: Path
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    with PodBrokers(api_client, cluster.kubeconfig, namespace, tmp_path, env=FAST_TIMING) as brokers:

        async def scenario() -> None:
            before = {o: uid for _, o, uid in brokers.started}
            await asyncio.to_thread(kubectl.patch, "rmq", "rustmq", {"spec": {"config": {"logLevel": "DEBUG", "extra": EXTRA}}})
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                status = await asyncio.to_thread(kubectl.cluster_status)
                ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
                restarted = {o for _, o, uid in brokers.started if uid != before.get(o)}
                if restarted == {0, 1, 2} and status.get("updatedReplicas") == 3 and ready.get("status") == "True":
                    return
                await asyncio.sleep(0.5)
            raise AssertionError(f"the roll did not finish: {kubectl.cluster_status()}\n{brokers.logs()}")

        async def main() -> dict[str, Any]:
            await start_cluster(kubectl, namespace, brokers, first=3)
            await settled(kubectl, brokers, 3, timeout=120)
            return await under_load(brokers, scenario)

        report = asyncio.run(main())
        print(json.dumps({"checker": report}))
        assert report["lost"] == 0 and report["duplicated"] == 0 and report["inconsistent"] == 0, report
        assert report["acknowledged"] > 100, report
        assert report["longest_read_gap_s"] < 30, report
        assert [e["reason"] for e in kubectl.list("events")].count("ControlledShutdown") == 3
        assert brokers.error is None
