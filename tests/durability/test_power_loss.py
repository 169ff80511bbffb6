"""Power loss under a real broker: acknowledged durable writes survive, nothing torn is served.

A crash test that SIGKILLs the broker keeps the page cache, so it would pass with fdatasync
removed. Here the broker's data directory is a powerfs mount (powerfs.py: a FUSE file system
that keeps what was not fsynced in its own memory and drops it when killed), and the power is
cut while producers with durable acks and a group committing offsets are running
(powercut.py). The second test proves the check: with fdatasync made a no-op in the broker
process, the same run must report acknowledged records as lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from powercut import run

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(600)
def test_acknowledged_durable_writes_survive_power_cuts(tmp_path: Path) -> None:
    reports = run(tmp_path, cycles=2)
    for number, report in enumerate(reports):
        print(f"cycle {number}:", *report.notes, sep="\n  ")
        assert not report.lost, report.lost
        assert not report.wrong, report.wrong
    # the test must have had something to lose: durable acks in every partition, every cycle
    assert all("durably 0," not in note for report in reports for note in report.notes)


@pytest.mark.timeout(600)
def test_the_check_reports_loss_when_fdatasync_does_nothing(tmp_path: Path) -> None:
    site = tmp_path / "no-fdatasync"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "os.fdatasync = lambda fd: None  # the broker believes its segments are durable\n")
    root = tmp_path / "run"
    root.mkdir()
    reports = run(root, cycles=1, env={"PYTHONPATH": str(site)})
    print(*reports[0].notes, sep="\n  ")
    assert any("durably acknowledged record(s) missing" in loss for loss in reports[0].lost), (
        reports[0])
