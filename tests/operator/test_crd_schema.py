"""The CRD's schema: structural, closed, defaulting a name-only CR to the seed's cluster, and in
agreement with the operator's own defaults. CEL rules need a real API server and are tested in
tests/e2e/test_operator_validation.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rustmq_operator import spec as specs

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for key, sub in schema.get("properties", {}).items():
        found += walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        found += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += walk(schema["additionalProperties"], f"{path}{{}}")
    return found


def test_the_crd_names_group_version_and_short_name(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "rustmqclusters.rustmq.io"
    assert crd["spec"]["group"] == "rustmq.io"
    assert crd["spec"]["names"]["kind"] == "RustMQCluster"
    assert crd["spec"]["names"]["shortNames"] == ["rmq"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]


def test_status_and_scale_subresources_point_at_real_fields(crd: dict[str, Any], cr_schema: dict[str, Any]) -> None:
    (version,) = crd["spec"]["versions"]
    scale = version["subresources"]["scale"]
    assert version["subresources"]["status"] == {}
    assert scale == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    status = cr_schema["properties"]["status"]["properties"]
    assert status["replicas"]["type"] == "integer"
    assert status["selector"]["type"] == "string"


def test_printer_columns_are_the_ones_a_person_expects(crd: dict[str, Any]) -> None:
    (version,) = crd["spec"]["versions"]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Ready", "Desired", "Current", "Partitions", "Reason", "External IP", "Age"]


def test_every_field_is_typed_so_the_schema_is_structural(cr_schema: dict[str, Any]) -> None:
    untyped = [
        path
        for path, node in walk(cr_schema)
        if "type" not in node and not node.get("x-kubernetes-int-or-string")
    ]
    assert untyped == []


def test_only_embedded_kubernetes_types_preserve_unknown_fields(cr_schema: dict[str, Any]) -> None:
    open_fields = sorted(path for path, node in walk(cr_schema) if node.get("x-kubernetes-preserve-unknown-fields"))
    assert open_fields == [
        ".spec.podTemplate.affinity",
        ".spec.podTemplate.env[].valueFrom",
        ".spec.podTemplate.securityContext",
        ".spec.podTemplate.topologySpreadConstraints[]",
    ]


def test_a_cr_with_only_a_name_defaults_to_the_seed_deployment(default_cr: Any) -> None:
    cr = default_cr({"apiVersion": "rustmq.io/v1alpha1", "kind": "RustMQCluster", "metadata": {"name": "rustmq"}})
    spec = cr["spec"]
    assert spec["replicas"] == 1
    assert spec["partitions"] == 12
    assert spec["storage"]["size"] == "10Gi"
    assert spec["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "1000m", "memory": "2Gi"},
    }
    assert spec["ports"] == {"producer": 9092, "consumer": 9093, "metrics": 9094}
    assert spec["storage"]["retentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Drain"}
    assert spec["scaling"] == {"drainTimeoutSeconds": 3600, "handoverTimeoutSeconds": 120}


def test_crd_defaults_and_operator_defaults_agree(default_cr: Any) -> None:
    from_crd = default_cr({"metadata": {"name": "x"}})["spec"]
    assert from_crd == specs.with_defaults({})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("rustmq-*.yaml")), ids=lambda p: p.name)
def test_example_clusters_are_valid(path: Path, validate_cr: Any, default_cr: Any) -> None:
    cr = yaml.safe_load(path.read_text())
    validate_cr(cr)
    validate_cr(default_cr(cr))
    assert specs.problems(specs.with_defaults(cr["spec"])) == []


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"replicaz": 3}, "replicaz"),
        ({"replicas": "three"}, "three"),
        ({"partitions": 0}, "minimum"),
        ({"imagePullPolicy": "Sometimes"}, "Sometimes"),
        ({"storage": {"retentionPolicy": {"whenDeleted": "Shred"}}}, "Shred"),
        ({"services": {"external": {"externalTrafficPolicy": "Nearest"}}}, "Nearest"),
        ({"resources": {"requests": {"cpu": "lots"}}}, "lots"),
        ({"ports": {"producer": 70000}}, "maximum"),
    ],
)
def test_schema_refuses_malformed_specs(spec: dict[str, Any], complaint: str, validate_cr: Any) -> None:
    cr = {"apiVersion": "rustmq.io/v1alpha1", "kind": "RustMQCluster", "metadata": {"name": "x"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError) as refused:
        validate_cr(cr)
    assert complaint in str(refused.value)


def test_every_cel_rule_has_a_human_message(cr_schema: dict[str, Any]) -> None:
    rules = [rule for _, node in walk(cr_schema) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 8
    for rule in rules:
        assert rule.get("message") or rule.get("messageExpression"), rule
