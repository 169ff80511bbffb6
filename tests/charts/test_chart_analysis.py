"""checkov, a static analyser of Kubernetes manifests, over the chart as `helm template` renders
it with each values file of ci/. A finding fails the test unless ACCEPTED says why it is right
for the operator."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from manifest_analysis import checkov, unexplained

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rustmq-operator"
SCENARIOS = sorted((CHART / "ci").glob("*.yaml"))


def _template(helm: str, values: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [helm, "template", "rmq", str(CHART), "--namespace", values.stem, "--values", str(values)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


ACCEPTED: dict[str, Callable[[str], bool]] = {
    # CKV_K8S_43 "image should use a digest": image.digest pins one; by default the tag is the
    # chart's appVersion, which the project never re-tags.
    "CKV_K8S_43": lambda scenario: True,
    # CKV_K8S_15 "pull policy should be Always": IfNotPresent (image.pullPolicy) lets the operator
    # restart on a node while the registry is down; the tag is immutable.
    "CKV_K8S_15": lambda scenario: True,
    # CKV_K8S_38 "service account tokens only where necessary": the operator is a client of the
    # API server; its token is the point, bound to the least-privilege Role of rbac.yaml.
    "CKV_K8S_38": lambda scenario: True,
}


def test_the_rendered_chart_passes_checkov_or_has_an_accepted_finding(helm: str, tmp_path: Path) -> None:
    manifests = {values.stem: _template(helm, values) for values in SCENARIOS}
    findings = checkov(manifests, tmp_path / "manifests")
    assert unexplained(findings, ACCEPTED) == {}
    reported = {check for found in findings.values() for check, _ in found}
    assert set(ACCEPTED) <= reported, f"accepted but no longer reported: {set(ACCEPTED) - reported}"
