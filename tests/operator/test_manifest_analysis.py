"""checkov, a static analyser of Kubernetes manifests, over every child the operator renders:
the seed's cluster, a name-only one, the production example and one with every optional child
(per-broker load balancers, cluster mode, mutual TLS with a cert-manager Certificate,
NetworkPolicy, monitoring). A finding fails the test
unless ACCEPTED below says why it is right for RustMQ, and for which renderings."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from manifest_analysis import checkov, unexplained
from rustmq_operator import rendering
from rustmq_operator import spec as specs

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def _everything() -> dict[str, Any]:
    cr = _example("rustmq-production.yaml")
    cr["spec"]["services"]["external"]["perBroker"] = {"enabled": True}
    cr["spec"]["tls"] = {"enabled": True, "mutual": True, "certManager": {"issuerRef": {"name": "ca"}}}
    cr["spec"]["auth"] = {"enabled": True}
    return cr


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "name-only": ({"metadata": {"name": "rustmq"}}, {}),
    "seed-minimal": (_example("rustmq-minimal.yaml"), {}),
    "production": (_example("rustmq-production.yaml"), {}),
    "everything": (_everything(), {"cluster_mode": True, "listener_hosts": {0: "10.0.50.11"}, "certificate": True}),
}


def _spec(case: str) -> dict[str, Any]:
    return specs.with_defaults(CASES[case][0].get("spec"))


ACCEPTED: dict[str, Callable[[str], bool]] = {
    # CKV_K8S_43 "image should use a digest": the image is the user's spec.image, which takes a
    # digest (repo@sha256:...) as well as a tag; the operator cannot turn a tag into a digest
    # without asking the registry.
    "CKV_K8S_43": lambda case: "@sha256:" not in _spec(case)["image"],
    # CKV_K8S_15 "pull policy should be Always": IfNotPresent is the default so that a broker
    # restarts on its node while the registry is down; spec.imagePullPolicy: Always is there
    # for mutable tags.
    "CKV_K8S_15": lambda case: _spec(case)["imagePullPolicy"] != "Always",
    # CKV_K8S_38 "service account tokens only where necessary": the token is mounted only in
    # cluster mode, where the broker coordinates through the API server, with a Role limited
    # to leases and configmaps in its namespace.
    "CKV_K8S_38": lambda case: bool(CASES[case][1].get("cluster_mode", rendering.CLUSTER_MODE)),
    # CKV2_K8S_6 "pods without a NetworkPolicy": spec.networkPolicy is off by default, since
    # turning it on changes who can reach a running cluster; where it is on, this must not fire.
    "CKV2_K8S_6": lambda case: not _spec(case)["networkPolicy"]["enabled"],
}


def test_every_rendered_child_passes_checkov_or_has_an_accepted_finding(tmp_path: Path) -> None:
    manifests = {}
    for case, (cr, decisions) in CASES.items():
        cr = copy.deepcopy(cr)
        spec = specs.with_defaults(cr.get("spec"))
        target = rendering.Target(
            # checkov's graph checks match NetworkPolicies to pods by labels across every file
            # and namespace of a run: one cluster name (so labels) per case.
            name=case,
            namespace=case,
            uid="00000000-0000-4000-8000-000000000000",
            spec=spec,
            replicas=spec["replicas"],
            claim_size=spec["storage"]["size"],
            service_monitor=True,
            prometheus_rule=True,
            **decisions,
        )
        manifests[case] = rendering.render(target).objects
    findings = checkov(manifests, tmp_path / "manifests")
    assert unexplained(findings, ACCEPTED) == {}
    # The acceptance table stays honest: every entry still matches something checkov reports.
    reported = {check for found in findings.values() for check, _ in found}
    assert set(ACCEPTED) <= reported, f"accepted but no longer reported: {set(ACCEPTED) - reported}"
