"""The API server itself refuses invalid RustMQClusters, with messages a person understands:
the CRD's structural schema, strict field validation and CEL rules (no operator needed)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

import operator_e2e as ops

pytestmark = pytest.mark.slow
crd_installed = ops.crd_installed


def refused(kubectl: Any, obj: dict[str, Any]) -> str:
    result = kubectl.apply(obj, check=False)
    assert result.returncode != 0, f"accepted: {obj}"
    return str(result.stderr)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"replicas": -1}, "replicas cannot be negative"),
        ({"ports": {"producer": 9092, "consumer": 9092}}, "ports must be distinct"),
        ({"replicaz": 3}, 'unknown field "spec.replicaz"'),
        ({"storage": {"size": "ten gigs"}}, "storage.size must be a positive quantity"),
        ({"services": {"external": {"perBroker": {"enabled": True}}}}, "perBroker needs services.external.enabled with type LoadBalancer"),
        ({"networkPolicy": {"clients": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}}, "either an ipBlock or pod/namespace selectors"),
        ({"tls": {"enabled": True, "certManager": {"issuerRef": {"name": "ca", "kind": "Vault"}}}}, "Vault"),
        ({"services": {"metrics": {"enabled": False}}}, "monitoring.serviceMonitor.enabled needs services.metrics.enabled"),
        ({"tls": {"admin": True}}, "tls.admin needs tls.enabled"),
        ({"services": {"external": {"enabled": True, "type": "NodePort", "loadBalancerClass": "x"}}}, "need type LoadBalancer"),
    ],
)
def test_invalid_specs_are_refused_on_create(cluster: Any, namespace: str, crd_installed: None, spec: dict[str, Any], message: str) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    assert message in refused(kubectl, ops.cluster_cr(namespace, **spec))


def test_a_name_only_cr_is_accepted_and_defaulted(cluster: Any, namespace: str, crd_installed: None) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace))
    spec = (kubectl.get("rmq", "rustmq") or {})["spec"]
    assert spec["replicas"] == 1 and spec["partitions"] == 12
    assert spec["storage"]["size"] == "10Gi"
    assert spec["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1000m", "memory": "2Gi"}}
    assert spec["ports"] == {"producer": 9092, "consumer": 9093, "metrics": 9094}


def test_a_too_long_name_is_refused(cluster: Any, namespace: str, crd_installed: None) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    assert "at most 52 characters" in refused(kubectl, ops.cluster_cr(namespace, name="r" * 53))


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        ({"partitions": 12}, {"partitions": 6}, "partitions cannot be decreased"),
        ({"storage": {"size": "10Gi"}}, {"storage": {"size": "5Gi"}}, "storage.size cannot shrink (from 10Gi to 5Gi)"),
        ({"storage": {"storageClassName": "standard"}}, {"storage": {"storageClassName": "fast"}}, "storageClassName cannot change"),
        ({}, {"storage": {"storageClassName": "fast"}}, "storageClassName cannot change"),
        (
            {"services": {"external": {"enabled": True, "loadBalancerClass": "io.cilium/bgp-control-plane"}}},
            {"services": {"external": {"enabled": True, "loadBalancerClass": "other"}}},
            "loadBalancerClass cannot change",
        ),
    ],
)
def test_illegal_changes_are_refused_on_update(
    cluster: Any, namespace: str, crd_installed: None, before: dict[str, Any], after: dict[str, Any], message: str
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, **before))
    assert message in refused(kubectl, ops.cluster_cr(namespace, **after))


def test_legal_changes_are_accepted(cluster: Any, namespace: str, crd_installed: None) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace, partitions=12, storage={"size": "10Gi"}))
    kubectl.apply(ops.cluster_cr(namespace, partitions=24, storage={"size": "10240Mi"}))
    kubectl.apply(ops.cluster_cr(namespace, partitions=24, storage={"size": "20Gi"}))
    spec = (kubectl.get("rmq", "rustmq") or {})["spec"]
    assert spec["partitions"] == 24 and spec["storage"]["size"] == "20Gi"


def test_scale_subresource_refuses_negative_replicas(cluster: Any, namespace: str, crd_installed: None) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace))
    result = kubectl.run(
        "patch", "rmq", "rustmq", "--subresource=scale", "--type=merge", "-p", '{"spec":{"replicas":-1}}', check=False
    )
    assert result.returncode != 0
    assert "replicas" in result.stderr


@pytest.mark.parametrize("example", ["rustmq-minimal.yaml", "rustmq-production.yaml"])
def test_example_clusters_are_accepted_by_the_api_server(cluster: Any, namespace: str, crd_installed: None, example: str) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.run("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(ops.example(example, namespace)))


def test_rendered_children_are_accepted_by_the_api_server(cluster: Any, namespace: str, crd_installed: None) -> None:
    """Server-side dry-run apply of every child the operator renders for the production example:
    the real API server's OpenAPI validation, defaulting and admission, nothing persisted."""
    from rustmq_operator import rendering
    from rustmq_operator import spec as specs

    cr = ops.example("rustmq-production.yaml", namespace)
    spec = specs.with_defaults(cr["spec"])
    rendered = rendering.render(
        rendering.Target(
            name="rustmq", namespace=namespace, uid="6c1bbd76-6a86-4a36-9a4f-3f1b7f0c0a01", spec=spec,
            replicas=3, claim_size=spec["storage"]["size"],
        )
    )
    kubectl = ops.Kubectl(cluster, namespace)
    for obj in rendered.objects:
        result = kubectl.run(
            "apply", "--server-side", "--dry-run=server", "--field-manager=rustmq-operator", "-f", "-",
            input=yaml.safe_dump(obj), check=False,
        )
        assert result.returncode == 0, f"{obj['kind']} {obj['metadata']['name']}: {result.stderr}"
