"""Power loss during a coordination journal compaction (rustmq.coordination.journal).

A child process appends to a journal on a powerfs mount (powerfs.py: what was not fsynced is
lost at the cut), acknowledging an entry only after `flush()`. At one step of the compaction
switch protocol the child stops (the main thread, or only the compaction/removal worker thread,
so acknowledgements may continue on the other), the power is cut, the file system is mounted
again and the reopened journal must hold every acknowledged entry.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from powercut import PowerFS

from rustmq.coordination.journal import Journal

pytestmark = [pytest.mark.slow]

CHILD = r"""
import sys, time
from rustmq.coordination import journal as journal_mod
from rustmq.coordination.journal import Journal

directory, step = sys.argv[1], sys.argv[2]
journal = Journal.open(directory, compact_bytes=2048)

def stop():
    sys.stdout.write("STEP\n")
    sys.stdout.flush()
    time.sleep(3600)

def wrap(name, before):
    original = getattr(journal_mod, name)
    def wrapped(*args, **kwargs):
        if before:
            stop()
        result = original(*args, **kwargs)
        stop()
        return result
    setattr(journal_mod, name, wrapped)

if step == "snapshot-written":   # worker thread stops; appends go on in the old generation
    wrap("_write_snapshot", before=False)
elif step == "caught-up":        # switched, new generation fsynced, no marker yet: the commit
    wrap("_commit", before=True)  # stops (holding its lock, so every flush waits behind it)
elif step == "committed":        # marker durable, old generation not yet removed
    wrap("_commit", before=False)
elif step == "switched":         # committed, about to remove the old generation
    wrap("_remove_generation", before=True)

state = {}
i = 0
while True:
    i += 1
    key, value = b"k%d" % (i % 40), b"v%d" % i
    journal.append([(key, value)], i)
    state[key] = value
    journal.maybe_compact(lambda: sorted(state.items()), i)
    journal.flush()
    sys.stdout.write(f"{i}\n")
    sys.stdout.flush()
"""

WORKER_STEPS = {"snapshot-written"}  # the commit steps hold the lock every flush waits on


@pytest.mark.timeout(180)
@pytest.mark.parametrize("step", ["snapshot-written", "caught-up", "committed", "switched"])
def test_a_power_cut_during_compaction_keeps_every_acknowledged_entry(
        tmp_path: Path, step: str) -> None:
    fs = PowerFS(tmp_path / "image", tmp_path / "mnt", tmp_path / "powerfs.log")
    fs.mount()
    directory = fs.mount_point / "journal"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), step],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        after_step = None
        while True:
            line = proc.stdout.readline()
            assert line, "the child died before reaching the step"
            lines.append(line.strip())
            if line.strip() == "STEP":
                after_step = 0
                if step not in WORKER_STEPS:
                    break  # the appending thread itself is stopped
            elif after_step is not None:
                after_step += 1
                if after_step >= 30:  # acknowledgements made while the worker is stopped
                    break
        fs.cut()
    finally:
        proc.kill()
        rest, _ = proc.communicate(timeout=30)
        fs.cut()
    lines.extend(rest.split())  # acknowledged before the cut, still in the pipe
    acked = [int(line) for line in lines if line.isdigit()]
    assert acked
    expected: dict[bytes, bytes] = {}
    for i in acked:
        expected[b"k%d" % (i % 40)] = b"v%d" % i
    fs.mount()
    try:
        journal = Journal.open(directory, compact_bytes=2048)
        recovered: dict[bytes, bytes | None] = {}
        for key, value in journal.replay():
            recovered[key] = value
        journal.close()
    finally:
        fs.cut()
    in_flight = acked[-1] + 1  # appended (maybe durable) but never acknowledged
    with_in_flight = dict(expected)
    with_in_flight[b"k%d" % (in_flight % 40)] = b"v%d" % in_flight
    assert recovered in (expected, with_in_flight)
