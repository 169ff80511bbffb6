"""Queue state persisted through the journal: real files, reopen, compaction and a SIGKILL'd writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rustmq.coordination.queue import QueueSettings, QueueStore


def offsets_of(delivery) -> list[int]:
    return [] if delivery is None else [o for s, e in delivery.ranges for o in range(s, e)]


def test_acks_and_failures_survive_reopen(tmp_path: Path) -> None:
    settings = QueueSettings(max_deliveries=2)
    store = QueueStore.open(tmp_path / "q", settings)
    sub = store.get("workers", "jobs", 0, start_offset=100)
    sub.offer(0, 100, 20, 0)
    sub.acquire(0, "a", 20)
    sub.ack([100, 101, 105, 110, 111, 112])
    sub.nack(0, [102], reason="boom")  # failure count 1 of 2
    assert store.persist(0) is not None
    assert store.persist(0) is None  # nothing changed since
    store.flush()
    store.close()

    store = QueueStore.open(tmp_path / "q", settings)
    sub = store.get("workers", "jobs", 0, start_offset=0)  # the persisted start wins
    assert sub.ack_floor == 102
    sub.offer(0, sub.next_offset, 120 - sub.next_offset, 0)
    got = offsets_of(sub.acquire(0, "b", 100))
    assert got == [102, 103, 104, 106, 107, 108, 109] + list(range(113, 120))
    assert sub.nack(0, [102], reason="again")[0].attempts == 2  # the earlier failure counted
    store.close()


def test_compaction_keeps_the_state_small(tmp_path: Path) -> None:
    store = QueueStore.open(tmp_path / "q", compact_bytes=4096)
    sub = store.get("s", "t", 0)
    for i in range(0, 20_000, 100):
        sub.offer(0, i, 100, 0)
        got = offsets_of(sub.acquire(0, "c", 100))
        sub.ack(got[1:])  # leave the first of every hundred unacked
        store.persist(i)
        if i % 2000 == 0:  # compaction runs beside the writes: let the one in progress finish
            store.journal.wait_compaction()
    store.journal.wait_compaction()
    assert store.journal.compactions > 0
    store.journal.maybe_compact(store._live_entries, 20_000)  # catch up with the tail
    store.journal.wait_compaction()
    assert store.journal.partition.size_bytes < 4 * 4096 + 8 * 200 * 4
    store.flush()
    store.close()
    store = QueueStore.open(tmp_path / "q", compact_bytes=4096)
    sub = store.get("s", "t", 0)
    assert sub.ack_floor == 0 and len(sub.done) == 20_000 - 200 - 0
    sub.offer(0, sub.next_offset, 20_000 - sub.next_offset, 0)
    assert offsets_of(sub.acquire(0, "c", 1000)) == list(range(0, 20_000, 100))
    store.close()


WRITER = r"""
import sys
from rustmq.coordination.queue import QueueStore
store = QueueStore.open(sys.argv[1], compact_bytes=8192)
sub = store.get("s", "t", 0)
now = 0
while True:
    now += 1
    sub.offer(now, sub.next_offset, 64, 0)
    got = [o for s, e in sub.acquire(now, "c", 64).ranges for o in range(s, e)]
    acked = got[::2] + got[1::4]  # out of order, leaving gaps
    sub.ack(acked)
    store.persist(now)
    store.flush()
    sys.stdout.write(" ".join(map(str, acked)) + "\n")
    sys.stdout.flush()
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_acknowledged_acks_survive_sigkill(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "q")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    confirmed: set[int] = set()
    for _ in range(300):
        line = proc.stdout.readline()
        assert line, "writer died"
        confirmed.update(int(x) for x in line.split())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for line in proc.stdout.read().splitlines():  # confirmed lines still in the pipe
        if line.strip():
            confirmed.update(int(x) for x in line.split())
    proc.stdout.close()
    store = QueueStore.open(tmp_path / "q", compact_bytes=8192)
    assert store.journal.generation > 1
    sub = store.get("s", "t", 0)
    end = max(confirmed) + 1000
    sub.offer(0, sub.next_offset, end - sub.next_offset, 0)
    delivered: set[int] = set()
    while (got := sub.acquire(0, "c", 5000)) is not None:
        delivered.update(offsets_of(got))
    assert not delivered & confirmed  # an acknowledged ack is never undone
    assert delivered | confirmed >= set(range(end - 1000))  # and nothing else was lost
    store.close()


def test_min_floor_over_subscriptions(tmp_path: Path) -> None:
    store = QueueStore.open(tmp_path / "q")
    assert store.min_floor("t", 0) is None
    a = store.get("a", "t", 0)
    b = store.get("b", "t", 0)
    for sub in (a, b):
        sub.offer(0, 0, 10, 0)
        sub.acquire(0, "c", 10)
    a.ack(range(8))
    b.ack(range(3))
    assert store.min_floor("t", 0) == 3
    store.close()


def test_reset_is_persisted(tmp_path: Path) -> None:
    store = QueueStore.open(tmp_path / "q")
    sub = store.get("s", "t", 0)
    sub.offer(0, 0, 10, 0)
    sub.ack(offsets_of(sub.acquire(0, "c", 10)))
    store.persist(0)
    sub.reset(4)
    assert sub.ack_floor == 4 and sub.next_offset == 4 and not sub.in_flight
    store.persist(1)
    store.flush()
    store.close()
    store = QueueStore.open(tmp_path / "q")
    sub = store.get("s", "t", 0)
    assert sub.ack_floor == 4
    sub.offer(0, 4, 6, 0)
    assert offsets_of(sub.acquire(0, "c", 10)) == list(range(4, 10))
    store.close()


def test_a_failed_compaction_keeps_the_old_generation(tmp_path: Path, monkeypatch) -> None:
    """Disk-full during compaction is simulated (monkeypatch): a real ENOSPC needs a small
    filesystem this test environment cannot mount."""
    from rustmq.coordination import journal as journal_mod
    from rustmq.storage import errors

    store = QueueStore.open(tmp_path / "q", compact_bytes=2048)

    def full(*args, **kwargs):
        raise errors.StorageFullError("no space left on device (simulated)")

    monkeypatch.setattr(journal_mod, "_write_snapshot", full)
    sub = store.get("s", "t", 0)
    for i in range(0, 3000, 10):
        sub.offer(0, i, 10, 0)
        got = offsets_of(sub.acquire(0, "c", 10))
        sub.ack(got[::2])
        store.persist(i)
    store.journal.wait_compaction()  # the snapshot is written (and fails) on a worker thread
    assert store.journal.compaction_failures >= 1 and store.journal.generation == 1
    monkeypatch.undo()
    for i in range(3000, 6000, 10):
        sub.offer(0, i, 10, 0)
        sub.ack(offsets_of(sub.acquire(0, "c", 10))[::2])
        store.persist(i)
    store.journal.wait_compaction()
    assert store.journal.generation > 1
    expected = set(sub.done)
    store.flush()
    store.close()
    store = QueueStore.open(tmp_path / "q", compact_bytes=2048)
    assert store.get("s", "t", 0).done == expected
    store.close()
