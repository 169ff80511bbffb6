"""Static checks of charts/rustmq-operator that need no helm binary."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rustmq-operator"


def test_chart_crd_is_byte_identical_to_the_canonical_one() -> None:
    canonical = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    shipped = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert shipped == canonical
    for name in canonical:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/rustmq-operator/crds/{name} differs from crds/{name}; copy crds/ into the chart"
        )


@pytest.mark.parametrize(
    "values", [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))], ids=lambda p: p.name
)
def test_values_files_satisfy_the_values_schema(values: Path) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    given = yaml.safe_load(values.read_text()) or {}
    merged = _merge(defaults, given)
    jsonschema.Draft7Validator(schema).validate(merged)


def test_values_schema_refuses_typos_and_bad_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for bad in ({"imagee": {}}, {"image": {"pullPolicy": "Sometimes"}}, {"watchNamespaces": ["Not_A_Namespace"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(schema).validate(_merge(defaults, bad))


def test_every_values_property_is_described() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def undocumented(node: dict, path: str) -> list[str]:
        found = []
        for key, sub in node.get("properties", {}).items():
            if "description" not in sub and "$ref" not in sub:
                found.append(f"{path}.{key}")
            found += undocumented(sub, f"{path}.{key}")
        return found

    assert undocumented(schema, "") == []


def test_dashboard_is_valid_grafana_json_over_broker_and_operator_metrics() -> None:
    dashboard = json.loads((CHART / "dashboards" / "rustmq.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any("rustmq_messages_in_total" in e for e in expressions)
    assert any("rustmq_produce_latency_seconds_bucket" in e for e in expressions)
    assert any("rustmq_operator_cluster_condition" in e for e in expressions)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["type"] == "application"
    assert chart["name"] == "rustmq-operator"
    assert isinstance(chart["appVersion"], str)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
