"""Spec defaults, quantities and the operator's own validation."""

from __future__ import annotations

import decimal

import pytest

from rustmq_operator import spec as specs


@pytest.mark.parametrize(
    ("text", "value"),
    [("10Gi", 10 * 2**30), ("500m", decimal.Decimal("0.5")), ("1", 1), (3, 3), ("1.5G", 1_500_000_000), ("1e3", 1000)],
)
def test_quantities_parse_like_kubernetes(text: str | int, value: decimal.Decimal | int) -> None:
    assert specs.parse_quantity(text) == value


def test_a_bad_quantity_is_a_clear_error() -> None:
    with pytest.raises(specs.InvalidQuantityError, match="not a quantity"):
        specs.parse_quantity("ten gigs")


def test_user_values_win_over_defaults_and_lists_replace() -> None:
    merged = specs.with_defaults({"replicas": 3, "services": {"external": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}}})
    assert merged["replicas"] == 3
    assert merged["services"]["external"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert merged["services"]["external"]["type"] == "LoadBalancer"
    assert merged["partitions"] == 12


def test_problems_repeat_the_cel_rules_for_old_objects() -> None:
    spec = specs.with_defaults({"ports": {"producer": 9092, "consumer": 9092}, "tls": {"enabled": True}})
    found = specs.problems(spec)
    assert any("ports must be distinct" in p for p in found)
    assert not any("tls" in p for p in found)  # TLS is served now
    assert specs.problems(specs.with_defaults({})) == []
    (alone,) = specs.problems(specs.with_defaults({"tls": {"admin": True}}))
    assert alone.startswith("tls.admin needs tls.enabled")
    assert specs.problems(specs.with_defaults({"tls": {"enabled": True, "admin": True}})) == []


def test_pause_annotation() -> None:
    assert specs.is_paused({"annotations": {specs.PAUSE_ANNOTATION: "true"}})
    assert not specs.is_paused({"annotations": {specs.PAUSE_ANNOTATION: "false"}})
    assert not specs.is_paused({})


def test_per_broker_services_need_an_external_load_balancer() -> None:
    wanted = {"perBroker": {"enabled": True}}
    for external in ({**wanted, "enabled": False}, {**wanted, "enabled": True, "type": "NodePort"}):
        (problem,) = specs.problems(specs.with_defaults({"services": {"external": external}}))
        assert "perBroker needs services.external.enabled with type LoadBalancer" in problem
    assert specs.problems(specs.with_defaults({"services": {"external": {**wanted, "enabled": True}}})) == []
