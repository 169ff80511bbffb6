"""Run checkov, a static analyser of Kubernetes manifests, over objects the tests rendered.

checkov is installed by scripts/setup in a venv of its own (.venv/tools/checkov, pinned), since
its dependencies would otherwise pull the project's own ones around. One checkov run covers a
whole set of manifests (its start-up costs seconds); each set is written to a file of its own
and findings come back per file, as ``{file name: {(check id, resource), ...}}``. checkov's
graph checks (a pod without a NetworkPolicy, for instance) look across every file of a run, so
callers give each set its own namespace. ``--skip-download`` keeps it offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

CHECKOV = Path(sys.executable).parent.parent / "tools" / "checkov" / "bin" / "checkov"


def checkov(manifests: Mapping[str, Iterable[Mapping[str, Any]]], workdir: Path) -> dict[str, set[tuple[str, str]]]:
    if not CHECKOV.exists():
        raise AssertionError(f"{CHECKOV} is missing: run scripts/setup, which installs checkov there")
    workdir.mkdir(parents=True, exist_ok=True)
    for name, objects in manifests.items():
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump_all(list(objects), sort_keys=False))
    result = subprocess.run(
        [str(CHECKOV), "--directory", str(workdir), "--framework", "kubernetes", "--output", "json",
         "--quiet", "--skip-download"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    if result.returncode not in (0, 1):  # 1: some check failed
        raise AssertionError(f"checkov failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    reports = json.loads(result.stdout)
    findings: dict[str, set[tuple[str, str]]] = {name: set() for name in manifests}
    for report in reports if isinstance(reports, list) else [reports]:
        for failed in report.get("results", {}).get("failed_checks", []):
            name = Path(failed["file_path"]).stem
            findings.setdefault(name, set()).add((failed["check_id"], failed["resource"]))
    return findings


def unexplained(
    findings: Mapping[str, set[tuple[str, str]]], accepted: Mapping[str, Any]
) -> dict[str, list[str]]:
    """Findings whose check id the caller's table does not accept for that file.

    ``accepted[check_id]`` is a predicate on the file name: the finding is accepted where it
    returns True."""
    left: dict[str, list[str]] = {}
    for name, found in findings.items():
        for check_id, resource in sorted(found):
            rule = accepted.get(check_id)
            if rule is None or not rule(name):
                left.setdefault(name, []).append(f"{check_id} {resource}")
    return left
