"""Journal compaction off the calling thread: where the blocking write runs, appends racing with
it, the commit marker and its format version, and a real process SIGKILLed at each step of the
switch protocol (rustmq.coordination.journal, module docstring)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pytest

from rustmq.coordination import journal as journal_mod
from rustmq.coordination.journal import Journal
from rustmq.storage.partition import PartitionLog


def _fill(journal: Journal, start: int, count: int) -> dict[bytes, bytes]:
    written = {}
    for i in range(start, start + count):
        key, value = b"k%d" % (i % 50), b"v%d" % i
        journal.append([(key, value)], i)
        written[key] = value
    return written


def _state(journal: Journal) -> dict[bytes, bytes | None]:
    state: dict[bytes, bytes | None] = {}
    for key, value in journal.replay():
        state[key] = value
    return state


def _live(state: dict[bytes, bytes]):
    return lambda: sorted(state.items())


def test_the_snapshot_is_written_on_a_worker_thread(tmp_path: Path, monkeypatch) -> None:
    callers: list[int] = []
    original = journal_mod._write_snapshot

    def spy(*args, **kwargs):
        callers.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(journal_mod, "_write_snapshot", spy)
    journal = Journal.open(tmp_path / "j", compact_bytes=1024)
    callers.clear()  # the first generation of an empty store is created by open itself
    state: dict[bytes, bytes] = {}
    i = 0
    while journal.compactions == 0:
        state.update(_fill(journal, i, 10))
        i += 10
        journal.maybe_compact(_live(state), i)
        assert i < 100_000
    assert callers and threading.get_ident() not in callers
    journal.close()


def test_entries_appended_during_a_compaction_survive_reopen(tmp_path: Path, monkeypatch) -> None:
    release = threading.Event()
    original = journal_mod._write_snapshot

    def slow(*args, **kwargs):
        assert release.wait(10)
        return original(*args, **kwargs)

    journal = Journal.open(tmp_path / "j", compact_bytes=1024)
    monkeypatch.setattr(journal_mod, "_write_snapshot", slow)
    state = _fill(journal, 0, 200)
    assert journal.wants_compaction()
    assert journal.maybe_compact(_live(state), 200) is False and journal.compacting
    old_generation = journal.generation
    # Appended while gen N+1 is being written: they go to gen N and must reach gen N+1.
    during = _fill(journal, 1000, 120)
    state.update(during)
    partition, offset = journal.position()
    assert partition is journal.partition and journal.generation == old_generation
    assert journal.maybe_compact(_live(state), 1200) is False  # thread still blocked
    release.set()
    journal.wait_compaction()
    assert journal.generation == old_generation + 1 and journal.compactions == 1
    assert _state(journal) == state
    # The pre-switch position still resolves: the old partition stays open for its waiters.
    assert not partition.closed and partition.flush() > offset
    after = _fill(journal, 2000, 5)
    state.update(after)
    journal.flush()
    journal.close()
    reopened = Journal.open(tmp_path / "j", compact_bytes=1024)
    assert reopened.generation == old_generation + 1
    assert _state(reopened) == state
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == [
        journal_mod._generation_name(old_generation + 1)]
    reopened.close()


def test_a_failed_snapshot_write_keeps_the_old_generation(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "no space left on device (simulated)")

    journal = Journal.open(tmp_path / "j", compact_bytes=1024)
    monkeypatch.setattr(journal_mod, "_write_snapshot", full)
    state = _fill(journal, 0, 200)
    journal.maybe_compact(_live(state), 200)
    journal.wait_compaction()
    assert journal.compaction_failures == 1 and journal.generation == 1
    assert not journal.wants_compaction()  # retried only after another compact_bytes of tail
    assert _state(journal) == state
    journal.close()


def test_a_format_1_generation_without_marker_still_opens(tmp_path: Path) -> None:
    """Data directories written before the commit marker existed: valid on their first batch."""
    path = tmp_path / "j" / journal_mod._generation_name(3)
    log = PartitionLog.open(path, journal_mod.JOURNAL_CONFIG)
    marker = msgpack.packb({"generation": 3, "created_ms": 0})  # no "format": version 1
    log.append(journal_mod._build([(journal_mod.GENERATION_KEY, marker), (b"a", b"1")], 0))
    log.append(journal_mod._build([(b"b", b"2")], 0))
    log.close()
    journal = Journal.open(tmp_path / "j")
    assert journal.generation == 3 and _state(journal) == {b"a": b"1", b"b": b"2"}
    journal.append([(b"c", b"3")], 1)
    journal.compact(sorted(_state(journal).items()), 2)  # upgrades to a committed format 2
    journal.close()
    journal = Journal.open(tmp_path / "j")
    assert journal.generation == 4 and _state(journal) == {b"a": b"1", b"b": b"2", b"c": b"3"}
    assert (tmp_path / "j" / journal_mod._generation_name(4) / journal_mod.COMMITTED_FILE).exists()
    journal.close()


def test_an_uncommitted_format_2_generation_is_ignored(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j")
    journal.append([(b"a", b"1")], 0)
    journal.flush()
    journal.close()
    # A complete snapshot batch but no marker: a crash before step 3 committed it.
    path = tmp_path / "j" / journal_mod._generation_name(2)
    snapshot = journal_mod._build(journal_mod._snapshot_entries(2, [(b"a", b"stale")], 0), 0)
    journal_mod._write_snapshot(path, journal_mod.JOURNAL_CONFIG, snapshot).close()
    journal = Journal.open(tmp_path / "j")
    assert journal.generation == 1 and _state(journal) == {b"a": b"1"}
    assert not path.exists()
    journal.close()


CRASHER = r"""
import os, sys
from rustmq.coordination import journal as journal_mod
from rustmq.coordination.journal import Journal

directory, step = sys.argv[1], sys.argv[2]

def die(*args, **kwargs):
    sys.stdout.flush()
    os._exit(9)

def wrap(name, before):
    original = getattr(journal_mod, name)
    def wrapped(*args, **kwargs):
        if before:
            die()
        result = original(*args, **kwargs)
        die()
        return result
    setattr(journal_mod, name, wrapped)

journal = Journal.open(directory, compact_bytes=2048)  # before the hooks: open makes gen 1
if step == "snapshot-written":          # step 2 done, nothing installed
    wrap("_write_snapshot", before=False)
elif step == "caught-up":               # step 3: tail copied and fsynced, marker not written
    wrap("_commit", before=True)
elif step == "committed":               # step 3: marker durable, appends not switched yet
    wrap("_commit", before=False)
elif step == "switched":                # step 4: appends switched, old generation not deleted
    wrap("_remove_generation", before=True)
else:
    raise SystemExit("unknown step " + step)

state = {}
i = 0
while True:
    i += 1
    key, value = b"k%d" % (i % 40), b"v%d" % i
    journal.append([(key, value)], i)
    state[key] = value
    journal.maybe_compact(lambda: sorted(state.items()), i)
    journal.partition.flush()
    sys.stdout.write(f"{i}\n")
    sys.stdout.flush()
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("step", ["snapshot-written", "caught-up", "committed", "switched"])
def test_a_crash_at_each_step_of_the_switch_keeps_every_acknowledged_entry(
        tmp_path: Path, step: str) -> None:
    directory = tmp_path / "j"
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(directory), step],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 9, proc.stderr
    acked = [int(line) for line in proc.stdout.split()]
    assert acked, "the child crashed before acknowledging anything"
    expected: dict[bytes, bytes] = {}
    for i in acked:
        expected[b"k%d" % (i % 40)] = b"v%d" % i
    journal = Journal.open(directory, compact_bytes=2048)
    recovered = _state(journal)
    # Everything acknowledged is there; at most the one append in flight when it died is extra.
    last = acked[-1] + 1
    expected_or_next = dict(expected)
    expected_or_next[b"k%d" % (last % 40)] = b"v%d" % last
    assert recovered in (expected, expected_or_next)
    names = sorted(p.name for p in directory.iterdir())
    assert names == [journal_mod._generation_name(journal.generation)]
    journal.append([(b"after", b"crash")], 0)  # and it keeps working
    journal.flush()
    journal.close()


def test_a_failed_commit_acknowledges_nothing_new_until_a_retry_commits(
        tmp_path: Path, monkeypatch) -> None:
    """The switch to a new generation happens before its marker is durable, so a failed commit
    must keep every append to the new generation unacknowledged (its flush target reports
    nothing durable) and keep the old generation on disk; the next flush retries the commit."""
    journal = Journal.open(tmp_path / "j", compact_bytes=1024)
    original = journal_mod._commit
    failures = []

    def marker_then_fail(path: Path) -> None:
        original(path)  # the marker may well be on disk when the error comes
        failures.append(path)
        raise OSError(5, "input/output error (simulated, after the marker was written)")

    monkeypatch.setattr(journal_mod, "_commit", marker_then_fail)
    state = _fill(journal, 0, 200)
    journal.flush()
    journal.maybe_compact(_live(state), 200)
    pending = journal._pending
    assert pending is not None
    pending.thread.join()
    journal.maybe_compact(_live(state), 200)  # installs and starts the commit, which fails
    committing = journal._committing
    assert committing is not None
    committing.join()
    assert failures and journal.generation == 2 and not committing.committed
    assert (tmp_path / "j" / journal_mod._generation_name(1)).exists()
    state.update(_fill(journal, 300, 10))
    target, last = journal.position()
    assert target.durable_offset <= last  # not acknowledged while uncommitted
    with pytest.raises(OSError):
        journal.flush()
    assert target.durable_offset <= last
    monkeypatch.setattr(journal_mod, "_commit", original)
    journal.flush()  # the retry commits, then deletes generation 1 (on a thread of its own)
    assert target.durable_offset > last
    committing.join()
    assert not (tmp_path / "j" / journal_mod._generation_name(1)).exists()
    journal.close(clean=False)
    reopened = Journal.open(tmp_path / "j")
    assert reopened.generation == 2 and _state(reopened) == state
    reopened.close()


def test_a_crash_after_a_failed_commit_recovers_everything_acknowledged(
        tmp_path: Path, monkeypatch) -> None:
    """Whichever generation recovery then picks (the marker may or may not have reached the
    disk), it holds every entry acknowledged before the crash."""
    original = journal_mod._commit
    for marker_reached_disk in (True, False):
        directory = tmp_path / f"j-{marker_reached_disk}"
        journal = Journal.open(directory, compact_bytes=1024)

        def failing(path: Path, reached: bool = marker_reached_disk) -> None:
            if reached:
                original(path)
            raise OSError(28, "no space left on device (simulated)")

        monkeypatch.setattr(journal_mod, "_commit", failing)
        acknowledged = _fill(journal, 0, 200)
        journal.flush()
        journal.maybe_compact(_live(acknowledged), 200)
        assert journal._pending is not None
        journal._pending.thread.join()
        journal.maybe_compact(_live(acknowledged), 200)
        assert journal._committing is not None
        journal._committing.join()
        for i in range(10):  # appended, never acknowledged
            journal.append([(b"unacknowledged-%d" % i, b"x")], 300 + i)
        journal.close(clean=False)
        monkeypatch.setattr(journal_mod, "_commit", original)
        reopened = Journal.open(directory)
        recovered = _state(reopened)
        assert all(recovered.get(key) == value for key, value in acknowledged.items())
        assert reopened.generation == (2 if marker_reached_disk else 1)
        reopened.close()
