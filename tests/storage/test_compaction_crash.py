"""Crash safety of the compaction swap: a real process SIGKILLed between each durable step.

compaction_writer.py prepares a partition of keyed records (several segments), then a child
opens a copy, compacts it and SIGKILLs itself right before its N-th fsync/rename/unlink/
fallocate. Whatever N, the reopened partition must serve exactly the records before compaction
or exactly the records after it, with no leftover `.compacting` or commit file, must accept
appends, and compacting it again must give the compacted records. A power loss (page cache
lost) cannot be produced here; it rests on the fsync ordering in replace_sealed_segments.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import compaction_writer as writer
from rustmq import compaction
from rustmq.storage import partition as partition_mod
from storage_testlib import read_records

WRITER = Path(writer.__file__)  # also run as a script: the child process


def child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(WRITER), *args], capture_output=True, text=True,
                          timeout=60)


def image(directory: Path) -> tuple[int, int, list[tuple[int, bytes | None, bytes | None]]]:
    """(start, end, every (offset, key, value) served), read the way consumers read."""
    log = partition_mod.PartitionLog.open(directory, writer.log_config())
    try:
        return log.start_offset, log.end_offset, read_records(log)
    finally:
        log.close(clean=False)


def run_case(tmp_path: Path, batches: int, sample: int | None) -> dict[str, int]:
    """Kill before steps of the compaction (every one, or `sample` spread plus all around the
    commit); the outcome must be "before" up to the commit file's rename and "after" from the
    step following it. Returns the outcome counts."""
    prepared = tmp_path / "prepared"
    result = child("prepare", str(prepared), str(batches))
    assert result.returncode == 0, result.stderr
    before = image(copy(prepared, tmp_path / "before"))
    done = copy(prepared, tmp_path / "done")
    result = child("compact", str(done), "0")
    assert result.returncode == 0, result.stderr
    _, total, _, commit_step = result.stdout.split()
    total, commit_step = int(total), int(commit_step)
    after = image(done)
    assert after != before and len(after[2]) < len(before[2])
    assert 5 < commit_step < total
    steps: list[int] = list(range(1, total + 1))
    if sample is not None:
        spread = {1 + i * (total - 1) // (sample - 1) for i in range(sample)}
        steps = sorted(spread | set(range(commit_step - 2, commit_step + 3)))
    outcomes = {"before": 0, "after": 0}
    for step in steps:
        directory = copy(prepared, tmp_path / f"step-{step}")
        result = child("compact", str(directory), str(step))
        assert result.returncode == -signal.SIGKILL, (step, result.stdout, result.stderr)
        recovered = image(directory)
        expected = before if step <= commit_step else after
        assert recovered == expected, f"kill before step {step} of {total} (commit {commit_step})"
        outcomes["before" if recovered == before else "after"] += 1
        leftovers = [p.name for p in directory.iterdir()
                     if p.name.endswith(".compacting") or p.name == "compaction-commit"]
        assert not leftovers, (step, leftovers)
        log = partition_mod.PartitionLog.open(directory, writer.log_config())
        try:
            assert compaction.compact(log, 1 << 62) is not None or recovered == after
            assert read_records(log) == after[2], step
            end = log.end_offset
            log.append(writer.make_batch(end, 1))
            assert read_records(log)[-1][0] == end + 3
        finally:
            log.close()
        shutil.rmtree(directory)
    return outcomes


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_before_every_step_of_a_small_compaction(tmp_path: Path) -> None:
    """Two segments compacted into one: a kill before each of its steps."""
    outcomes = run_case(tmp_path, 60, None)
    assert outcomes["before"] > 5 and outcomes["after"] > 5, outcomes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_sampled_steps_of_a_many_segment_compaction(tmp_path: Path) -> None:
    """Forty segments into ten: kills spread over the writes, the commit and the renames."""
    outcomes = run_case(tmp_path, 400, 14)
    assert outcomes["before"] >= 5 and outcomes["after"] >= 5, outcomes
