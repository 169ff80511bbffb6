"""The README's first command, both halves, in its non-interactive form (scripts/run --once):
the seed's RustMQCluster reaches Ready on the test cluster, then a real broker process does a
produce/consume round trip and stops cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_scripts_run_once_shows_the_whole_product(cluster: Any, namespace: str, tmp_path: Path) -> None:
    env = {**cluster.env, "RUSTMQ_DEMO_NAMESPACE": namespace, "RUSTMQ_DATA_DIR": str(tmp_path / "data")}
    for name in ("RUSTMQ_PRODUCER_PORT", "RUSTMQ_CONSUMER_PORT", "RUSTMQ_METRICS_PORT"):
        env.pop(name, None)
    result = subprocess.run(
        [str(REPO / "scripts" / "run"), "--once"],
        capture_output=True, text=True, env=env, timeout=380, cwd=REPO,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    kubernetes, _, broker = result.stdout.partition("== Broker: a local broker process")
    assert f"RustMQCluster {namespace}/rustmq is Ready" in kubernetes, output
    rows = [line.split() for line in kubernetes.splitlines() if line.startswith("rustmq ")]
    assert rows and rows[0][:3] == ["rustmq", "True", "1"], output
    assert "== round trip OK" in broker, output
    assert "== broker stopped cleanly" in broker, output
