"""The broker image as real pods under the chart's operator: what kwok's fake pods cannot prove.

On the real node (or kind): the seed's RustMQCluster brings up a broker container whose
readiness probe answers before the pod is Ready; produce/consume round trips through the
ClusterIP Service by cluster DNS from a client pod, and from the test host through the
LoadBalancer addresses the cluster's LB-IPAM handed out (the per-broker ones the brokers
advertise to outside clients); a broker killed by SIGKILL is restarted by
the kubelet and the operator reports what the kubelet reports (not Ready, then a crash loop, then
Ready again); a config change rolls three real brokers one at a time, never two down at once,
and the data written before is all there after; a claim is a real directory that outlives the pod and grows online
(where its StorageClass allows it; kind's does not, and the operator says so).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

import operator_e2e as ops
from e2e_cluster import BROKER_IMAGE, OPERATOR_IMAGE
from rustmq.client.admin import Admin
from rustmq.client.consumer import Consumer
from rustmq.client.producer import Producer

OPERATOR_NAMESPACE = "rustmq-system"  # where tests/e2e/realpod/conftest.py installs the chart

# The first test of the tier also waits for its package fixtures: the images, the node, the chart.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
# Small enough for three brokers, CoreDNS and the operator on a 2-core node.
RESOURCES = {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": "1000m", "memory": "1Gi"}}


def seed(namespace: str, **spec: Any) -> dict[str, Any]:
    """The seed's RustMQCluster (examples/rustmq-minimal.yaml) with test-sized resources."""
    cr = ops.example("rustmq-minimal.yaml", namespace)
    cr["spec"].update({"resources": RESOURCES, "storage": {"size": "1Gi"}, **spec})
    return cr


def node_zone(cluster: Any) -> str:
    """The real node's topology.kubernetes.io/zone, set to zone-a first if it has none (as a
    cloud provider's node controller would)."""
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    node = next(n for n in nodes if n["metadata"].get("labels", {}).get("type") != "kwok")
    zone = node["metadata"].get("labels", {}).get("topology.kubernetes.io/zone")
    if zone is None:
        zone = "zone-a"
        cluster.kubectl("label", "node", node["metadata"]["name"], f"topology.kubernetes.io/zone={zone}")
    return str(zone)


def wait_ready(kubectl: ops.Kubectl, timeout: float = 300) -> dict[str, Any]:
    return kubectl.wait_condition("Ready", "True", timeout=timeout)


def client_pod(kubectl: ops.Kubectl, script: str, timeout: float = 180) -> str:
    """Run `script` (sh) in a pod of the broker image; its log, after it succeeded."""
    name = f"client-{uuid.uuid4().hex[:6]}"
    kubectl.apply({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "enableServiceLinks": False,
            "containers": [{
                "name": "client",
                "image": BROKER_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", script],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    })

    def finished() -> str | None:
        phase = ((kubectl.get("pod", name) or {}).get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = ops.wait_for(f"client pod {name} to finish", finished, timeout=timeout)
    logs = kubectl.run("logs", name, check=False).stdout
    assert phase == "Succeeded", f"client pod {name} {phase}:\n{logs}"
    return logs


def messages(output: str) -> list[str]:
    return [json.loads(line)["value"] for line in output.splitlines() if line.startswith("{") and '"value"' in line]


def produce_consume_script(bootstrap: str, topic: str, values: list[str], consume_only: bool = False) -> str:
    """Create `topic` (one partition, so order holds), produce `values`, consume them back."""
    consume = f"rustmq consume {topic} --bootstrap {bootstrap} --max-messages {len(values)} --timeout 30 --json"
    if consume_only:
        return consume
    return (
        f"rustmq topic create {topic} --partitions 1 --bootstrap {bootstrap} >/dev/null && "
        f"rustmq produce {topic} {' '.join(values)} --key k --acks durable --bootstrap {bootstrap} >/dev/null && {consume}"
    )


async def external_round_trip(bootstrap: str, topic: str, values: list[str]) -> list[str]:
    """Produce and consume from outside the cluster, at the brokers' external addresses (the
    per-broker LoadBalancers the operator writes into <name>-listeners, METADATA external_host)."""
    async with Admin(bootstrap) as admin:
        await admin.create_topic(topic, 1)
    async with Producer(bootstrap, external=True, acks="durable") as producer:
        for value in values:
            await producer.send_and_wait(topic, value.encode(), b"k")
    got: list[str] = []
    async with Consumer(bootstrap, topic, start="earliest", external=True) as consumer:
        while len(got) < len(values):
            batch = await consumer.getmany(100, timeout_s=10)
            if not batch:
                break
            got += [m.value.decode() for m in batch]
    return got


def broker_pod(kubectl: ops.Kubectl, index: int = 0) -> dict[str, Any]:
    pod = kubectl.get("pod", f"rustmq-{index}")
    assert pod is not None
    return pod


def container_status(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["status"]["containerStatuses"][0]


def kill_container(kubectl: ops.Kubectl, pod: dict[str, Any]) -> None:
    """SIGKILL the broker process of `pod`'s container, as a crash: from a privileged pod on the
    same node that sees the node's processes (hostPID) and picks the one whose cgroup path names
    the container's id, so nothing else on the machine can be hit."""
    container_id = container_status(pod)["containerID"].split("://", 1)[1]
    script = (
        "import os, signal, sys\n"
        f"cid = {container_id!r}\n"
        "hits = []\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        cgroup = open(f'/proc/{pid}/cgroup').read()\n"
        "        cmdline = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
        "    except OSError:\n"
        "        continue\n"
        "    if cid in cgroup and b'broker' in cmdline:\n"
        "        hits.append(int(pid))\n"
        "if len(hits) != 1:\n"
        "    sys.exit(f'expected one broker process in container {cid}, found {hits}')\n"
        "os.kill(hits[0], signal.SIGKILL)\n"
        "print('killed', hits[0])\n"
    )
    name = f"killer-{uuid.uuid4().hex[:6]}"
    kubectl.apply({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "hostPID": True,
            "nodeName": pod["spec"]["nodeName"],
            "containers": [{
                "name": "killer",
                "image": BROKER_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "command": ["python3", "-c", script],
                "securityContext": {"runAsUser": 0, "runAsGroup": 0, "privileged": True},
            }],
        },
    })
    phase = ops.wait_for(
        "the killer pod to finish",
        lambda: (p := ((kubectl.get("pod", name) or {}).get("status") or {}).get("phase")) in ("Succeeded", "Failed") and p,
        timeout=120,
    )
    logs = kubectl.run("logs", name, check=False).stdout
    assert phase == "Succeeded", logs
    kubectl.run("delete", "pod", name, "--wait=false")


def test_the_chart_runs_the_operator_image(chart_operator: dict[str, Any], cluster: Any) -> None:
    """The operator of this tier is the chart's Deployment, running the operator image as uid 10001."""
    pods = json.loads(cluster.kubectl("-n", OPERATOR_NAMESPACE, "get", "pods", "-o", "json").stdout)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    assert len(running) == 1, [p["metadata"]["name"] for p in pods]
    status = container_status(running[0])
    assert status["ready"] and status["image"].endswith(OPERATOR_IMAGE), status
    assert status["restartCount"] == 0, f"the operator restarted: {status.get('lastState')}"
    assert status["imageID"], "the kubelet reports the image it really runs"
    assert running[0]["spec"]["securityContext"]["runAsUser"] == 10001


def test_seed_cluster_runs_a_real_broker_reachable_by_dns_and_load_balancer(
    chart_operator: dict[str, Any], cluster: Any, namespace: str, lb_ipam: Any
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    zone = node_zone(cluster)
    cr = seed(namespace)
    cr["spec"]["services"]["external"]["perBroker"] = {"enabled": True}
    kubectl.apply(cr)
    wait_ready(kubectl)
    pod = broker_pod(kubectl)
    # The API server copied the node's zone onto the pod (PodTopologyLabels), the kubelet gave it
    # to the broker as RUSTMQ_RACK (spec.rack's default key), and the broker advertises it.
    assert pod["metadata"]["labels"].get("topology.kubernetes.io/zone") == zone, pod["metadata"]["labels"]
    described = json.loads(client_pod(kubectl, f"rustmq cluster describe --json --bootstrap rustmq.{namespace}.svc:9092"))
    assert [b.get("rack") for b in described["brokers"]] == [zone], described["brokers"]
    status = container_status(pod)
    assert status["image"].endswith(BROKER_IMAGE) and status["imageID"], status
    assert status["ready"] and "running" in status["state"], status
    started = pod["status"]["conditions"]
    ready_at = next(c["lastTransitionTime"] for c in started if c["type"] == "Ready")
    assert ready_at >= status["state"]["running"]["startedAt"], "Ready only after the container ran"

    # By the ClusterIP Service's DNS name, from a pod: CoreDNS, kube-proxy, the pod network.
    values = [f"dns-{i}" for i in range(5)]
    out = client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc.cluster.local:9092", "orders", values))
    assert messages(out) == values, out

    # From this host through the LoadBalancer addresses: routed into the node, kube-proxy's rules,
    # the broker advertising its own per-broker LoadBalancer to clients outside the cluster.
    address = ops.wait_for(
        "the external address", lambda: kubectl.cluster_status().get("endpoints", {}).get("external", {}).get("ip"), 60
    )
    assert ipaddress.ip_address(address) in lb_ipam.network
    advertised = ops.wait_for(
        "broker 0's external address", lambda: ((kubectl.get("configmap", "rustmq-listeners") or {}).get("data") or {}).get("broker-0"), 60
    )
    assert ipaddress.ip_address(advertised) in lb_ipam.network and advertised != address
    host_values = [f"lb-{i}" for i in range(5)]
    assert asyncio.run(asyncio.wait_for(external_round_trip(f"{address}:9092", "payments", host_values), 90)) == host_values
    with urllib.request.urlopen(f"http://{address}:9094/metrics", timeout=10) as response:  # exposeMetrics
        metrics = response.read().decode()
    assert 'rustmq_messages_in_total{topic="payments"}' in metrics, metrics[:2000]
    # What the host wrote, read by DNS from a pod: one broker behind both paths.
    out = client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc:9092", "payments", host_values, consume_only=True))
    assert messages(out) == host_values


def test_a_killed_broker_is_restarted_by_the_kubelet_and_reported_by_the_operator(
    chart_operator: dict[str, Any], cluster: Any, namespace: str
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(seed(namespace))
    wait_ready(kubectl)
    uid = broker_pod(kubectl)["metadata"]["uid"]
    out = client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc:9092", "events", ["before-crash"]))
    assert messages(out) == ["before-crash"]

    kill_container(kubectl, broker_pod(kubectl))
    # The kubelet restarts the container within seconds; whether the operator's Ready turns False
    # meanwhile depends on when its pass runs (level-based: a quick restart may fall between two
    # passes), so the operator's view is checked on the crash loop below, which lasts.
    ops.wait_for("the kubelet to restart the broker", lambda: container_status(broker_pod(kubectl))["restartCount"] >= 1, 60)
    terminated = container_status(broker_pod(kubectl))["lastState"]["terminated"]
    assert terminated["exitCode"] == 137, terminated  # SIGKILL, as the kubelet saw it
    wait_ready(kubectl)

    # A second crash right away: the kubelet backs off (CrashLoopBackOff) and the operator says so.
    kill_container(kubectl, broker_pod(kubectl))
    stalled = ops.wait_for(
        "the operator to report the crash loop",
        lambda: (c := kubectl.condition("Stalled")).get("status") == "True" and c, 90, 0.3,
    )
    assert "CrashLoopBackOff" in stalled["message"], stalled
    wait_ready(kubectl, timeout=180)
    pod = broker_pod(kubectl)
    assert pod["metadata"]["uid"] == uid, "the same pod: restarted in place by the kubelet"
    assert container_status(pod)["restartCount"] >= 2
    out = client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc:9092", "events", ["before-crash"], consume_only=True))
    assert messages(out) == ["before-crash"], "the data of before the crashes is still there"


def test_a_config_change_rolls_real_brokers_one_at_a_time_with_their_data(
    chart_operator: dict[str, Any], cluster: Any, namespace: str
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(seed(namespace, replicas=3))
    wait_ready(kubectl, timeout=420)
    values = [f"ledger-{n}" for n in range(9)]
    assert messages(client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc:9092", "ledger", values))) == values
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in kubectl.pods()}

    unready_seen: list[int] = []
    stop = threading.Event()

    def watch_readiness() -> None:
        while not stop.is_set():
            pods = kubectl.pods()
            unready_seen.append(sum(not ops.pod_ready(p) for p in pods) + (3 - len(pods)))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch_readiness, daemon=True)
    watcher.start()
    try:
        kubectl.patch("rustmqcluster", "rustmq", {"spec": {"config": {"logLevel": "DEBUG"}}})

        def rolled() -> bool:
            pods = kubectl.pods()
            return len(pods) == 3 and all(
                p["metadata"]["uid"] != before[p["metadata"]["name"]] and ops.pod_ready(p) for p in pods
            )

        ops.wait_for("every broker to be replaced and Ready", rolled, timeout=600, interval=1)
        wait_ready(kubectl, timeout=120)
    finally:
        stop.set()
        watcher.join(10)
    assert max(unready_seen) == 1, f"more than one broker was down during the roll: {unready_seen}"
    assert 1 in unready_seen, "the roll was never seen taking a broker down"
    for pod in kubectl.pods():
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}
        config_map = kubectl.get("configmap", "rustmq-config")["data"]
        assert config_map.get("RUSTMQ_LOG_LEVEL") == "DEBUG" or env.get("RUSTMQ_LOG_LEVEL") == "DEBUG"
    out = client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc:9092", "ledger", values, consume_only=True))
    assert messages(out) == values, "the data written before the roll is all there after it"


def test_claims_are_real_directories_that_outlive_the_pod_and_grow_online(
    chart_operator: dict[str, Any], cluster: Any, namespace: str
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(seed(namespace))
    wait_ready(kubectl)
    client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc:9092", "kept", ["one", "two"]))
    claim = kubectl.get("pvc", "data-rustmq-0")
    pv = json.loads(cluster.kubectl("get", "pv", claim["spec"]["volumeName"], "-o", "json").stdout)
    if cluster.state_dir is not None:  # our node: the volume is a directory on this machine
        path = Path(pv["spec"]["local"]["path"])
        assert path.is_dir() and path.is_relative_to(cluster.state_dir)
        assert (path / "kept").is_dir() or any(path.rglob("kept*")), sorted(p.name for p in path.iterdir())
        assert path.stat().st_gid == 10001, "the kubelet gave the directory to the pod's fsGroup"

    old_uid = broker_pod(kubectl)["metadata"]["uid"]
    kubectl.run("delete", "pod", "rustmq-0", "--wait=true", "--timeout=120s")
    ops.wait_for("a new broker pod", lambda: (p := kubectl.get("pod", "rustmq-0")) and p["metadata"]["uid"] != old_uid, 120)
    wait_ready(kubectl)
    out = client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc:9092", "kept", ["one", "two"], consume_only=True))
    assert messages(out) == ["one", "two"], "the data outlived the pod"

    pod_uid = broker_pod(kubectl)["metadata"]["uid"]
    storage_class = json.loads(cluster.kubectl("get", "storageclass", claim["spec"]["storageClassName"], "-o", "json").stdout)
    kubectl.patch("rustmqcluster", "rustmq", {"spec": {"storage": {"size": "2Gi"}}})
    if not storage_class.get("allowVolumeExpansion"):
        # kind's default class (local-path) cannot grow volumes; our node's can (the branch below).
        # The operator says so, and the broker keeps its claim and keeps serving.
        stalled = kubectl.wait_condition("Stalled", "True", "StorageExpansionUnsupported")
        assert "does not allow volume expansion" in stalled["message"], stalled
        assert kubectl.get("pvc", "data-rustmq-0")["spec"]["resources"]["requests"]["storage"] == "1Gi"
        assert broker_pod(kubectl)["metadata"]["uid"] == pod_uid
        return
    ops.wait_for(
        "the claim to report 2Gi",
        lambda: (kubectl.get("pvc", "data-rustmq-0")["status"].get("capacity") or {}).get("storage") == "2Gi", 180,
    )
    wait_ready(kubectl)
    assert broker_pod(kubectl)["metadata"]["uid"] == pod_uid, "grown online: the broker was not restarted"
