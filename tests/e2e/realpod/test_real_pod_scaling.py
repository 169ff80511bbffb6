"""Scaling and a configuration roll of real broker pods under load: issue 14's proof on the real node.

The chart's operator (in-cluster, from the operator image) runs a RustMQCluster whose brokers are
containers of the broker image on the real kubelet, with the brokers' default timing (6 s lease,
10 s preferred-leader delay, 50 MiB/s reassignment throttle). From the test host, through the
per-broker LoadBalancer addresses (the clients' external addressing, as in test_real_pods.py),
three acks=all writers (one key each) and one member of a consumer group run without pause while
the cluster goes 3 -> 5 -> 2 -> 3 brokers and then rolls all three for a configuration change.
After each step the test waits until the operator reports the cluster done with it (Ready and
Available, the controller's fresh report acting on the latest membership, nothing moving or
under-replicated, replicas on exactly the members) and leadership balanced in status.leadership
(skew and per-topic skew at most 1, every partition led by its preferred replica: leaders
spread onto new brokers and come back after the roll).
The history checker (tests/support/checker.py) then requires: nothing acknowledged lost,
duplicated at another offset, inconsistent or reordered, and the group's member never stopped
reading for long (``longest_read_gap_s``: a stuck consumer shows as a long gap while the
writers were acknowledged).

What the kwok tier (tests/e2e/test_operator_brokers.py) cannot show and this does: pods that are
Ready only when the broker's probe says so, brokers that reach each other over the pod network
by their DNS names, the kubelet's SIGTERM and grace period on eviction and scale-down, claims that
are real directories, and the operator reading the health report in-cluster with the chart's RBAC.

The full 3 -> 5 -> 2 -> 3 sequence is run, not a shorter one: with 100m CPU requested per broker,
five brokers, CoreDNS and the operator fit the single 2-core node. The cluster starts with 2
brokers so that the brokers' own topics (default, __rustmq_coordination) get replication factor
2 and the cluster may go down to 2 (started at 3 they get 3, and a drain to 2 is refused as
Stalled/InsufficientBrokers, as it should be).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

import operator_e2e as ops
from rustmq.client import Admin
from workload import AcksAllLoad

# Started alone this test also waits for the tier's package fixtures (images, node, chart).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
RESOURCES = {"requests": {"cpu": "100m", "memory": "192Mi"}, "limits": {"cpu": "1000m", "memory": "1Gi"}}
TOPIC = "orders"


def health_of(kubectl: ops.Kubectl) -> dict[str, Any] | None:
    found = kubectl.get("configmap", "rustmq-health")
    return None if found is None else dict(json.loads(found["data"]["health"]))


def settled_probe(kubectl: ops.Kubectl, size: int) -> dict[str, Any] | None:
    """The status once the cluster is at ``size`` brokers and done with it: every one a member,
    Ready, the StatefulSet at that size; the controller's fresh report has acted on the latest
    membership, moves nothing, has nothing offline or under-replicated, puts replicas on exactly
    the members, and leadership is balanced per broker and per topic with every partition led by
    its preferred replica (status.leadership, issue 14's leadership balance)."""
    cr = kubectl.get("rmq", "rustmq") or {}
    status = cr.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    pods = kubectl.pods()
    leadership = status.get("leadership") or {}
    if (status.get("observedGeneration") != cr.get("metadata", {}).get("generation")
            or conditions.get("Ready", {}).get("status") != "True"
            or conditions.get("Available", {}).get("status") != "True"
            or status.get("members") != ",".join(map(str, range(size)))
            or status.get("underReplicatedPartitions") != 0 or status.get("offlinePartitions") != 0
            or len(pods) != size or not all(ops.pod_ready(p) for p in pods)
            or leadership.get("skew", 9) > 1 or leadership.get("topicSkew", 9) > 1 or leadership.get("notPreferred", 1)):
        return None
    membership = (kubectl.get("configmap", "rustmq-membership") or {}).get("data") or {}
    health = health_of(kubectl)
    if (health is None or health["reassigning"] or (health["observedMembershipGeneration"] or 0) < int(membership.get("generation", 0))
            or sorted(int(b) for b, facts in health["brokers"].items() if facts["replicas"]) != list(range(size))):
        return None
    return status


async def settled(kubectl: ops.Kubectl, size: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(settled_probe, kubectl, size)
        if found:
            return found
        await asyncio.sleep(1)
    raise AssertionError(f"not settled at {size} brokers in {timeout} s: {kubectl.cluster_status()}\n"
                         f"health: {health_of(kubectl)}")


async def create_topic(bootstrap: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            async with Admin(bootstrap) as admin:
                await admin.create_topic(TOPIC, 6, replication_factor=2, min_insync_replicas=2)
            return
        except Exception:  # a broker still syncing the state, the address not routed yet: ask again
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)


def test_real_pods_scale_3_5_2_3_and_roll_under_acks_all_load_losing_nothing(
    chart_operator: dict[str, Any], cluster: Any, namespace: str, lb_ipam: Any
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    cr = ops.example("rustmq-minimal.yaml", namespace)
    cr["spec"].update({"replicas": 2, "resources": RESOURCES, "storage": {"size": "1Gi"}})
    cr["spec"]["services"]["external"]["perBroker"] = {"enabled": True}
    kubectl.apply(cr)
    timings: dict[str, float] = {}
    leaders: dict[str, str] = {}  # status.leadership.perBroker after each step
    previous = [2]

    address = ops.wait_for(
        "the external address", lambda: kubectl.cluster_status().get("endpoints", {}).get("external", {}).get("ip"), 300
    )
    bootstrap = f"{address}:9092"

    async def resize(size: int, timeout: float) -> None:
        started = time.monotonic()
        await asyncio.to_thread(kubectl.patch, "rmq", "rustmq", {"spec": {"replicas": size}})
        found = await settled(kubectl, size, timeout)
        timings[f"{previous[0]} -> {size}"] = round(time.monotonic() - started, 1)
        leaders[f"at {size}"] = found["leadership"]["perBroker"]
        previous[0] = size

    async def roll() -> None:
        started = time.monotonic()
        before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in await asyncio.to_thread(kubectl.pods)}
        await asyncio.to_thread(kubectl.patch, "rmq", "rustmq", {"spec": {"config": {"logLevel": "WARNING"}}})

        def rolled() -> dict[str, Any] | None:
            pods = kubectl.pods()
            if len(pods) != 3 or any(p["metadata"]["uid"] == before.get(p["metadata"]["name"]) for p in pods):
                return None
            return settled_probe(kubectl, 3)

        found = await asyncio.to_thread(ops.wait_for, "every broker replaced, Ready and in sync", rolled, 600, 1)
        timings["roll of 3"] = round(time.monotonic() - started, 1)
        leaders["after the roll"] = found["leadership"]["perBroker"]

    async def scenario() -> None:
        for size, timeout in ((5, 420), (2, 420), (3, 300)):
            await resize(size, timeout)
        await roll()

    async def main() -> dict[str, Any]:
        # The controller creates its own topics once the brokers were stable for a while.
        await asyncio.to_thread(
            ops.wait_for, "the controller's own topics",
            lambda: (h := health_of(kubectl)) and h["partitions"] >= 20 and h, 420)
        await settled(kubectl, 2, 180)
        assert health_of(kubectl)["maxReplicationFactor"] == 2  # type: ignore[index]
        await create_topic(bootstrap)
        await resize(3, 300)
        load = AcksAllLoad(bootstrap, TOPIC, writers=3, request_timeout_s=10, delivery_timeout_s=60,
                           group="real-pod-readers", external=True)
        return await load.run(scenario, warmup_s=5, settle_s=5, drain_s=120)

    report = asyncio.run(main())
    events = [e["reason"] for e in kubectl.list("events")]
    print(json.dumps({"timings_s": timings, "leaders": leaders, "checker": report}))
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["inconsistent"] == 0, report
    assert report["wrong_offset"] == 0 and report["reordered"] == 0, report
    assert report["acknowledged"] > 300, report  # the load went on through all of it
    assert report["longest_read_gap_s"] < 45, report  # the group's member never got stuck
    # Leaders spread onto the new brokers (status.leadership.perBroker, e.g. "0=5,1=5,2=6,3=5,4=5").
    at_five = dict(entry.split("=") for entry in leaders["at 5"].split(","))
    assert sorted(at_five) == ["0", "1", "2", "3", "4"] and all(int(n) > 0 for n in at_five.values()), leaders
    assert events.count("BrokerDrained") == 3, events  # 4, 3, then 2, one at a time
    assert events.count("ControlledShutdown") >= 3, events
    claims = sorted(c["metadata"]["name"] for c in kubectl.list("pvc"))
    assert claims == ["data-rustmq-0", "data-rustmq-1", "data-rustmq-2"], claims  # drained claims released
    health = health_of(kubectl)
    assert health is not None
    holding = sorted(int(k) for k, b in health["brokers"].items() if b["replicas"])
    assert holding == [0, 1, 2], health  # nothing left on the drained brokers, every broker holds data
