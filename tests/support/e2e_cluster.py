"""The clusters the e2e tiers run against, shared by tests/e2e/conftest.py (kwok) and
tests/e2e/realpod/conftest.py (a real node, or kind).

A `Cluster` is a kubeconfig plus the tools (kubectl, helm) that talk to it. `local_cluster()`
starts one with `scripts/local-cluster up` in a fresh state directory and stops it afterwards
(a watchdog stops it too if the session is killed); `external_cluster()` is the one $KUBECONFIG
names, when it names a file (a kind cluster from scripts/kind-e2e, or a local cluster after
`eval "$(scripts/local-cluster env)"`), which is used as it is. The namespace helpers give each
test a fresh namespace and unblock the ones whose finalizers nobody removes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "scripts" / "local-cluster"
VERSION = next(
    line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("version = ")
)
# The names the CRD's spec.image and the chart's image default to; scripts/build-images tags them so.
BROKER_IMAGE = f"rustmq/broker:{VERSION}"
OPERATOR_IMAGE = f"rustmq/operator:{VERSION}"
BUILD = REPO / "tools" / "controlplane" / "build"
BUILD_NODE = REPO / "tools" / "controlplane" / "build-node"
HOW_TO_GET_IT = (
    "The e2e suite needs the local control plane binaries (kube-apiserver, kube-controller-manager, "
    "kube-scheduler, kubectl, etcd, kwok, helm). Build them once with `scripts/local-cluster build` "
    "(Go 1.26+ and the Go module proxy; 13 to 34 min cold on 2 cores, depending on load, cached afterwards in "
    "~/.cache/rustmq/controlplane), or run `scripts/test`, which builds them first. To use another "
    "cluster instead, point KUBECONFIG at it (see docs/testing.md)."
)
HOW_TO_GET_THE_NODE = (
    "The real-pod tier needs the real node's binaries too (kubelet, kube-proxy, containerd, runc, CNI "
    "plugins, CoreDNS): build them once with `scripts/local-cluster build-node` (about 10 min cold on 2 "
    "cores, cached in ~/.cache/rustmq/node), or run `scripts/test`, which builds them first; it runs as "
    "root. Or point KUBECONFIG at a cluster with real nodes and the images loaded (scripts/kind-e2e)."
)


def load_lbipam():
    """tools/controlplane/lbipam.py, a script rather than a package module."""
    spec = importlib.util.spec_from_file_location("rustmq_e2e_lbipam", REPO / "tools" / "controlplane" / "lbipam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; unlike CalledProcessError, the message includes its output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@dataclass
class Cluster:
    kubeconfig: Path
    bin_dir: Path
    external: bool
    state_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.env:
            self.env = {
                **os.environ,
                "KUBECONFIG": str(self.kubeconfig),
                "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            }

    def run(self, tool: str, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / tool) if (self.bin_dir / tool).exists() else tool, *map(str, args)]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise CommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("kubectl", *args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("helm", *args, input=input, check=check, timeout=timeout)


def cached_bin_dir(build_script: Path = BUILD) -> Path | None:
    result = subprocess.run([str(build_script), "--print-dir"], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    return Path(lines[-1]) if result.returncode == 0 and lines else None


def external_cluster() -> Cluster | None:
    """The cluster $KUBECONFIG names, if it names a file; fails when kubectl/helm are missing."""
    existing = os.environ.get("KUBECONFIG", "")
    if not (existing and Path(existing).is_file()):
        return None
    bin_dir = cached_bin_dir()
    if bin_dir is None:
        kubectl = shutil.which("kubectl")
        if kubectl is None or shutil.which("helm") is None:
            pytest.fail(f"KUBECONFIG={existing} is set but kubectl/helm are not on PATH. {HOW_TO_GET_IT}")
        bin_dir = Path(kubectl).parent
    return Cluster(kubeconfig=Path(existing), bin_dir=bin_dir, external=True)


@contextlib.contextmanager
def local_cluster(*up_args: str, prefix: str = "rustmq-e2e-cluster-", timeout: float = 180,
                  check_down: bool = False) -> Iterator[Cluster]:
    """`scripts/local-cluster up --no-build UP_ARGS` in a fresh state directory, `down` afterwards.

    With `check_down`, a `down` that fails (for the real node: one that left links, cgroups,
    mounts or processes behind) fails the fixture's teardown.
    """
    bin_dir = cached_bin_dir()
    if bin_dir is None:
        pytest.fail(HOW_TO_GET_IT)
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    up = subprocess.run(
        [str(LOCAL_CLUSTER), "up", "--no-build", *up_args, "--dir", str(state_dir), "--owner-pid", str(os.getpid())],
        capture_output=True, text=True, timeout=timeout,
    )
    if up.returncode != 0:
        subprocess.run([str(LOCAL_CLUSTER), "down", "--dir", str(state_dir)], capture_output=True)
        pytest.fail(f"scripts/local-cluster up {' '.join(up_args)} failed:\n{up.stderr}")
    try:
        yield Cluster(kubeconfig=Path(up.stdout.strip().splitlines()[-1]), bin_dir=bin_dir, external=False, state_dir=state_dir)
    finally:
        # A real node stops component by component (10 s grace each, then SIGKILL): 3 s on a
        # quiet machine, over 120 s once at load 17, so the bound is generous.
        down = subprocess.run([str(LOCAL_CLUSTER), "down", "--dir", str(state_dir)], capture_output=True, text=True, timeout=300)
        if check_down and down.returncode != 0:
            pytest.fail(f"scripts/local-cluster down failed:\n{down.stderr}")


def namespace_name(node_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return f"e2e-{stem}-{uuid.uuid4().hex[:6]}"


def drop_custom_resource_finalizers(api_client: client.ApiClient, namespace: str) -> None:
    """Clear finalizers on custom resources left in `namespace`, whose operator may be gone."""
    custom = client.CustomObjectsApi(api_client)
    crds = client.ApiextensionsV1Api(api_client).list_custom_resource_definition().items
    for crd in crds:
        if crd.spec.scope != "Namespaced":
            continue
        version = next((v.name for v in crd.spec.versions if v.storage), crd.spec.versions[0].name)
        try:
            objects = custom.list_namespaced_custom_object(crd.spec.group, version, namespace, crd.spec.names.plural)
        except ApiException:
            continue
        for obj in objects.get("items", []):
            if obj["metadata"].get("finalizers"):
                try:
                    custom.patch_namespaced_custom_object(
                        crd.spec.group, version, namespace, crd.spec.names.plural, obj["metadata"]["name"],
                        {"metadata": {"finalizers": None}},
                    )
                except ApiException as err:
                    if err.status != 404:
                        raise


def namespace_exists(core: client.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespace(name)
        return True
    except ApiException as err:
        if err.status == 404:
            return False
        raise


def unblock_namespaces(api_client: client.ApiClient, deleted: list[str], timeout: float = 20) -> None:
    """Namespaces the tests deleted; drop the finalizers that keep any of them Terminating."""
    core = client.CoreV1Api(api_client)
    deadline = time.monotonic() + timeout
    remaining = deleted
    while remaining and time.monotonic() < deadline:
        for name in remaining:
            # Most likely a finalizer of an operator that is no longer running: drop them.
            drop_custom_resource_finalizers(api_client, name)
        time.sleep(1)
        remaining = [n for n in remaining if namespace_exists(core, n)]


@contextlib.contextmanager
def fresh_namespace(api_client: client.ApiClient, node_name: str, deleted: list[str]) -> Iterator[str]:
    """A new namespace whose `default` ServiceAccount exists; deleted afterwards without waiting."""
    core = client.CoreV1Api(api_client)
    name = namespace_name(node_name)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"rustmq.io/e2e": "true"})))
    # Pods are rejected until the service-account controller has made `default`.
    deadline = time.monotonic() + 30
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException as err:
            if err.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield name
    # Not waited for: the namespace controller holds every deletion for 5 s (a hard-coded grace
    # period), and the session's janitor unblocks namespaces whose finalizers nobody removes.
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except ApiException as err:
        if err.status != 404:
            raise
    deleted.append(name)
