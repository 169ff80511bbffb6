"""Fixtures for the e2e suite: a real Kubernetes control plane, once per pytest session.

By default the session starts its own cluster with `scripts/local-cluster up` (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and kwok fake nodes, built from source
and cached; see docs/testing.md) in a fresh state directory and stops it at the end; a watchdog
stops it too if the session is killed. When $KUBECONFIG names an existing file (a kind cluster
from scripts/kind-e2e, or a local cluster after `eval "$(scripts/local-cluster env)"`), that
cluster is used instead and nothing is started or stopped.

Fixtures (the operator's tests are written against exactly these names):
- `cluster` (session): `.kubeconfig`, `.env`, `.bin_dir`, `.kubectl(*args, input=None, check=True)`,
  `.helm(...)`, `.external`;
- `api_client` (session): a kubernetes.client.ApiClient for that cluster;
- `namespace` (function): a fresh namespace whose `default` ServiceAccount exists, deleted after
  the test without waiting (at the session's end, finalizers that nobody will ever remove, e.g.
  an operator's on its custom resources, are dropped so nothing stays Terminating);
- `lb_ipam` (function): tests/e2e/lbipam.py running as a background thread for the test.

Every test under tests/e2e gets the `e2e` marker. A missing toolchain fails the session with a
message that says how to get it: the suite never skips silently.
"""

from __future__ import annotations

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
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LOCAL_CLUSTER = REPO / "scripts" / "local-cluster"
BUILD = REPO / "tools" / "controlplane" / "build"
HOW_TO_GET_IT = (
    "The e2e suite needs the local control plane binaries (kube-apiserver, kube-controller-manager, "
    "kube-scheduler, kubectl, etcd, kwok, helm). Build them once with `scripts/local-cluster build` "
    "(Go 1.26+ and the Go module proxy; 13 to 34 min cold on 2 cores, depending on load, cached afterwards in "
    "~/.cache/rustmq/controlplane), or run `scripts/test`, which builds them first. To use another "
    "cluster instead, point KUBECONFIG at it (see docs/testing.md)."
)


def _load_lbipam():
    spec = importlib.util.spec_from_file_location("rustmq_e2e_lbipam", HERE / "lbipam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lbipam = _load_lbipam()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


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


def _cached_bin_dir() -> Path | None:
    result = subprocess.run([str(BUILD), "--print-dir"], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    return Path(lines[-1]) if result.returncode == 0 and lines else None


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    existing = os.environ.get("KUBECONFIG", "")
    bin_dir = _cached_bin_dir()
    if existing and Path(existing).is_file():
        if bin_dir is None:
            kubectl = shutil.which("kubectl")
            if kubectl is None or shutil.which("helm") is None:
                pytest.fail(f"KUBECONFIG={existing} is set but kubectl/helm are not on PATH. {HOW_TO_GET_IT}")
            bin_dir = Path(kubectl).parent
        yield Cluster(kubeconfig=Path(existing), bin_dir=bin_dir, external=True)
        return
    if bin_dir is None:
        pytest.fail(HOW_TO_GET_IT)
    state_dir = Path(tempfile.mkdtemp(prefix="rustmq-e2e-cluster-"))
    up = subprocess.run(
        [str(LOCAL_CLUSTER), "up", "--no-build", "--dir", str(state_dir), "--owner-pid", str(os.getpid())],
        capture_output=True, text=True, timeout=180,
    )
    if up.returncode != 0:
        subprocess.run([str(LOCAL_CLUSTER), "down", "--dir", str(state_dir)], capture_output=True)
        pytest.fail(f"scripts/local-cluster up failed:\n{up.stderr}")
    try:
        yield Cluster(kubeconfig=Path(up.stdout.strip().splitlines()[-1]), bin_dir=bin_dir, external=False, state_dir=state_dir)
    finally:
        subprocess.run([str(LOCAL_CLUSTER), "down", "--dir", str(state_dir)], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def api_client(cluster: Cluster) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


def _namespace_name(node_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return f"e2e-{stem}-{uuid.uuid4().hex[:6]}"


def _drop_custom_resource_finalizers(api_client: client.ApiClient, namespace: str) -> None:
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


@pytest.fixture(scope="session")
def _namespace_janitor(api_client: client.ApiClient) -> Iterator[list[str]]:
    """Namespaces the tests deleted; at the end, unblock any still stuck in Terminating."""
    deleted: list[str] = []
    yield deleted
    core = client.CoreV1Api(api_client)
    deadline = time.monotonic() + 20
    remaining = deleted
    while remaining and time.monotonic() < deadline:
        for name in remaining:
            # Most likely a finalizer of an operator that is no longer running: drop them.
            _drop_custom_resource_finalizers(api_client, name)
        time.sleep(1)
        remaining = [n for n in remaining if _namespace_exists(core, n)]


def _namespace_exists(core: client.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespace(name)
        return True
    except ApiException as err:
        if err.status == 404:
            return False
        raise


@pytest.fixture
def namespace(request: pytest.FixtureRequest, api_client: client.ApiClient, _namespace_janitor: list[str]) -> Iterator[str]:
    core = client.CoreV1Api(api_client)
    name = _namespace_name(request.node.name)
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
    _namespace_janitor.append(name)


@pytest.fixture
def lb_ipam(api_client: client.ApiClient) -> Iterator[lbipam.LBIPAM]:
    """LB-IPAM for the test's duration: LoadBalancer Services get addresses from 192.0.2.0/24."""
    ipam = lbipam.LBIPAM(api_client).start()
    try:
        yield ipam
    finally:
        ipam.stop()
