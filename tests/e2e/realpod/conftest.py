"""Fixtures of the real-pod tier: the project's images running as real pods under the operator.

They override tests/e2e/conftest.py's (same names, package scope, so this tier's cluster is
stopped when its last test is done and the rest of the suite keeps its kwok cluster):

- `cluster`: the cluster $KUBECONFIG names, if it has a real node (scripts/kind-e2e: kind, with
  the images loaded); otherwise a local cluster with one real node, `scripts/local-cluster up
  --runtime containerd` (needs root and `scripts/local-cluster build-node`), into which the
  images that `scripts/build-images` builds (rustmq/broker and rustmq/operator at the project's
  version, the CRD's and chart's defaults) are imported. Its teardown fails if `down` leaves
  anything behind (links, routes, cgroups, mounts, processes);
- `api_client`, `namespace`, `lb_ipam`: as in tests/e2e/conftest.py, on that cluster;
- `chart_operator`: the operator as its chart deploys it, from the operator image (`helm upgrade
  --install` into rustmq-system), Available before the first test; scaled to zero afterwards, so
  the kwok tier's own operator processes never meet a second operator on a shared cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from kubernetes import client, config

import e2e_cluster
from e2e_cluster import BROKER_IMAGE, LOCAL_CLUSTER, OPERATOR_IMAGE, REPO, VERSION, Cluster

OPERATOR_NAMESPACE = "rustmq-system"
lbipam = e2e_cluster.load_lbipam()


def real_nodes(cluster: Cluster) -> list[dict]:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return [n for n in nodes if n["metadata"].get("labels", {}).get("type") != "kwok"]


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    existing = e2e_cluster.external_cluster()
    if existing is not None:
        if not real_nodes(existing):
            pytest.fail(f"the real-pod tier needs a cluster with real nodes; {existing.kubeconfig} has only kwok's")
        yield existing
        return
    if os.geteuid() != 0:
        pytest.fail("the real-pod tier starts a real node, which needs root. " + e2e_cluster.HOW_TO_GET_THE_NODE)
    if e2e_cluster.cached_bin_dir(e2e_cluster.BUILD_NODE) is None:
        pytest.fail(e2e_cluster.HOW_TO_GET_THE_NODE)
    built = subprocess.run(
        [str(REPO / "scripts" / "build-images"), "broker", "operator"],
        capture_output=True, text=True, timeout=1500, cwd=REPO,
        env={**os.environ, "IMAGE_TAG": VERSION, "CONTAINER_ENGINE": os.environ.get("CONTAINER_ENGINE", "buildah")},
    )
    if built.returncode != 0:
        pytest.fail(f"scripts/build-images failed:\n{built.stderr[-4000:]}")
    with e2e_cluster.local_cluster(
        "--runtime", "containerd", prefix="rustmq-realpod-", timeout=600, check_down=True,
    ) as local:
        loaded = subprocess.run(
            [str(LOCAL_CLUSTER), "load-images", "--dir", str(local.state_dir), BROKER_IMAGE, OPERATOR_IMAGE],
            capture_output=True, text=True, timeout=600,
        )
        if loaded.returncode != 0:
            pytest.fail(f"scripts/local-cluster load-images failed:\n{loaded.stderr}")
        yield local


@pytest.fixture(scope="package")
def api_client(cluster: Cluster) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="package")
def _namespace_janitor(api_client: client.ApiClient) -> Iterator[list[str]]:
    deleted: list[str] = []
    yield deleted
    e2e_cluster.unblock_namespaces(api_client, deleted)


@pytest.fixture
def namespace(request: pytest.FixtureRequest, api_client: client.ApiClient, _namespace_janitor: list[str]) -> Iterator[str]:
    with e2e_cluster.fresh_namespace(api_client, request.node.name, _namespace_janitor) as name:
        yield name


@pytest.fixture
def lb_ipam(api_client: client.ApiClient) -> Iterator[lbipam.LBIPAM | lbipam.ObservedLBIPAM]:
    pool = lbipam.running_allocator(api_client)
    if pool is not None:
        yield lbipam.ObservedLBIPAM(api_client, pool)
        return
    ipam = lbipam.LBIPAM(api_client).start()
    try:
        yield ipam
    finally:
        ipam.stop()


@pytest.fixture(scope="package")
def chart_operator(cluster: Cluster) -> Iterator[dict]:
    """charts/rustmq-operator installed with the operator image; yields its Deployment."""
    repository, tag = OPERATOR_IMAGE.rsplit(":", 1)
    cluster.helm(
        "upgrade", "--install", "rustmq-operator", str(REPO / "charts" / "rustmq-operator"),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "clusterWide=true",  # each test has a namespace of its own
        "--wait", "--timeout", "5m", timeout=330,
    )
    cluster.kubectl("-n", OPERATOR_NAMESPACE, "scale", "deployment", "--all", "--replicas=1")
    cluster.kubectl("-n", OPERATOR_NAMESPACE, "wait", "deployment", "--all", "--for=condition=Available", "--timeout=300s",
                    timeout=320)
    deployments = json.loads(cluster.kubectl("-n", OPERATOR_NAMESPACE, "get", "deployments", "-o", "json").stdout)["items"]
    try:
        yield deployments[0]
    finally:
        cluster.kubectl("-n", OPERATOR_NAMESPACE, "scale", "deployment", "--all", "--replicas=0", check=False)
