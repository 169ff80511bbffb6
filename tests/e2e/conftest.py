"""Fixtures for the e2e suite: a real Kubernetes control plane, once per pytest session.

By default the session starts its own cluster with `scripts/local-cluster up` (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and kwok fake nodes, built from source
and cached, plus the LB-IPAM helper; see docs/testing.md) in a fresh state directory and stops it
at the end; a watchdog stops it too if the session is killed. When $KUBECONFIG names an existing
file (a kind cluster from scripts/kind-e2e, or a local cluster after
`eval "$(scripts/local-cluster env)"`), that cluster is used instead and nothing is started or
stopped. The real-pod tier (tests/e2e/realpod) overrides these fixtures with a real node's.

Fixtures (the operator's tests are written against exactly these names):
- `cluster` (session): `.kubeconfig`, `.env`, `.bin_dir`, `.kubectl(*args, input=None, check=True)`,
  `.helm(...)`, `.external`;
- `api_client` (session): a kubernetes.client.ApiClient for that cluster;
- `namespace` (function): a fresh namespace whose `default` ServiceAccount exists, deleted after
  the test without waiting (at the session's end, finalizers that nobody will ever remove, e.g.
  an operator's on its custom resources, are dropped so nothing stays Terminating);
- `lb_ipam` (function): LoadBalancer addresses: the cluster's own LB-IPAM when it runs one
  (`scripts/local-cluster up` starts tools/controlplane/lbipam.py), else that helper as a thread.

Every test under tests/e2e gets the `e2e` marker, and those under tests/e2e/realpod the
`realpod` marker too. A missing toolchain fails the session with a message that says how to get
it: the suite never skips silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

import e2e_cluster
from e2e_cluster import Cluster, CommandError  # noqa: F401 - re-exported for the tests

HERE = Path(__file__).resolve().parent
REALPOD = HERE / "realpod"
lbipam = e2e_cluster.load_lbipam()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parents = Path(str(item.path)).resolve().parents
        if HERE in parents:
            item.add_marker(pytest.mark.e2e)
        if REALPOD in parents:
            item.add_marker(pytest.mark.realpod)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    existing = e2e_cluster.external_cluster()
    if existing is not None:
        yield existing
        return
    with e2e_cluster.local_cluster() as local:
        yield local


@pytest.fixture(scope="session")
def api_client(cluster: Cluster) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def _namespace_janitor(api_client: client.ApiClient) -> Iterator[list[str]]:
    """Namespaces the tests deleted; at the end, unblock any still stuck in Terminating."""
    deleted: list[str] = []
    yield deleted
    e2e_cluster.unblock_namespaces(api_client, deleted)


@pytest.fixture
def namespace(request: pytest.FixtureRequest, api_client: client.ApiClient, _namespace_janitor: list[str]) -> Iterator[str]:
    with e2e_cluster.fresh_namespace(api_client, request.node.name, _namespace_janitor) as name:
        yield name


@pytest.fixture
def lb_ipam(api_client: client.ApiClient) -> Iterator[lbipam.LBIPAM | lbipam.ObservedLBIPAM]:
    """LoadBalancer addresses for the test: the cluster's own LB-IPAM if it runs one (a local
    cluster's `up` starts it), else tools/controlplane/lbipam.py as a thread for the test's
    duration (kind). Either way `.assigned()` says what it handed out, `.network` from where."""
    pool = lbipam.running_allocator(api_client)
    if pool is not None:
        yield lbipam.ObservedLBIPAM(api_client, pool)
        return
    ipam = lbipam.LBIPAM(api_client).start()
    try:
        yield ipam
    finally:
        ipam.stop()
