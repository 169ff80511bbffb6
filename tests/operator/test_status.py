"""Status computation: kstatus conditions, endpoints, and no write when nothing changed."""

from __future__ import annotations

import datetime
import json
from typing import Any

from rustmq_operator import health, naming, planning, status
from rustmq_operator import spec as specs

NOW = "2026-11-23T10:00:00Z"
LATER = "2026-11-23T10:05:00Z"


def pod(ordinal: int, ready: bool = True, config_hash: str = "h1") -> dict[str, Any]:
    return {
        "metadata": {"name": f"rustmq-{ordinal}", "annotations": {naming.CONFIG_HASH_ANNOTATION: config_hash}},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def report(**fields: Any) -> health.Report:
    """A health report written at NOW, read at NOW (fresh unless ``age_s`` says otherwise)."""
    age = float(fields.pop("age_s", 0))
    body = {
        "updatedAt": NOW,
        "observedMembershipGeneration": 1,
        "partitions": 12,
        "offline": 0,
        "underReplicated": 0,
        "brokers": {"0": {"alive": True, "replicas": 12, "leaders": 12, "inSyncReplicas": 12, "bytes": 0}},
        **fields,
    }
    read_at = datetime.datetime.fromisoformat(NOW.replace("Z", "+00:00")) + datetime.timedelta(seconds=age)
    return health.parse_health({"data": {"health": json.dumps(body)}}, read_at, 18.0)


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
        "report": report(),
    }
    values.update(overrides)
    return status.Inputs(**values)


def conditions(computed: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in computed["conditions"]}


def test_a_converged_cluster_is_ready() -> None:
    computed = status.compute(inputs(), None, NOW)
    assert conditions(computed) == {
        "Ready": ("True", "Reconciled"),
        "Available": ("True", "AllPartitionsLed"),
        "Degraded": ("False", "AllInSync"),
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
    # Available follows the data, not the pods: the (fresh) report says every partition is led.
    assert found["Available"] == ("True", "AllPartitionsLed")


def test_outdated_pods_mean_rolling() -> None:
    observed = planning.Observed(pods=[pod(0, config_hash="old")], service_monitor_crd=True)
    found = conditions(status.compute(inputs(observed=observed), None, NOW))
    assert found["Ready"] == ("False", "RollingUpdate")
    assert found["Available"] == ("True", "AllPartitionsLed")


def test_stalled_wins_and_names_its_reason() -> None:
    verdict = planning.Verdict("DrainTimedOut", "the drain of rustmq-2 has not finished")
    found = conditions(status.compute(inputs(stalled=verdict), None, NOW))
    assert found["Stalled"] == ("True", "DrainTimedOut")
    assert found["Ready"] == ("False", "DrainTimedOut")


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


# -- data truth from the health report (issue 14) ----------------------------------------------


def test_offline_partitions_make_the_cluster_unavailable_and_degraded() -> None:
    computed = status.compute(inputs(report=report(offline=8, underReplicated=8)), None, NOW)
    found = conditions(computed)
    assert found["Available"] == ("False", "OfflinePartitions")
    assert found["Degraded"] == ("True", "OfflinePartitions")
    assert (computed["partitions"], computed["offlinePartitions"], computed["underReplicatedPartitions"]) == (12, 8, 8)
    # Ready says whether the operator converged, which it did: the data problem is Degraded's.
    assert found["Ready"] == ("True", "Reconciled")


def test_under_replicated_partitions_are_degraded_but_available() -> None:
    found = conditions(status.compute(inputs(report=report(underReplicated=3, underMinIsr=1)), None, NOW))
    assert found["Available"] == ("True", "AllPartitionsLed")
    assert found["Degraded"] == ("True", "UnderReplicated")


def test_without_a_report_nothing_is_claimed_about_the_data() -> None:
    absent = health.Report(None, "no health report from the brokers' controller yet")
    computed = status.compute(inputs(report=absent), None, NOW)
    found = conditions(computed)
    assert found["Available"] == ("False", "NoHealthReport")
    assert found["Degraded"] == ("Unknown", "HealthUnknown")
    assert "partitions" not in computed and "offlinePartitions" not in computed


def test_a_stale_report_is_not_believed() -> None:
    stale = report(age_s=60)
    assert stale.health is not None and stale.fresh is None
    found = conditions(status.compute(inputs(report=stale), None, NOW))
    assert found["Available"] == ("False", "HealthReportStale")
    assert found["Degraded"] == ("Unknown", "HealthUnknown")


def test_an_unparsable_report_counts_as_absent() -> None:
    for text in ("{", "[]", '{"updatedAt": "2026-11-23T10:00:00Z", "offline": -1}', '{"partitions": 3}'):
        parsed = health.parse_health({"data": {"health": text}}, datetime.datetime.now(datetime.UTC), 18.0)
        assert parsed.health is None and parsed.problem is not None and "does not parse" in parsed.problem


def test_the_drain_and_the_members_are_reported() -> None:
    drain = {"broker": 2, "phase": "Draining", "partitionsLeft": 4, "bytesLeft": 1024, "startedAt": NOW}
    computed = status.compute(inputs(drain=drain, members=(0, 1)), None, NOW)
    assert computed["drain"] == drain
    assert computed["members"] == "0,1"
    assert "drain" not in status.compute(inputs(), None, NOW)


def test_a_stale_report_does_not_rewrite_the_status_on_every_pass() -> None:
    first = status.compute(inputs(report=report(age_s=60)), None, NOW)
    again = status.compute(inputs(report=report(age_s=90)), first, LATER)
    assert status.merge_patch(first, again) == {}


def test_status_reports_leadership_balance_from_the_report() -> None:
    brokers = {"0": {"alive": True, "replicas": 8, "leaders": 6, "inSyncReplicas": 8, "bytes": 0},
               "1": {"alive": True, "replicas": 8, "leaders": 4, "inSyncReplicas": 8, "bytes": 0},
               "2": {"alive": True, "replicas": 8, "leaders": 2, "inSyncReplicas": 8, "bytes": 0},
               "3": {"alive": False, "replicas": 0, "leaders": 0, "inSyncReplicas": 0, "bytes": 0}}
    computed = status.compute(inputs(report=report(brokers=brokers, leaderSkew=4, topicLeaderSkew=3,
                                                   leadersNotPreferred=2)), None, NOW)
    assert computed["leadership"] == {"perBroker": "0=6,1=4,2=2", "skew": 4, "topicSkew": 3, "notPreferred": 2}
    # An older broker's report has no balance figures: zeros, not a refusal to read it.
    older = status.compute(inputs(report=report()), None, NOW)
    assert older["leadership"] == {"perBroker": "0=12", "skew": 0, "topicSkew": 0, "notPreferred": 0}
    bad = report(leaderSkew=-1)
    assert bad.health is None and "leaderSkew" in (bad.problem or "")
