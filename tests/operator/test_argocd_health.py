"""The ArgoCD health check (examples/argocd/health.lua), run with a real Lua interpreter (lupa)
against statuses the operator writes, including ones computed by rustmq_operator.status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml

from rustmq_operator import planning, status
from rustmq_operator import spec as specs

ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "examples" / "argocd" / "health.lua"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value

    runtime.globals().obj = to_lua(obj)
    result = runtime.execute(HEALTH_LUA.read_text())
    return str(result["status"]), str(result["message"])


def cr(generation: int = 2, annotations: dict[str, str] | None = None, **status_fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "rustmq", "generation": generation, "annotations": annotations or {}},
        "spec": {"replicas": 3},
    }
    if status_fields:
        body["status"] = status_fields
    return body


def cond(kind: str, value: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": kind, "status": value, "reason": reason, "message": message}


def test_no_status_yet_is_progressing() -> None:
    assert health(cr())[0] == "Progressing"


def test_stale_status_is_progressing_even_if_it_said_ready() -> None:
    stale = cr(generation=3, observedGeneration=2, conditions=[cond("Ready", "True", "Reconciled")])
    assert health(stale) == ("Progressing", "Waiting for rustmq-operator to act on the latest spec")


def test_ready_is_healthy() -> None:
    ready = cr(observedGeneration=2, conditions=[cond("Ready", "True", "Reconciled", "3/3 broker(s) Ready")])
    assert health(ready) == ("Healthy", "3/3 broker(s) Ready")


def test_stalled_is_degraded_with_the_reason() -> None:
    stalled = cr(
        observedGeneration=2,
        conditions=[cond("Ready", "False", "InsufficientBrokers"), cond("Stalled", "True", "InsufficientBrokers", "refused")],
    )
    assert health(stalled) == ("Degraded", "InsufficientBrokers: refused")


def test_rolling_update_is_progressing_not_degraded() -> None:
    rolling = cr(
        observedGeneration=2,
        conditions=[
            cond("Ready", "False", "RollingUpdate"),
            cond("Reconciling", "True", "RollingUpdate", "restarting rustmq-2"),
            cond("Stalled", "False", "NotStalled"),
        ],
    )
    assert health(rolling) == ("Progressing", "RollingUpdate: restarting rustmq-2")


def test_paused_is_suspended() -> None:
    paused = cr(annotations={specs.PAUSE_ANNOTATION: "true"}, observedGeneration=2, conditions=[])
    assert health(paused)[0] == "Suspended"


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [("converged", "Healthy"), ("blocked", "Degraded"), ("starting", "Progressing"), ("hibernated", "Suspended")],
)
def test_statuses_computed_by_the_operator_map_to_argocd_health(scenario: str, expected: str) -> None:
    spec = specs.with_defaults({"replicas": 0 if scenario == "hibernated" else 1})
    pods = [] if scenario == "hibernated" else [
        {"metadata": {"name": "rustmq-0", "annotations": {"rustmq.io/config-hash": "h"}},
         "status": {"conditions": [{"type": "Ready", "status": "False" if scenario == "starting" else "True"}]}}
    ]
    stalled = planning.Verdict("DrainTimedOut", "refused") if scenario == "blocked" else None
    computed = status.compute(
        status.Inputs(
            name="rustmq", namespace="ns", generation=2, spec=spec, replicas=spec["replicas"], config_hash="h",
            claim_size="10Gi", last_non_zero=1, observed=planning.Observed(pods=pods), stalled=stalled,
        ),
        None,
        "2026-11-23T10:00:00Z",
    )
    assert health(cr(**computed))[0] == expected


def test_argocd_cm_example_carries_the_same_lua() -> None:
    configmap = yaml.safe_load((ROOT / "examples" / "argocd" / "argocd-cm.yaml").read_text())
    assert configmap["data"]["resource.customizations.health.rustmq.io_RustMQCluster"] == HEALTH_LUA.read_text()


def test_offline_partitions_are_degraded_even_while_converging() -> None:
    offline = cr(
        observedGeneration=2,
        conditions=[
            cond("Ready", "False", "Draining"),
            cond("Reconciling", "True", "Draining", "draining rustmq-2"),
            cond("Degraded", "True", "OfflinePartitions", "4 of 12 partition(s) have no leader"),
        ],
    )
    assert health(offline) == ("Degraded", "OfflinePartitions: 4 of 12 partition(s) have no leader")


def test_under_replicated_is_degraded_only_when_nothing_is_in_progress() -> None:
    lagging = cond("Degraded", "True", "UnderReplicated", "2 of 12 partition(s) ...")
    settled = cr(observedGeneration=2, conditions=[cond("Ready", "True", "Reconciled"), lagging])
    assert health(settled)[0] == "Degraded"
    rolling = cr(observedGeneration=2, conditions=[
        cond("Ready", "False", "RollingUpdate"), cond("Reconciling", "True", "RollingUpdate", "restarted rustmq-2"), lagging,
    ])
    assert health(rolling)[0] == "Progressing"


def test_a_degraded_status_computed_by_the_operator_is_degraded_in_argocd() -> None:
    import datetime
    import json

    from rustmq_operator import health as healths

    spec = specs.with_defaults({"replicas": 3})
    pods = [
        {"metadata": {"name": f"rustmq-{i}", "annotations": {"rustmq.io/config-hash": "h"}},
         "status": {"conditions": [{"type": "Ready", "status": "True" if i == 0 else "False"}]}}
        for i in range(3)
    ]
    now = "2026-11-23T10:00:00Z"
    report = healths.parse_health(
        {"data": {"health": json.dumps({"updatedAt": now, "partitions": 12, "offline": 8, "underReplicated": 12})}},
        datetime.datetime(2026, 11, 23, 10, 0, 5, tzinfo=datetime.UTC),
        18.0,
    )
    computed = status.compute(
        status.Inputs(
            name="rustmq", namespace="ns", generation=2, spec=spec, replicas=3, config_hash="h",
            claim_size="10Gi", last_non_zero=3, observed=planning.Observed(pods=pods), report=report,
        ),
        None,
        now,
    )
    assert health(cr(**computed)) == ("Degraded", "OfflinePartitions: 8 of 12 partition(s) have no leader: no broker serves them")
