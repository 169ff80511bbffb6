"""Shared fixtures of the operator's unit tests: the CRD, its schema as a JSON Schema validator,
structural defaulting the way the API server does it, and a renderer for sample CRs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rustmq_operator import rendering
from rustmq_operator import spec as specs

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "rustmq.io_rustmqclusters.yaml"


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="session")
def cr_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def apply_schema_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a ``default``
    gets it, then defaulting recurses into objects and array items."""
    if isinstance(value, dict):
        result = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in result and "default" in sub:
                result[key] = copy.deepcopy(sub["default"])
            if key in result:
                result[key] = apply_schema_defaults(sub, result[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(result) - set(schema.get("properties", {})):
                result[key] = apply_schema_defaults(extra, result[key])
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_schema_defaults(schema["items"], item) for item in value]
    return value


@pytest.fixture(scope="session")
def default_cr(cr_schema: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def defaulted(cr: dict[str, Any]) -> dict[str, Any]:
        return apply_schema_defaults(cr_schema, cr)

    return defaulted


@pytest.fixture(scope="session")
def validate_cr(cr_schema: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Validate a CR against the CRD's OpenAPI schema (everything but the CEL rules) with
    unknown fields refused, as ``kubectl apply`` (strict field validation) does."""
    closed = _close(copy.deepcopy(cr_schema))
    closed["properties"]["metadata"] = {"type": "object"}
    validator = jsonschema.Draft7Validator(closed)

    def validate(cr: dict[str, Any]) -> None:
        validator.validate(cr)

    return validate


def _close(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return schema
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    for sub in schema.get("properties", {}).values():
        _close(sub)
    if isinstance(schema.get("items"), dict):
        _close(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        _close(schema["additionalProperties"])
    return schema


@pytest.fixture(scope="session")
def render_cr() -> Callable[..., rendering.Rendered]:
    def render(cr: dict[str, Any], **decisions: Any) -> rendering.Rendered:
        spec = specs.with_defaults(cr.get("spec"))
        target = rendering.Target(
            name=cr["metadata"]["name"],
            namespace=cr["metadata"].get("namespace", "default"),
            uid=cr["metadata"].get("uid", "00000000-0000-4000-8000-000000000000"),
            spec=spec,
            replicas=decisions.pop("replicas", spec["replicas"]),
            claim_size=decisions.pop("claim_size", spec["storage"]["size"]),
            service_monitor=decisions.pop("service_monitor", True),
            prometheus_rule=decisions.pop("prometheus_rule", spec["monitoring"]["prometheusRule"]["enabled"]),
            listener_hosts=decisions.pop("listener_hosts", {}),
            cluster_mode=decisions.pop("cluster_mode", rendering.CLUSTER_MODE),
            certificate=decisions.pop("certificate", False),
        )
        assert not decisions, f"unknown decisions {decisions}"
        return rendering.render(target)

    return render
