"""`helm lint` and `helm template` of charts/rustmq-operator, with every rendered core object
checked against the Kubernetes OpenAPI models and the RBAC checked for least privilege."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, models

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rustmq-operator"
SCENARIOS = sorted((CHART / "ci").glob("*.yaml"))
MODELS = {
    "Deployment": models.V1Deployment,
    "ServiceAccount": models.V1ServiceAccount,
    "ClusterRole": models.V1ClusterRole,
    "ClusterRoleBinding": models.V1ClusterRoleBinding,
    "Role": models.V1Role,
    "RoleBinding": models.V1RoleBinding,
    "Service": models.V1Service,
    "ConfigMap": models.V1ConfigMap,
    "NetworkPolicy": models.V1NetworkPolicy,
}


def template(helm: str, *values: Path, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    args = [helm, "template", "rmq", str(CHART), "--namespace", "rustmq-system", "--include-crds"]
    for path in values:
        args += ["--values", str(path)]
    result = subprocess.run([*args, *extra], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.name)
def test_helm_lint_passes(helm: str, values: Path) -> None:
    result = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--values", str(values)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.name)
def test_rendered_objects_fit_the_kubernetes_openapi_models(helm: str, values: Path) -> None:
    client = ApiClient()
    for obj in template(helm, values):
        if obj["kind"] in MODELS:
            model = MODELS[obj["kind"]].from_dict(copy.deepcopy(obj))
            assert client.sanitize_for_serialization(model) == obj, obj["kind"]


def test_default_install_manages_its_own_namespace_with_the_crd(helm: str) -> None:
    objects = template(helm)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment",
        "NetworkPolicy", "Role", "RoleBinding", "Service", "ServiceAccount",
    ]
    crd = next(o for o in objects if o["kind"] == "CustomResourceDefinition")
    assert crd == yaml.safe_load((ROOT / "crds" / "rustmq.io_rustmqclusters.yaml").read_text())
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["rustmq-operator"]
    assert "--namespace=rustmq-system" in container["args"]
    assert "--all-namespaces" not in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["image"] == "rustmq/operator:0.1.0"
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "rustmq-system"
    cluster_role = next(o for o in objects if o["kind"] == "ClusterRole")
    cluster_resources = {res for rule in cluster_role["rules"] for res in rule["resources"]}
    assert cluster_resources == {"storageclasses", "customresourcedefinitions", "namespaces"}


def test_cluster_wide_is_asked_for(helm: str) -> None:
    objects = template(helm, CHART / "ci" / "cluster-wide-values.yaml")
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding")]
    cluster_role = next(o for o in objects if o["kind"] == "ClusterRole")
    assert "statefulsets" in {res for rule in cluster_role["rules"] for res in rule["resources"]}
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert "--all-namespaces" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    both = [helm, "template", "rmq", str(CHART), "--set", "clusterWide=true", "--set", "watchNamespaces={a}"]
    refused = subprocess.run(both, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "leave watchNamespaces empty" in refused.stderr


def test_talos_cilium_values_scope_the_operator_to_its_namespace(helm: str) -> None:
    objects = template(helm, CHART / "ci" / "talos-cilium-values.yaml")
    roles = [o for o in objects if o["kind"] == "Role"]
    assert [r["metadata"]["namespace"] for r in roles] == ["data-pipeline"]
    cluster_role = next(o for o in objects if o["kind"] == "ClusterRole")
    cluster_resources = {res for rule in cluster_role["rules"] for res in rule["resources"]}
    assert "statefulsets" not in cluster_resources and "rustmqclusters" not in cluster_resources
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert "--namespace=data-pipeline" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    kinds = {o["kind"] for o in objects}
    assert {"ServiceMonitor", "ConfigMap"} <= kinds


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.name)
def test_rbac_is_least_privilege(helm: str, values: Path) -> None:
    rules = [
        rule
        for obj in template(helm, values)
        if obj["kind"] in ("ClusterRole", "Role")
        for rule in obj["rules"]
    ]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
        assert "secrets" not in rule["resources"], rule
    granted = {(group, res, verb) for rule in rules for group in rule["apiGroups"] for res in rule["resources"] for verb in rule["verbs"]}
    assert ("rustmq.io", "rustmqclusters", "update") not in granted  # never writes the spec
    assert ("rustmq.io", "rustmqclusters", "patch") not in granted
    assert ("rustmq.io", "rustmqclusters/status", "patch") in granted
    assert ("", "pods/eviction", "create") in granted
    # A claim is deleted only after its broker was drained empty (retentionPolicy.whenScaled).
    assert ("", "persistentvolumeclaims", "delete") in granted
    assert ("", "persistentvolumeclaims", "update") not in granted
    # The membership ConfigMap (written) and the health ConfigMap (read): nothing beyond configmaps.
    assert {("", "configmaps", v) for v in ("get", "watch", "create", "patch")} <= granted
    assert ("rbac.authorization.k8s.io", "roles", "escalate") not in granted
    assert ("rbac.authorization.k8s.io", "roles", "bind") not in granted
    # Everything the brokers' Role grants, the operator holds (RBAC lets it grant nothing more).
    assert {("coordination.k8s.io", "leases", v) for v in ("get", "list", "watch", "create", "update")} <= granted
    assert {("", "configmaps", v) for v in ("get", "list", "watch", "create", "update", "delete")} <= granted
