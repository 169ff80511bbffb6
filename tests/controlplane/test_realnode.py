"""The pure parts of the local cluster's real node (tools/controlplane): the OCI archives the node
imports, the configuration it writes, the range check that keeps its addresses off the machine's
network, process recognition, and the provisioner's quantities. The node itself runs in the
real-pod tier (tests/e2e/realpod)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "controlplane"
sys.path.insert(0, str(TOOLS))
import localcluster  # noqa: E402
import ociarchive  # noqa: E402
import realnode  # noqa: E402


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"rustmq_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_archive_is_a_consistent_oci_layout_named_for_containerd() -> None:
    data = ociarchive.image_archive(
        "registry.k8s.io/pause:3.10.2", [ociarchive.File("bin/pause", b"\x7fELF...")], {"Entrypoint": ["/bin/pause"]}
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (descriptor,) = json.loads(files["index.json"])["manifests"]
    assert descriptor["annotations"]["io.containerd.image.name"] == "registry.k8s.io/pause:3.10.2"
    assert descriptor["annotations"]["org.opencontainers.image.ref.name"] == "3.10.2"

    def blob(digest: str) -> bytes:
        content = files[f"blobs/sha256/{digest.removeprefix('sha256:')}"]
        assert "sha256:" + hashlib.sha256(content).hexdigest() == digest
        return content

    manifest = json.loads(blob(descriptor["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    (layer_descriptor,) = manifest["layers"]
    layer = blob(layer_descriptor["digest"])
    assert config["rootfs"]["diff_ids"] == [layer_descriptor["digest"]]  # stored uncompressed
    assert config["config"]["Entrypoint"] == ["/bin/pause"]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin"].isdir() and members["bin/pause"].mode == 0o755 and members["bin/pause"].uid == 0
    # Same inputs, same bytes: the digests are reproducible.
    assert data == ociarchive.image_archive(
        "registry.k8s.io/pause:3.10.2", [ociarchive.File("bin/pause", b"\x7fELF...")], {"Entrypoint": ["/bin/pause"]}
    )


def test_node_ranges_refuse_routes_and_resolvers_of_the_machine() -> None:
    assert realnode.range_conflicts([{"dst": "default", "dev": "eth0"}, {"dst": "192.0.2.0/24", "dev": "eth0"}], ["10.255.255.53"]) == []
    problems = realnode.range_conflicts([{"dst": "10.89.0.7", "dev": "tun0"}], ["10.96.0.10"])
    assert any("10.89.0.0/24" in p and "tun0" in p for p in problems)
    assert any("DNS server 10.96.0.10" in p for p in problems)
    # The uplink and the registry proxy of our machines are outside every range of the node.
    for address in ("192.0.2.1", "192.0.2.2", "203.0.113.80", "10.255.255.53"):
        assert not any(realnode.ipaddress.ip_address(address) in net for net in realnode.NODE_RANGES)


def test_kubelet_and_proxy_configuration_keep_to_the_node() -> None:
    node_dir = Path("/tmp/state/node")
    kubelet = realnode.kubelet_config(node_dir, Path("/tmp/state/pki/ca.crt"))
    assert kubelet["failCgroupV1"] is False and kubelet["cgroupRoot"] == "/rustmq-node"
    assert kubelet["resolvConf"].startswith(str(node_dir)) and kubelet["clusterDNS"] == ["10.96.0.10"]
    assert kubelet["authentication"]["anonymous"]["enabled"] is False
    assert all(str(v).startswith(str(node_dir)) for k, v in kubelet.items() if k.endswith("Dir"))
    proxy = realnode.kube_proxy_config(node_dir)
    assert proxy["mode"] == "iptables" and proxy["nodePortAddresses"] == ["10.87.0.2/32"]
    assert proxy["conntrack"]["maxPerCore"] == 0
    containerd = realnode.containerd_config(node_dir, Path("/cache/bin"))
    assert "restrict_oom_score_adj = true" in containerd and "SystemdCgroup = false" in containerd
    assert "sandbox = 'registry.k8s.io/pause:3.10.2'" in containerd
    cni = realnode.cni_config(node_dir)
    assert cni["plugins"][0]["bridge"] == realnode.BRIDGE
    assert cni["plugins"][0]["ipam"]["dataDir"].startswith(str(node_dir))


def test_processes_are_recognised_by_program_or_helper_script() -> None:
    state = "/tmp/x/"
    assert localcluster.component_of(["/cache/bin/kubelet", f"--config={state}node/kubelet.yaml"]) == "kubelet"
    assert localcluster.component_of(["containerd-shim-runc-v2", "-address", f"{state}node/c.sock"]) == "containerd-shim-runc-v2"
    assert localcluster.component_of(["/venv/bin/python", "/r/tools/controlplane/localcluster.py", "node-holder", "--dir", state]) == "node-holder"
    assert localcluster.component_of(["/venv/bin/python", "/r/tools/controlplane/lbipam.py", "--kubeconfig", "k"]) == "lbipam"
    assert localcluster.component_of(["/venv/bin/python", "/r/tools/controlplane/hostpath_provisioner.py"]) == "provisioner"
    assert localcluster.component_of(["/usr/bin/python3", "something.py"]) is None
    assert localcluster.component_of(["sleep", "300"]) is None


@pytest.mark.parametrize(("quantity", "expected"), [("1Gi", 2**30), ("2Gi", 2**31), ("500M", 500 * 10**6), ("1024", 1024), ("1.5Gi", 3 * 2**29)])
def test_provisioner_reads_storage_quantities(quantity: str, expected: int) -> None:
    provisioner = load("hostpath_provisioner")
    assert provisioner.quantity_bytes(quantity) == expected


def test_lb_pool_is_neither_test_net_our_machines_use() -> None:
    lbipam = load("lbipam")
    pool = realnode.ipaddress.ip_network(lbipam.DEFAULT_POOL)
    assert pool == realnode.LB_POOL and str(pool) == localcluster.LB_POOL
    for used in ("192.0.2.0/24", "203.0.113.0/24"):
        assert not pool.overlaps(realnode.ipaddress.ip_network(used))
