"""Committed offsets on real files: reopen, compaction generations, lag, and a SIGKILL'd writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rustmq.coordination import journal as journal_mod
from rustmq.coordination.offsets import InvalidCommitError, OffsetStore


def test_commit_fetch_and_reopen(tmp_path: Path) -> None:
    store = OffsetStore.open(tmp_path / "offsets")
    store.commit(1000, "g1", {("orders", 0): 10, ("orders", 1): 20}, metadata="m")
    store.commit(2000, "g1", {("orders", 0): 15})
    store.commit(2000, "g2", {("orders", 0): 3})
    store.flush()
    store.close()
    store = OffsetStore.open(tmp_path / "offsets")
    assert store.groups() == ["g1", "g2"]
    assert store.fetch("g1")[("orders", 0)].offset == 15
    assert store.fetch("g1")[("orders", 1)] == (20, "m", 1000)
    assert store.fetch("g1", [("orders", 1), ("orders", 9)]).keys() == {("orders", 1)}
    store.close()


def test_lag_per_partition(tmp_path: Path) -> None:
    store = OffsetStore.open(tmp_path / "o")
    store.commit(0, "g", {("t", 0): 40})
    ends = {("t", 0): 100, ("t", 1): 7}
    assert store.lag("g", ends) == {("t", 0): 60, ("t", 1): 7}
    assert store.lag("g", ends, start_offsets={("t", 1): 5}) == {("t", 0): 60, ("t", 1): 2}
    assert store.lag("g", {("t", 0): 30}) == {("t", 0): 0}  # never negative (e.g. after truncation)
    store.close()


def test_bad_commits_write_nothing(tmp_path: Path) -> None:
    store = OffsetStore.open(tmp_path / "o")
    end = store.journal.partition.end_offset
    for group, offsets, meta in [
        ("", {("t", 0): 1}, ""),
        ("g", {}, ""),
        ("g", {("t", 0): 1, ("t", 1): -1}, ""),
        ("g", {("t", -1): 1}, ""),
        ("g", {("t", 0): 1}, "x" * 5000),
    ]:
        with pytest.raises(InvalidCommitError):
            store.commit(0, group, offsets, meta)
    assert store.journal.partition.end_offset == end
    assert store.groups() == []
    store.close()


def test_delete_group_survives_reopen_and_compaction(tmp_path: Path) -> None:
    store = OffsetStore.open(tmp_path / "o", compact_bytes=2048)
    for i in range(200):
        store.commit(i, f"g{i % 3}", {("t", i % 5): i})
    assert store.delete_group(300, "g1") == 5
    store.journal.wait_compaction()
    assert store.journal.compactions > 0
    store.flush()
    store.close()
    reopened = OffsetStore.open(tmp_path / "o", compact_bytes=2048)
    assert reopened.groups() == ["g0", "g2"]
    assert reopened.fetch("g0")[("t", 3)].offset == 198
    generations = [p.name for p in (tmp_path / "o").iterdir()]
    assert len(generations) == 1  # old generations deleted
    reopened.close()


def test_compaction_bounds_the_journal(tmp_path: Path) -> None:
    store = OffsetStore.open(tmp_path / "o", compact_bytes=8192)
    for i in range(5000):
        store.commit(i, "g", {("t", i % 4): i})
        if i % 250 == 0:  # compaction runs beside the commits: let the one in progress finish
            store.journal.wait_compaction()
    # Once the one in progress and the next are installed, the journal is the live state plus
    # a short tail.
    store.journal.wait_compaction()
    store.journal.maybe_compact(store.live_entries, 5000)
    store.journal.wait_compaction()
    assert store.journal.partition.size_bytes < 3 * 8192
    assert store.journal.generation > 10
    store.close()


def test_an_incomplete_newer_generation_is_discarded(tmp_path: Path) -> None:
    store = OffsetStore.open(tmp_path / "o")
    store.commit(0, "g", {("t", 0): 5})
    generation = store.journal.generation
    store.flush()
    store.close()
    # What a crash right after creating the next generation's directory leaves behind.
    leftover = tmp_path / "o" / journal_mod._generation_name(generation + 1)
    leftover.mkdir()
    (leftover / "00000000000000000000.log").write_bytes(b"\0" * 4096)
    store = OffsetStore.open(tmp_path / "o")
    assert store.fetch("g")[("t", 0)].offset == 5
    assert not leftover.exists()
    store.close()


def test_a_newer_complete_generation_wins_over_a_leftover_older_one(tmp_path: Path) -> None:
    store = OffsetStore.open(tmp_path / "o")
    store.commit(0, "g", {("t", 0): 5})
    old_dir = store.journal.directory / journal_mod._generation_name(store.journal.generation)
    # Build the next generation by hand as compact() would, but "crash" before deleting the old one.
    new = journal_mod.Journal(store.journal.directory, journal_mod.JOURNAL_CONFIG, 1 << 20)
    partition = new._create_generation(store.journal.generation + 1, store.live_entries(), 1)
    partition.close()
    store.commit(1, "g", {("t", 0): 6})  # lands in the old generation only: superseded by design
    store.flush()
    store.close()
    store = OffsetStore.open(tmp_path / "o")
    assert not old_dir.exists()
    assert store.fetch("g")[("t", 0)].offset == 5
    store.close()


WRITER = r"""
import sys
from rustmq.coordination.offsets import OffsetStore
store = OffsetStore.open(sys.argv[1], compact_bytes=4096)
i = 0
while True:
    i += 1
    store.commit(i, "g", {("t", i % 4): i})
    store.flush()
    sys.stdout.write(f"{i}\n")
    sys.stdout.flush()
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("after", [37, 400])
def test_acknowledged_commits_survive_sigkill(tmp_path: Path, after: int) -> None:
    directory = tmp_path / "offsets"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)],
                            stdout=subprocess.PIPE, text=True)
    acked = 0
    assert proc.stdout is not None
    while acked < after:
        line = proc.stdout.readline()
        assert line, "writer died"
        acked = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    acked = max([acked] + [int(line) for line in proc.stdout.read().split()])  # still in the pipe
    proc.stdout.close()
    store = OffsetStore.open(directory, compact_bytes=4096)
    committed = store.fetch("g")
    for partition in range(4):
        last_acked = max(i for i in range(1, acked + 1) if i % 4 == partition)
        got = committed[("t", partition)].offset
        assert got >= last_acked  # never lose an acknowledged commit
        assert got <= acked + 1  # and never invent one (the commit in progress may be there)
    assert len(list(directory.iterdir())) == 1
    store.close()


def test_min_committed_for_retention(tmp_path: Path) -> None:
    store = OffsetStore.open(tmp_path / "o")
    store.commit(0, "a", {("t", 0): 50})
    store.commit(0, "b", {("t", 0): 30})
    assert store.min_committed(["a", "b"], ("t", 0)) == 30
    assert store.min_committed(["a", "c"], ("t", 0)) == 0
    assert store.min_committed([], ("t", 0)) is None
    store.close()
