"""The operator's decisions (scale, storage, roll) as pure functions of spec and observed state."""

from __future__ import annotations

import datetime
from typing import Any

from rustmq_operator import health, naming, planning
from rustmq_operator import spec as specs


def pod(ordinal: int, *, ready: bool = True, config_hash: str = "h1", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": naming.pod("rustmq", ordinal),
        "annotations": {naming.CONFIG_HASH_ANNOTATION: config_hash},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def statefulset(replicas: int, size: str = "10Gi", settled: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": "rustmq", "uid": "sts-uid", "generation": 4},
        "spec": {
            "replicas": replicas,
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": size}}}}],
        },
        "status": {"observedGeneration": 4 if settled else 3},
    }


def claim(ordinal: int, size: str) -> dict[str, Any]:
    return {"metadata": {"name": naming.claim("rustmq", ordinal)}, "spec": {"resources": {"requests": {"storage": size}}}}


# -- scaling (the drain state machine has its own tests in test_draining.py) ---------------

NOW = datetime.datetime(2026, 12, 6, 7, 0, 0, tzinfo=datetime.UTC)
NO_REPORT = health.Report(None, "no health report from the brokers' controller yet")


def scale(desired: int, observed: planning.Observed, last_non_zero: int | None) -> planning.ScalePlan:
    spec = specs.with_defaults({"replicas": desired})
    return planning.plan_scale(
        "rustmq", spec, observed, last_non_zero, report=NO_REPORT, membership=None, previous_drain=None, now=NOW
    )


def test_first_creation_uses_the_spec() -> None:
    plan = scale(3, planning.Observed(), None)
    assert plan.replicas == 3 and plan.stalled is None and plan.members is None


def test_scale_up_is_not_gated_on_health() -> None:
    observed = planning.Observed(statefulset=statefulset(1), pods=[pod(0, ready=False)])
    plan = scale(3, observed, 1)
    assert plan.replicas == 3
    assert plan.stalled is None
    assert plan.progressing is not None and plan.progressing.reason == "ScalingUp"
    assert [e.reason for e in plan.events] == ["ScalingUp"]
    assert plan.members is None  # no broker was ever Ready: nothing to tell the controller yet


def test_zero_hibernates_and_remembers_the_size() -> None:
    observed = planning.Observed(statefulset=statefulset(3), pods=[pod(0), pod(1), pod(2)])
    plan = scale(0, observed, 3)
    assert plan.replicas == 0 and plan.stalled is None and plan.last_non_zero == 3
    assert [e.reason for e in plan.events] == ["Hibernating"]
    assert plan.drain is None


def test_waking_up_smaller_than_before_brings_every_broker_back_first() -> None:
    """The hibernated brokers' volumes hold data: all of them start, then the drain shrinks."""
    observed = planning.Observed(statefulset=statefulset(0))
    woken = scale(1, observed, 3)
    assert woken.replicas == 3 and woken.stalled is None and woken.last_non_zero == 3
    assert scale(3, observed, 3).replicas == 3
    assert scale(5, observed, 3).replicas == 5


def test_a_missing_statefulset_with_running_pods_counts_as_their_size() -> None:
    """While the set is re-created for a resize, its orphaned pods still define the size; a
    smaller spec is then a drain, never an immediate shrink."""
    observed = planning.Observed(pods=[pod(0), pod(1), pod(2)])
    assert scale(1, observed, None).replicas == 3


def test_a_statefulset_shrunk_by_hand_grows_back() -> None:
    observed = planning.Observed(statefulset=statefulset(1), pods=[pod(0)])
    plan = scale(3, observed, 3)
    assert plan.replicas == 3 and plan.stalled is None
    assert [e.reason for e in plan.events][:1] == ["StatefulSetResized"]


def test_a_statefulset_grown_by_hand_is_drained_back_not_shrunk() -> None:
    observed = planning.Observed(statefulset=statefulset(4), pods=[pod(0), pod(1), pod(2), pod(3)])
    plan = scale(1, observed, 1)
    assert plan.replicas == 4  # brokers 1..3 may hold data: they are drained first
    assert plan.last_non_zero == 4
    assert plan.drain is not None and plan.drain["broker"] == 3
    assert [e.reason for e in plan.events][:1] == ["StatefulSetResized"]


def test_a_statefulset_emptied_by_hand_comes_back() -> None:
    plan = scale(3, planning.Observed(statefulset=statefulset(0)), 3)
    assert plan.replicas == 3 and plan.stalled is None


# -- storage -------------------------------------------------------------------------------


def test_nothing_to_do_when_sizes_match() -> None:
    observed = planning.Observed(statefulset=statefulset(1), claims=[claim(0, "10Gi")])
    plan = planning.plan_storage("10Gi", observed)
    assert plan == planning.StoragePlan(claim_size="10Gi")


def test_growth_expands_claims_and_recreates_the_set() -> None:
    observed = planning.Observed(
        statefulset=statefulset(2), claims=[claim(0, "10Gi"), claim(1, "10Gi")], storage_expandable=True
    )
    plan = planning.plan_storage("20Gi", observed)
    assert plan.expand_claims == ("data-rustmq-0", "data-rustmq-1")
    assert plan.recreate_statefulset and plan.claim_size == "20Gi"
    assert plan.progressing is not None and plan.progressing.reason == "ResizingStorage"


def test_an_interrupted_resize_finishes_from_the_claims() -> None:
    """The set was already re-created with 20Gi but one claim was never patched (crash)."""
    observed = planning.Observed(
        statefulset=statefulset(2, size="20Gi"),
        claims=[claim(0, "20Gi"), claim(1, "10Gi")],
        storage_expandable=True,
    )
    plan = planning.plan_storage("20Gi", observed)
    assert plan.expand_claims == ("data-rustmq-1",) and not plan.recreate_statefulset


def test_unexpandable_class_stalls_and_keeps_the_template() -> None:
    observed = planning.Observed(
        statefulset=statefulset(1), claims=[claim(0, "10Gi")], storage_expandable=False, storage_class="standard"
    )
    plan = planning.plan_storage("20Gi", observed)
    assert plan.claim_size == "10Gi" and not plan.expand_claims and not plan.recreate_statefulset
    assert plan.stalled is not None and plan.stalled.reason == "StorageExpansionUnsupported"
    assert "standard" in plan.stalled.message


def test_quantities_compare_by_value() -> None:
    observed = planning.Observed(statefulset=statefulset(1, size="10240Mi"), claims=[claim(0, "10Gi")])
    assert planning.plan_storage("10Gi", observed) == planning.StoragePlan(claim_size="10Gi")


# -- rolling -------------------------------------------------------------------------------


def test_up_to_date_cluster_does_not_roll() -> None:
    observed = planning.Observed(statefulset=statefulset(3), pods=[pod(0), pod(1), pod(2)])
    assert planning.plan_roll("rustmq", 3, "h1", observed, True) == planning.RollPlan()


def test_roll_evicts_one_highest_ordinal_broker_when_all_are_ready() -> None:
    observed = planning.Observed(statefulset=statefulset(3), pods=[pod(0), pod(1), pod(2)])
    plan = planning.plan_roll("rustmq", 3, "h2", observed, True)
    assert plan.evict == "rustmq-2" and plan.delete is None


def test_roll_waits_while_another_broker_is_down() -> None:
    observed = planning.Observed(statefulset=statefulset(3), pods=[pod(0), pod(1, config_hash="h2", ready=False), pod(2)])
    plan = planning.plan_roll("rustmq", 3, "h2", observed, True)
    assert plan.evict is None and plan.delete is None
    assert plan.progressing is not None and plan.progressing.reason == "RollingUpdate"


def test_roll_waits_while_a_restarted_pod_is_terminating_or_missing() -> None:
    terminating = planning.Observed(statefulset=statefulset(3), pods=[pod(0), pod(1), pod(2, config_hash="h2", deleting=True)])
    assert planning.plan_roll("rustmq", 3, "h2", terminating, True).evict is None
    missing = planning.Observed(statefulset=statefulset(3), pods=[pod(0), pod(1)])
    assert planning.plan_roll("rustmq", 3, "h2", missing, True).evict is None


def test_roll_waits_until_the_statefulset_controller_saw_the_new_template() -> None:
    observed = planning.Observed(statefulset=statefulset(3, settled=False), pods=[pod(0), pod(1), pod(2)])
    assert planning.plan_roll("rustmq", 3, "h2", observed, True).evict is None


def test_a_broken_broker_on_an_old_revision_is_replaced_at_once() -> None:
    observed = planning.Observed(statefulset=statefulset(3), pods=[pod(0, config_hash="h2"), pod(1, ready=False), pod(2, config_hash="h2")])
    plan = planning.plan_roll("rustmq", 3, "h2", observed, True)
    assert plan.delete == "rustmq-1" and plan.evict is None
    assert [e.type for e in plan.events] == ["Warning"]


def test_a_hibernated_cluster_never_rolls() -> None:
    assert planning.plan_roll("rustmq", 0, "h2", planning.Observed(statefulset=statefulset(0)), True) == planning.RollPlan()


def test_a_broker_that_cannot_pull_its_image_stalls_the_cluster() -> None:
    broken = pod(2, ready=False, config_hash="h2")
    broken["status"]["containerStatuses"] = [
        {"name": "broker", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "rustmq:nope not found"}}}
    ]
    verdict = planning.failing_brokers([pod(0), pod(1), broken], "rustmq", 3)
    assert verdict is not None and verdict.reason == "BrokerFailing"
    assert "rustmq-2: ImagePullBackOff (rustmq:nope not found)" in verdict.message


def test_a_starting_broker_is_not_failing() -> None:
    starting = pod(0, ready=False)
    starting["status"]["containerStatuses"] = [{"name": "broker", "state": {"waiting": {"reason": "ContainerCreating"}}}]
    assert planning.failing_brokers([starting], "rustmq", 1) is None


def test_listener_hosts_come_from_the_per_broker_services_status() -> None:
    def service(name: str, *ingress: dict[str, str]) -> dict[str, object]:
        return {"metadata": {"name": name}, "status": {"loadBalancer": {"ingress": list(ingress)}}}

    services = [
        service("rmq-ext-0", {"ip": "10.0.50.11"}),
        service("rmq-ext-1"),  # not assigned yet
        service("rmq-ext-2", {"hostname": "b2.lb.example"}),
        service("rmq-external", {"ip": "10.0.50.10"}),  # the shared one, not a broker's
        service("rmq-ext-x", {"ip": "10.0.50.12"}),
        service("other-ext-3", {"ip": "10.0.50.13"}),
    ]
    assert planning.listener_hosts("rmq", services) == {0: "10.0.50.11", 2: "b2.lb.example"}


def test_a_cert_manager_certificate_without_cert_manager_is_stalled() -> None:
    from rustmq_operator import reconciler
    from rustmq_operator import spec as specs

    wanted = specs.with_defaults({"tls": {"enabled": True, "certManager": {"issuerRef": {"name": "ca"}}}})
    verdict = reconciler.certificate_verdict(wanted, planning.Observed(certificate_crd=False))
    assert verdict is not None and verdict.reason == "CertManagerMissing"
    assert reconciler.certificate_verdict(wanted, planning.Observed(certificate_crd=True)) is None
    own_secret = specs.with_defaults({"tls": {"enabled": True}})
    assert reconciler.certificate_verdict(own_secret, planning.Observed()) is None
