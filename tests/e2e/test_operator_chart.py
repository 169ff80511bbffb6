"""The Helm chart on the real control plane: `helm install` creates the operator's Deployment
and namespaced RBAC, and that RBAC is enough: the real operator, authenticated as the chart's
ServiceAccount (a token from the TokenRequest API), brings a cluster to Ready, scales it and
rolls it. The Deployment's own pod only runs on a kwok node, which starts no container, so
the operator process runs beside the test with the ServiceAccount's identity instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import operator_e2e as ops

pytestmark = pytest.mark.slow
crd_installed = ops.crd_installed
import yaml  # noqa: E402

CHART = ops.REPO / "charts" / "rustmq-operator"


def service_account_kubeconfig(cluster: Any, namespace: str, account: str, path: Path) -> Path:
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = dict(admin["clusters"][0]["cluster"])
    ca = server.get("certificate-authority")
    if ca and not Path(ca).is_absolute():
        server["certificate-authority"] = str((cluster.kubeconfig.parent / ca).resolve())
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": server}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": account, "namespace": namespace}}],
        "current-context": "e2e",
    }))
    return path


@pytest.mark.timeout(300)
def test_chart_installs_and_its_rbac_is_enough_to_run_a_cluster(
    cluster: Any, namespace: str, crd_installed: None, tmp_path: Path
) -> None:
    release = f"op-{namespace[-6:]}"
    cluster.helm(
        "install", release, str(CHART), "--namespace", namespace, "--skip-crds", "--wait", "--timeout=120s",
        "--set", f"watchNamespaces={{{namespace}}}",
    )
    try:
        kubectl = ops.Kubectl(cluster, namespace)
        fullname = f"{release}-rustmq-operator"
        deployment = kubectl.get("deployment", fullname) or {}
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        assert kubectl.get("role", fullname) and kubectl.get("rolebinding", fullname)
        denied = cluster.kubectl(
            "auth", "can-i", "list", "secrets", "-n", namespace,
            f"--as=system:serviceaccount:{namespace}:{fullname}", check=False,
        )
        assert denied.stdout.strip() == "no"
        config = service_account_kubeconfig(cluster, namespace, fullname, tmp_path / "operator.kubeconfig")
        process = ops.OperatorProcess(config, tmp_path / "operator.log", namespaces=(namespace,)).start()
        try:
            kubectl.apply(ops.cluster_cr(namespace))
            kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
            kubectl.run("scale", "rmq/rustmq", "--replicas=2")
            kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
            kubectl.patch("rmq", "rustmq", {"spec": {"config": {"logLevel": "DEBUG"}}})
            kubectl.wait_condition("Ready", "True", "Reconciled", timeout=150)
            assert kubectl.cluster_status()["updatedReplicas"] == 2
            assert "Forbidden" not in process.log_tail(500), process.log_tail(80)
        finally:
            process.stop()
    finally:
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait", check=False)
