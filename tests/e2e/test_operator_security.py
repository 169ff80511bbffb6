"""The operator's identity, network and TLS children on the real control plane, reconciled by the
real `rustmq-operator` process: the brokers' ServiceAccount/Role/RoleBinding checked with the
API server's own authorizer (`kubectl auth can-i` as the brokers' ServiceAccount), per-broker
load balancers whose addresses land in `<name>-listeners`, the NetworkPolicy, a TLS Secret
whose renewal restarts no broker, and the cert-manager Certificate with and without its CRD
(a trimmed stand-in, since cert-manager itself cannot be installed here)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

import operator_e2e as ops

pytestmark = pytest.mark.slow
crd_installed = ops.crd_installed
operator = ops.operator

CERTIFICATE_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: certificates.cert-manager.io
spec:
  group: cert-manager.io
  scope: Namespaced
  names: {kind: Certificate, listKind: CertificateList, plural: certificates, singular: certificate, shortNames: [cert]}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [secretName, issuerRef]
              properties:
                secretName: {type: string}
                duration: {type: string}
                renewBefore: {type: string}
                dnsNames: {type: array, items: {type: string}}
                ipAddresses: {type: array, items: {type: string}}
                usages: {type: array, items: {type: string}}
                privateKey:
                  type: object
                  properties:
                    algorithm: {type: string}
                    size: {type: integer}
                    rotationPolicy: {type: string}
                issuerRef:
                  type: object
                  required: [name]
                  properties:
                    name: {type: string}
                    kind: {type: string}
                    group: {type: string}
"""


def can(cluster: Any, namespace: str, verb: str, resource: str) -> bool:
    result = cluster.kubectl(
        "auth", "can-i", verb, resource, "-n", namespace,
        f"--as=system:serviceaccount:{namespace}:rustmq-broker", check=False,
    )
    return result.stdout.strip() == "yes"


@pytest.mark.timeout(240)
def test_the_brokers_may_use_exactly_leases_and_configmaps_of_their_namespace(
    cluster: Any, namespace: str, operator: Any
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(ops.cluster_cr(namespace))
    kubectl.wait_condition("Ready", "True", "Reconciled")
    for kind in ("serviceaccount", "role", "rolebinding"):
        assert kubectl.get(kind, "rustmq-broker"), kind
    allowed = [(verb, "leases.coordination.k8s.io") for verb in ("get", "list", "watch", "create", "update")]
    allowed += [(verb, "configmaps") for verb in ("get", "list", "watch", "create", "update", "delete")]
    for verb, resource in allowed:
        assert can(cluster, namespace, verb, resource), (verb, resource)
    denied = [("patch", "configmaps"), ("delete", "leases.coordination.k8s.io"), ("get", "secrets"),
              ("list", "pods"), ("create", "pods"), ("get", "rustmqclusters.rustmq.io"), ("update", "roles")]
    for verb, resource in denied:
        assert not can(cluster, namespace, verb, resource), (verb, resource)
    other = cluster.kubectl(
        "auth", "can-i", "get", "configmaps", "-n", "default",
        f"--as=system:serviceaccount:{namespace}:rustmq-broker", check=False,
    )
    assert other.stdout.strip() == "no"  # namespaced: nothing outside its own namespace
    (pod,) = kubectl.pods()
    assert pod["spec"]["serviceAccountName"] == "rustmq-broker"
    assert pod["spec"]["automountServiceAccountToken"] is True  # cluster mode coordinates through the API
    sa = kubectl.get("serviceaccount", "rustmq-broker") or {}
    assert sa["automountServiceAccountToken"] is False  # only the broker pods, which ask for it
    # Drift: a Role edited by hand is put back.
    kubectl.patch("role", "rustmq-broker", {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]})
    ops.wait_for("the Role restored", lambda: can(cluster, namespace, "create", "leases.coordination.k8s.io") or None, timeout=60)
    assert not can(cluster, namespace, "get", "secrets")


@pytest.mark.timeout(300)
def test_per_broker_load_balancers_fill_the_listeners_config_map(
    cluster: Any, namespace: str, operator: Any, lb_ipam: Any
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    external = {"enabled": True, "labels": {"bgp": "blue"}, "perBroker": {"enabled": True}}
    kubectl.apply(ops.cluster_cr(namespace, replicas=2, services={"external": external}))
    kubectl.wait_condition("Ready", "True", "Reconciled")

    def listeners(count: int) -> dict[str, str] | None:
        found = kubectl.get("configmap", "rustmq-listeners") or {}
        data = dict(found.get("data") or {})
        return data if len(data) == count and all(data.values()) else None

    data = ops.wait_for("two broker addresses", lambda: listeners(2), timeout=60)
    for ordinal in range(2):
        service = kubectl.get("service", f"rustmq-ext-{ordinal}") or {}
        assert service["metadata"]["labels"]["bgp"] == "blue"
        assert service["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == f"rustmq-{ordinal}"
        assert data[f"broker-{ordinal}"] == service["status"]["loadBalancer"]["ingress"][0]["ip"]
    shared = kubectl.get("service", "rustmq-external") or {}
    assert shared["status"]["loadBalancer"]["ingress"][0]["ip"] not in data.values()
    config_hash = kubectl.cluster_status()["configHash"]

    kubectl.run("scale", "rmq/rustmq", "--replicas=3")
    data = ops.wait_for("three broker addresses", lambda: listeners(3), timeout=90)
    assert len(set(data.values())) == 3
    assert kubectl.cluster_status()["configHash"] == config_hash  # addresses restart nothing

    kubectl.patch("rmq", "rustmq", {"spec": {"services": {"external": {"perBroker": {"enabled": False}}}}})
    ops.wait_for("per-broker Services pruned", lambda: None if kubectl.get("service", "rustmq-ext-0") else True, timeout=60)
    empty = ops.wait_for(
        "empty addresses",
        lambda: (lambda d: d if d and not any(d.values()) else None)((kubectl.get("configmap", "rustmq-listeners") or {}).get("data")),
        timeout=60,
    )
    assert sorted(empty) == ["broker-0", "broker-1", "broker-2"]


@pytest.mark.timeout(240)
def test_network_policy_follows_the_spec(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    policy = {"enabled": True, "clients": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "monitoringNamespace": "observability"}
    kubectl.apply(ops.cluster_cr(namespace, networkPolicy=policy))
    kubectl.wait_condition("Ready", "True", "Reconciled")
    found = ops.wait_for("NetworkPolicy", lambda: kubectl.get("networkpolicy", "rustmq"))
    clients, metrics, brokers = found["spec"]["ingress"]
    assert clients["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
    assert brokers["from"][0]["podSelector"]["matchLabels"]["rustmq.io/cluster"] == "rustmq"
    kubectl.patch("rmq", "rustmq", {"spec": {"networkPolicy": {"enabled": False}}})
    ops.wait_for("NetworkPolicy pruned", lambda: None if kubectl.get("networkpolicy", "rustmq") else True, timeout=60)


def tls_secret(namespace: str, generation: int) -> dict[str, Any]:
    def encoded(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "rustmq-tls", "namespace": namespace},
        # kwok runs no container, so the content is never parsed here; the broker side of a
        # renewal is tests/security/test_tls.py. What matters here is what the operator does.
        "data": {"tls.crt": encoded(f"certificate {generation}"), "tls.key": encoded(f"key {generation}"),
                 "ca.crt": encoded(f"ca {generation}")},
    }


@pytest.mark.timeout(240)
def test_a_renewed_tls_secret_restarts_no_broker(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    kubectl.apply(tls_secret(namespace, 1))
    kubectl.apply(ops.cluster_cr(namespace, replicas=2, tls={"enabled": True, "mutual": True}))
    kubectl.wait_condition("Ready", "True", "Reconciled")
    config = kubectl.get("configmap", "rustmq-config") or {}
    assert config["data"]["RUSTMQ_TLS_CERT_FILE"] == "/etc/rustmq/tls/tls.crt"
    assert config["data"]["RUSTMQ_TLS_CLIENT_AUTH"] == "required"
    sts = kubectl.get("statefulset", "rustmq") or {}
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "rustmq-tls"
    before = {pod["metadata"]["name"]: pod["metadata"]["uid"] for pod in kubectl.pods()}
    config_hash = kubectl.cluster_status()["configHash"]

    kubectl.apply(tls_secret(namespace, 2))
    time.sleep(8)  # several passes (2 s while converging, and the Secret is not even watched)
    assert {pod["metadata"]["name"]: pod["metadata"]["uid"] for pod in kubectl.pods()} == before
    assert kubectl.cluster_status()["configHash"] == config_hash
    assert kubectl.condition("Ready")["status"] == "True"
    events = json.loads(kubectl.run("get", "events", "-o", "json").stdout)["items"]
    assert not [e for e in events if e.get("reason") in ("RestartingBroker", "ReplacingBroker")]


@pytest.mark.timeout(240)
def test_cert_manager_certificate_waits_for_its_crd(cluster: Any, namespace: str, operator: Any) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    tls = {"enabled": True, "certManager": {"issuerRef": {"name": "data-pipeline-ca", "kind": "ClusterIssuer"}, "dnsNames": ["rustmq.example.net"]}}
    kubectl.apply(ops.cluster_cr(namespace, tls=tls))
    stalled = kubectl.wait_condition("Stalled", "True", "CertManagerMissing")
    assert "cert-manager" in stalled["message"]
    with ops.installed_crd(cluster, CERTIFICATE_CRD):
        kubectl.wait_condition("Ready", "True", "Reconciled", timeout=120)
        certificate = kubectl.get("certificate", "rustmq") or {}
        assert certificate["spec"]["secretName"] == "rustmq-tls"
        assert certificate["spec"]["issuerRef"] == {"name": "data-pipeline-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert f"*.rustmq-headless.{namespace}.svc" in certificate["spec"]["dnsNames"]
        assert "rustmq.example.net" in certificate["spec"]["dnsNames"]
        kubectl.patch("rmq", "rustmq", {"spec": {"tls": {"certManager": None}}})
        ops.wait_for("Certificate pruned", lambda: None if kubectl.get("certificate", "rustmq") else True, timeout=60)
