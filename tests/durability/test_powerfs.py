"""powerfs keeps exactly what was synced: the model the power-loss tests rely on, checked alone.

File data and size survive a cut only if the file was fsynced or fdatasynced; directory entries
(creations, removals, renames) only if their directory was fsynced (powerfs.py docstring).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from powercut import PowerFS


@pytest.fixture
def fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    filesystem = PowerFS(tmp_path / "image", tmp_path / "mnt", tmp_path / "powerfs.log")
    filesystem.mount()
    try:
        yield filesystem
    finally:
        filesystem.cut()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, os.fstat(fd).st_size)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def test_only_synced_data_and_synced_names_survive_a_cut(fs: PowerFS) -> None:
    root = fs.mount_point
    (root / "d").mkdir()
    write(root / "d" / "synced", b"kept", sync=True)
    write(root / "d" / "synced", b"-lost", sync=False)  # appended after the sync
    write(root / "d" / "unsynced", b"lost", sync=False)
    write(root / "d" / "old", b"old", sync=True)
    write(root / "d" / "new", b"new", sync=True)
    fsync_dir(root)
    fsync_dir(root / "d")
    os.replace(root / "d" / "new", root / "d" / "old")  # not synced: the old file stays
    write(root / "d" / "nameless", b"data", sync=True)  # its name was never synced
    (root / "e").mkdir()  # root not synced again: gone
    fd = os.open(root / "d" / "synced", os.O_RDONLY)
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:  # reads through a map work
        assert mapped[:] == b"kept-lost"
    os.close(fd)
    fs.cut()
    fs.mount()
    assert sorted(os.listdir(root)) == ["d"]
    assert sorted(os.listdir(root / "d")) == ["new", "old", "synced", "unsynced"]
    assert (root / "d" / "synced").read_bytes() == b"kept"
    assert (root / "d" / "unsynced").read_bytes() == b""  # named durably, data never synced
    assert (root / "d" / "old").read_bytes() == b"old"
    assert (root / "d" / "new").read_bytes() == b"new"


def test_truncation_and_allocation_are_durable_with_the_file(fs: PowerFS) -> None:
    root = fs.mount_point
    fd = os.open(root / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"x" * 100_000, 0)
    os.fsync(fd)
    os.ftruncate(fd, 10)
    os.ftruncate(fd, 1 << 20)  # sparse again: the cut bytes must read as zeros
    os.posix_fallocate(fd, 0, 200_000)
    os.fdatasync(fd)
    os.ftruncate(fd, 5)  # not synced
    os.close(fd)
    fsync_dir(root)
    fs.cut()
    fs.mount()
    data = (root / "f").read_bytes()
    assert len(data) == 1 << 20 and data[:10] == b"x" * 10 and not data[10:].strip(b"\0")
