"""The alerting rules the operator renders, run by the real promtool (Debian's prometheus package,
tools/controlplane/fetch-prometheus): `promtool check rules` parses them as Prometheus loads
them, and `promtool test rules` evaluates them over synthetic series, each alert once with a
history that must fire it and with histories that must not (too short, another namespace or
cluster, healthy).

The series carry the labels a scrape through the operator's ServiceMonitor gets from the
Prometheus Operator (job = the selected Service's name, namespace, pod, ...): the job and
namespace below are taken from the rendered ServiceMonitor and metrics Service, so an alert whose
selector does not match what the ServiceMonitor produces fails here. The real-pod tier
(tests/e2e/realpod/test_monitoring.py) loads the same rules into a real Prometheus scraping real
brokers. The chart has no rules of its own (it grants the operator RBAC on PrometheusRules only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

import prometheus_support as prom
from rustmq_operator import rendering

from .test_rendering import CASES


def rendered_monitoring(render_cr: Callable[..., rendering.Rendered]) -> tuple[dict[str, Any], str, str, int]:
    """The production example's PrometheusRule, and the job and namespace its scrapes carry."""
    cr = CASES["production"]
    rendered = render_cr(cr)
    (rule,) = rendered.by_kind("PrometheusRule")
    (monitor,) = rendered.by_kind("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [s for s in rendered.by_kind("Service") if selector.items() <= s["metadata"]["labels"].items()]
    (namespace,) = monitor["spec"]["namespaceSelector"]["matchNames"]
    return rule, service["metadata"]["name"], namespace, cr["spec"]["replicas"]


def rules_by_alert(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}


def test_promtool_accepts_the_rendered_rules(render_cr: Callable[..., rendering.Rendered], tmp_path: Path) -> None:
    rule, *_ = rendered_monitoring(render_cr)
    path = tmp_path / prom.rule_file_name(rule)
    path.write_text(prom.rule_file_text(rule))
    checked = prom.promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    count = sum(len(group["rules"]) for group in rule["spec"]["groups"])
    assert f"SUCCESS: {count} rules found" in checked.stdout, checked.stdout


def test_promtool_rejects_a_broken_rule(render_cr: Callable[..., rendering.Rendered], tmp_path: Path) -> None:
    """The check above can fail: the same file with one expression broken does."""
    rule, *_ = rendered_monitoring(render_cr)
    rule["spec"]["groups"][0]["rules"][0]["expr"] += " ==="
    path = tmp_path / "broken.yaml"
    path.write_text(prom.rule_file_text(rule))
    checked = prom.promtool("check", "rules", str(path))
    assert checked.returncode != 0 and "parse error" in checked.stdout + checked.stderr, checked.stdout + checked.stderr


def up(job: str, namespace: str, pod: str, values: str, metric: str = "up") -> dict[str, str]:
    """A series of one broker's target as a scrape through the ServiceMonitor labels it."""
    labels = (f'job="{job}", namespace="{namespace}", pod="{pod}", service="{job}", endpoint="metrics", '
              f'container="broker", instance="10.88.0.9:9090"')
    return {"series": f"{metric}{{{labels}}}", "values": values}


def down_labels(job: str, namespace: str, pod: str) -> dict[str, str]:
    return {"job": job, "namespace": namespace, "pod": pod, "service": job, "endpoint": "metrics",
            "container": "broker", "instance": "10.88.0.9:9090"}


def unit_tests(rule: dict[str, Any], job: str, namespace: str, replicas: int) -> dict[str, Any]:
    alerts = rules_by_alert(rule)
    broker_down = alerts["RustMQBrokerDown"]
    missing = alerts["RustMQBrokersMissing"]
    volume = alerts["RustMQVolumeFillingUp"]
    pods = [f"rustmq-{i}" for i in range(replicas)]

    def silent(at: str, name: str) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": []}

    def fires(at: str, alert: dict[str, Any], labels: dict[str, str], pod: str = "", value: str = "") -> dict[str, Any]:
        """`alert` firing once at `at` with the series' `labels` and its own, its annotations templated."""
        annotations = {k: v.replace("{{ $labels.pod }}", pod).replace("{{ $value }}", value)
                       for k, v in alert["annotations"].items()}
        expected = {"exp_labels": {**labels, **alert["labels"]}, "exp_annotations": annotations}
        return {"eval_time": at, "alertname": alert["alert"], "exp_alerts": [expected]}

    # rustmq-0 stops answering at minute 2; the others stay up; the same pod name in another
    # namespace is down all along (another cluster's, not this rule's).
    one_down = [up(job, namespace, pods[0], "1 1 0x30")] + [up(job, namespace, p, "1x32") for p in pods[1:]]
    one_down.append(up(job, "elsewhere", pods[0], "0x32"))
    claim = 'kubelet_volume_stats_{}_bytes{{namespace="%s", persistentvolumeclaim="%s", job="kubelet"}}'
    full_claim = {"namespace": namespace, "persistentvolumeclaim": "data-rustmq-0", "job": "kubelet"}
    return {
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "one broker down: RustMQBrokerDown after its `for`, RustMQBrokersMissing after its own",
                "interval": "1m",
                "input_series": one_down,
                "alert_rule_test": [
                    silent("1m", "RustMQBrokerDown"),
                    silent("6m", "RustMQBrokerDown"),  # down since minute 2: still pending
                    fires("7m", broker_down, down_labels(job, namespace, pods[0]), pods[0]),
                    silent("16m", "RustMQBrokersMissing"),
                    fires("17m", missing, {}),
                ],
            },
            {
                "name": "every broker down: RustMQBrokersMissing fires too (a count of nothing is no sample)",
                "interval": "1m",
                "input_series": [up(job, namespace, p, "0x20") for p in pods],
                "alert_rule_test": [fires("16m", missing, {})],
            },
            {
                "name": "all brokers up: nothing fires",
                "interval": "1m",
                "input_series": [up(job, namespace, p, "1x30") for p in pods],
                "alert_rule_test": [silent("30m", name) for name in alerts],
            },
            {
                "name": "partitions without a leader for a minute (either broker's count); another namespace's",
                "interval": "1m",
                "input_series": [
                    up(job, namespace, pods[0], "0 0 2 2 2 2", "rustmq_offline_partitions"),
                    up(job, namespace, pods[1], "0x5", "rustmq_offline_partitions"),
                    up(job, "elsewhere", pods[0], "5x5", "rustmq_offline_partitions"),
                ],
                "alert_rule_test": [
                    silent("1m", "RustMQOfflinePartitions"),
                    silent("2m", "RustMQOfflinePartitions"),  # offline since minute 2: pending
                    fires("3m", alerts["RustMQOfflinePartitions"], {}, value="2"),
                ],
            },
            {
                "name": "partitions under-replicated for 10 minutes, not for 9",
                "interval": "1m",
                "input_series": [
                    up(job, namespace, pods[1], "1x20", "rustmq_under_replicated_partitions"),
                    up(job, namespace, pods[2], "0x20", "rustmq_under_replicated_partitions"),
                ],
                "alert_rule_test": [
                    silent("9m", "RustMQUnderReplicatedPartitions"),
                    fires("10m", alerts["RustMQUnderReplicatedPartitions"], {}),
                ],
            },
            {
                "name": "a claim of this cluster below 15% free for 10 minutes; one at 20%; another cluster's",
                "interval": "1m",
                "input_series": [
                    {"series": claim.format("capacity") % (namespace, "data-rustmq-0"), "values": "100x20"},
                    {"series": claim.format("available") % (namespace, "data-rustmq-0"), "values": "10x20"},
                    {"series": claim.format("capacity") % (namespace, "data-rustmq-1"), "values": "100x20"},
                    {"series": claim.format("available") % (namespace, "data-rustmq-1"), "values": "20x20"},
                    {"series": claim.format("capacity") % (namespace, "data-other-0"), "values": "100x20"},
                    {"series": claim.format("available") % (namespace, "data-other-0"), "values": "1x20"},
                ],
                "alert_rule_test": [silent("9m", "RustMQVolumeFillingUp"), fires("10m", volume, full_claim)],
            },
        ],
    }


def test_promtool_unit_tests_fire_each_alert_when_it_should_and_only_then(
    render_cr: Callable[..., rendering.Rendered], tmp_path: Path,
) -> None:
    rule, job, namespace, replicas = rendered_monitoring(render_cr)
    (tmp_path / "rules.yaml").write_text(prom.rule_file_text(rule))
    tests = {"rule_files": ["rules.yaml"], **unit_tests(rule, job, namespace, replicas)}
    fired = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == set(rules_by_alert(rule)), "every rendered alert needs a history here that fires it"
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = prom.promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_promtool_unit_tests_can_fail(render_cr: Callable[..., rendering.Rendered], tmp_path: Path) -> None:
    """The unit tests above can fail: with the alerts' selectors pointing at another job, the
    expected alerts never come and promtool says so."""
    rule, job, namespace, replicas = rendered_monitoring(render_cr)
    (tmp_path / "rules.yaml").write_text(prom.rule_file_text(rule))
    tests = {"rule_files": ["rules.yaml"], **unit_tests(rule, job + "-not", namespace, replicas)}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = prom.promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "RustMQBrokerDown" in result.stdout + result.stderr, result.stdout + result.stderr
