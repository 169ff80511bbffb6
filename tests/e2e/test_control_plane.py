"""The test control plane itself: what the operator's e2e tests rely on, proven on the real thing.

Runs against the session's cluster (scripts/local-cluster, or $KUBECONFIG's cluster): a
StatefulSet with a volumeClaimTemplate gets Ready pods (kwok plays the kubelet; nothing runs) and
Bound PVCs from the default StorageClass; the garbage collector removes dependents of a deleted
owner; /version reports the release built; RBAC is enforced; helm carries the Kubernetes version;
the LB-IPAM helper gives LoadBalancer Services an address. The last test crashes pieces of a
second local cluster to prove `scripts/local-cluster` recovers and cleans up.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "scripts" / "local-cluster"


def pinned_k8s_version() -> str:
    text = (REPO / "tools" / "controlplane" / "versions.env").read_text()
    return re.search(r"^K8S_VERSION=(\S+)", text, re.MULTILINE).group(1)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


STATEFULSET = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web}
spec:
  serviceName: web
  replicas: 3
  selector: {matchLabels: {app: web}}
  persistentVolumeClaimRetentionPolicy: {whenDeleted: Delete, whenScaled: Retain}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: registry.invalid/never-pulled:1
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_statefulset_gets_ready_pods_and_bound_claims_and_is_garbage_collected(cluster, api_client, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=STATEFULSET)
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)

    wait_for(lambda: apps.read_namespaced_stateful_set("web", namespace).status.ready_replicas == 3, 150, "3 ready replicas")

    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert sorted(p.metadata.name for p in pods) == ["web-0", "web-1", "web-2"]
    for pod in pods:
        assert pod.status.phase == "Running"
        assert pod.spec.node_name, f"{pod.metadata.name} was never scheduled"
        assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
    claims = core.list_namespaced_persistent_volume_claim(namespace).items
    assert sorted(c.metadata.name for c in claims) == ["data-web-0", "data-web-1", "data-web-2"]
    for claim in claims:
        assert claim.status.phase == "Bound"
        assert claim.spec.storage_class_name == "standard", "the default StorageClass was not applied"
        volume = core.read_persistent_volume(claim.spec.volume_name)
        assert volume.spec.claim_ref.name == claim.metadata.name
        assert volume.status.phase == "Bound"

    # The PVCs carry the StatefulSet as owner (retention policy Delete), the pods too:
    # deleting the owner must garbage-collect both, and the host-path PVs with them.
    volume_names = [c.spec.volume_name for c in claims]
    cluster.kubectl("delete", "statefulset", "web", "-n", namespace, "--cascade=background", "--wait=false")
    wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector="app=web").items, 90, "pods to be collected")
    wait_for(lambda: not core.list_namespaced_persistent_volume_claim(namespace).items, 90, "PVCs to be collected")

    def volumes_gone() -> bool:
        names = {v.metadata.name for v in core.list_persistent_volume().items}
        return not names.intersection(volume_names)

    wait_for(volumes_gone, 90, "the provisioned PVs to be deleted")


@pytest.mark.timeout(60)
def test_deleting_an_owner_collects_its_dependents(api_client, namespace):
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    reference = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[reference]))
    )
    core.delete_namespaced_config_map("owner", namespace)

    def collected() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(collected, 45, "the dependent ConfigMap to be garbage-collected")


@pytest.mark.timeout(60)
def test_version_reports_the_release(cluster, api_client):
    info = client.VersionApi(api_client).get_code()
    if cluster.external:
        assert re.fullmatch(r"v1\.\d+\.\d+.*", info.git_version), info.git_version
    else:
        assert info.git_version == pinned_k8s_version()
        assert (info.major, info.minor) == ("1", pinned_k8s_version().split(".")[1])
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == info.git_version
    assert versions["clientVersion"]["gitVersion"].startswith("v1.")


@pytest.mark.timeout(60)
def test_rbac_is_enforced_for_service_accounts(cluster, namespace):
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    who = f"system:serviceaccount:{namespace}:nobody"
    denied = cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, "--as", who, check=False)
    assert denied.stdout.strip() == "no"
    cluster.kubectl("create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "nobody-reads", "--role=pod-reader", f"--serviceaccount={namespace}:nobody", "-n", namespace)
    allowed = cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, "--as", who, check=False)
    assert allowed.stdout.strip() == "yes"


@pytest.mark.timeout(60)
def test_helm_renders_for_the_cluster_version(cluster, tmp_path):
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\ndata: {kube: '{{ .Capabilities.KubeVersion.Version }}'}\n"
    )
    rendered = cluster.helm("template", str(chart)).stdout
    minor = pinned_k8s_version().split(".")[1]
    assert f"kube: 'v1.{minor}.0'" in rendered, rendered
    assert cluster.helm("lint", str(chart)).returncode == 0


@pytest.mark.timeout(60)
def test_lb_ipam_assigns_addresses_from_its_pool(api_client, namespace, lb_ipam):
    core = client.CoreV1Api(api_client)

    def service(name: str, lb_class: str | None = None) -> client.V1Service:
        return client.V1Service(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1ServiceSpec(
                type="LoadBalancer", load_balancer_class=lb_class, selector={"app": name},
                ports=[client.V1ServicePort(port=9092)],
            ),
        )

    core.create_namespaced_service(namespace, service("other", lb_class="example.com/not-ours"))
    core.create_namespaced_service(namespace, service("broker"))

    def ingress(name: str):
        return core.read_namespaced_service_status(name, namespace).status.load_balancer.ingress

    address = wait_for(lambda: ingress("broker"), 20, "an ingress address")[0].ip
    assert ipaddress.ip_address(address) in lb_ipam.network
    assert core.read_namespaced_service("broker", namespace).spec.ports[0].node_port, "NodePort was not allocated"
    assert not ingress("other"), "a Service of another loadBalancerClass must be left to its controller"
    assert lb_ipam.assigned()[f"{namespace}/broker"] == (address,)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_cluster_recovers_from_a_crashed_component(cluster):
    """A second, one-node local cluster: SIGKILL its apiserver, leave a stale pid file pointing at
    an unrelated process, and check that `up` replaces it and `down` removes exactly its own."""
    if cluster.external:
        pytest.skip("exercises scripts/local-cluster, which this run does not use (KUBECONFIG cluster)")
    state_dir = Path(tempfile.mkdtemp(prefix="rustmq-e2e-crash-"))

    def local_cluster(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(LOCAL_CLUSTER), *args, "--dir", str(state_dir)], capture_output=True, text=True, timeout=150
        )

    bystander = subprocess.Popen(["sleep", "300"])
    try:
        assert local_cluster("up", "--no-build", "--nodes", "1").returncode == 0
        apiserver_pid = int((state_dir / "run" / "kube-apiserver.pid").read_text())
        os.kill(apiserver_pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{apiserver_pid}/cmdline").read_bytes(), 10, "the apiserver to die")
        (state_dir / "run" / "kube-apiserver.pid").write_text(f"{bystander.pid}\n")  # a recycled pid
        status = local_cluster("status")
        assert status.returncode == 1 and re.search(r"kube-apiserver\s+not running", status.stdout)

        again = local_cluster("up", "--no-build", "--nodes", "1")
        assert again.returncode == 0, again.stderr
        assert local_cluster("status").returncode == 0
        pids = [int(p.read_text()) for p in (state_dir / "run").glob("*.pid")]
        assert len(pids) == 6  # etcd, apiserver, controller-manager, scheduler, kwok, LB-IPAM

        assert local_cluster("down").returncode == 0
        assert not state_dir.exists()
        for pid in pids:
            assert not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
        assert bystander.poll() is None, "down killed a process that was not its own"
    finally:
        local_cluster("down")
        bystander.kill()
        bystander.wait()
