"""Status computation: kstatus conditions, endpoints, and no write when nothing changed."""

from __future__ import annotations

from typing import Any

from rustmq_operator import naming, planning, status
from rustmq_operator import spec as specs

NOW = "2026-11-23T10:00:00Z"
LATER = "2026-11-23T10:05:00Z"


def pod(ordinal: int, ready: bool = True, config_hash: str = "h1") -> dict[str, Any]:
    return {
        "metadata": {"name": f"rustmq-{ordinal}", "annotations": {naming.CONFIG_HASH_ANNOTATION: config_hash}},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def inputs(**overrides: Any) -> status.Inputs:
    spec = specs.with_defaults(overrides.pop("spec", {}))
    values: dict[str, Any] = {
        "name": "rustmq",
        "namespace": "data-pipeline",
        "generation": 2,
        "spec": spec,
        "replicas": spec["replicas"],
        "config_hash": "h1",
        "claim_size": "10Gi",
        "last_non_zero": spec["replicas"] or None,
        "observed": planning.Observed(pods=[pod(i) for i in range(spec["replicas"])], service_monitor_crd=True),
    }
    values.update(overrides)
    return status.Inputs(**values)


def conditions(computed: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in computed["conditions"]}


def test_a_converged_cluster_is_ready() -> None:
    computed = status.compute(inputs(), None, NOW)
    assert conditions(computed) == {
        "Ready": ("True", "Reconciled"),
        "Available": ("True", "BrokersReady"),
        "Reconciling": ("False", "Reconciled"),
        "Stalled": ("False", "NotStalled"),
        "MonitoringReady": ("True", "ServiceMonitorApplied"),
        "Paused": ("False", "NotPaused"),
    }
    assert computed["observedGeneration"] == 2
    assert (computed["replicas"], computed["readyReplicas"], computed["updatedReplicas"]) == (1, 1, 1)
    assert computed["selector"] == "app.kubernetes.io/component=broker,app.kubernetes.io/name=rustmq,rustmq.io/cluster=rustmq"
    assert computed["endpoints"] == {
        "headless": "rustmq-headless.data-pipeline.svc",
        "producer": "rustmq.data-pipeline.svc:9092",
        "consumer": "rustmq.data-pipeline.svc:9093",
        "metrics": "rustmq-metrics.data-pipeline.svc:9094",
        "brokers": ["rustmq-0.rustmq-headless.data-pipeline.svc:9092"],
    }


def test_pods_not_ready_mean_reconciling() -> None:
    observed = planning.Observed(pods=[pod(0, ready=False)], service_monitor_crd=True)
    computed = status.compute(inputs(observed=observed), None, NOW)
    found = conditions(computed)
    assert found["Ready"] == ("False", "WaitingForBrokers")
    assert found["Reconciling"] == ("True", "WaitingForBrokers")
    assert found["Available"] == ("False", "NoBrokerReady")


def test_outdated_pods_mean_rolling() -> None:
    observed = planning.Observed(pods=[pod(0, config_hash="old")], service_monitor_crd=True)
    found = conditions(status.compute(inputs(observed=observed), None, NOW))
    assert found["Ready"] == ("False", "RollingUpdate")
    assert found["Available"] == ("True", "BrokersReady")


def test_stalled_wins_and_names_its_reason() -> None:
    verdict = planning.Verdict("ScaleDownBlocked", "scale-down from 3 to 1 refused")
    found = conditions(status.compute(inputs(stalled=verdict), None, NOW))
    assert found["Stalled"] == ("True", "ScaleDownBlocked")
    assert found["Ready"] == ("False", "ScaleDownBlocked")


def test_missing_servicemonitor_crd_does_not_make_the_cluster_unready() -> None:
    verdict = planning.Verdict("ServiceMonitorCRDMissing", "not installed")
    found = conditions(status.compute(inputs(monitoring=verdict), None, NOW))
    assert found["MonitoringReady"] == ("False", "ServiceMonitorCRDMissing")
    assert found["Ready"] == ("True", "Reconciled")


def test_hibernated_cluster_is_ready_but_not_available() -> None:
    computed = status.compute(
        inputs(spec={"replicas": 0}, last_non_zero=3, observed=planning.Observed()), None, NOW
    )
    found = conditions(computed)
    assert found["Ready"] == ("True", "Hibernated")
    assert found["Available"] == ("False", "Hibernated")
    assert computed["lastNonZeroReplicas"] == 3


def test_paused_cluster_says_so() -> None:
    found = conditions(status.compute(inputs(paused=True), None, NOW))
    assert found["Paused"] == ("True", "PausedByAnnotation")
    assert found["Ready"] == ("False", "Paused")
    assert found["Reconciling"][0] == "False"


def test_external_address_is_reported_once_assigned() -> None:
    service = {
        "spec": {"ports": [{"port": 9093}, {"port": 9092}, {"port": 9094}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "10.0.50.10"}]}},
    }
    observed = planning.Observed(pods=[pod(0)], external_service=service)
    computed = status.compute(inputs(spec={"services": {"external": {"enabled": True}}}, observed=observed), None, NOW)
    assert computed["endpoints"]["external"] == {"ip": "10.0.50.10", "ports": [9092, 9093, 9094]}
    pending = planning.Observed(pods=[pod(0)], external_service={"spec": {}, "status": {}})
    computed = status.compute(inputs(spec={"services": {"external": {"enabled": True}}}, observed=pending), None, NOW)
    assert "external" not in computed["endpoints"]


def test_unchanged_state_gives_an_identical_status_and_an_empty_patch() -> None:
    first = status.compute(inputs(), None, NOW)
    second = status.compute(inputs(), first, LATER)
    assert second == first
    assert status.merge_patch(first, second) == {}


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    first = status.compute(inputs(), None, NOW)
    observed = planning.Observed(pods=[pod(0, ready=False)], service_monitor_crd=True)
    second = status.compute(inputs(observed=observed), first, LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Ready"] == LATER
    assert times["Stalled"] == NOW


def test_merge_patch_removes_vanished_fields() -> None:
    old = {"a": 1, "endpoints": {"external": {"ip": "1.2.3.4"}, "headless": "h"}}
    new = {"a": 1, "endpoints": {"headless": "h"}}
    assert status.merge_patch(old, new) == {"endpoints": {"external": None}}
