"""powerfs: a FUSE file system that forgets everything not synced when its process is killed.

    python tests/durability/powerfs.py IMAGE_DIR MOUNT_POINT     (runs in the foreground)

It stands in for a disk with a volatile write cache, so that a test can cut the power under a
broker: everything a program writes lives in this process's memory (the "page cache"), and only
what the program makes durable reaches IMAGE_DIR (the "disk"). Killing this process (SIGKILL)
together with the program is the power cut; mounting IMAGE_DIR again shows exactly what the
program had made durable. Tests under tests/durability drive it (powercut.py).

The durability model (strict POSIX, as pessimistic as a real file system may be):

* a file's data and size reach the disk when the file is fsynced or fdatasynced (through any
  descriptor); nothing else writes file data back, ever;
* a directory's entries (files and directories created, removed, renamed into or out of it)
  reach the disk when that directory is fsynced; until then the disk keeps the entries it had.
  A new file whose name was never synced in its directory is lost with its data, even if the
  file itself was fsynced; a renamed file keeps its old name (and the old file under the new
  name) until the directory is synced; a directory's own entries are synced separately from
  its name in its parent;
* truncation and fallocate are changes of the file's size and data like any write.

Real file systems are often kinder (ext4 commits metadata with its journal every few seconds
and an fsync commits the whole journal), so a program that passes here is correct on them too.
The disk image: IMAGE_DIR/files/<inode> holds each file's synced contents (sparse),
IMAGE_DIR/dirs/<inode>.json each directory's synced entries, {name: [inode, "f" | "d"]}; inode 1
is the root. An image that does not exist yet is an empty disk.

Page cache and mmap: the kernel caches pages of files on a FUSE mount; the broker reads
segments through read-only shared maps, which FUSE serves from those pages (writes go through to
this process at once, since writeback caching is off; no direct_io, which would forbid mmap). A
power cut must therefore also drop the kernel's cache: the test kills every process using the
mount, then this one, and unmounts; the next mount starts from the image alone.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mfusepy

CHUNK = 64 * 1024
ROOT = 1


class Node:
    """An inode: a directory's live entries, or a file's live data as chunks of CHUNK bytes."""

    def __init__(self, ino: int, is_dir: bool) -> None:
        self.ino = ino
        self.is_dir = is_dir
        self.entries: dict[str, Node] = {}
        self.chunks: dict[int, bytearray] = {}
        self.size = 0
        self.dirty: set[int] = set()  # chunks changed since the last sync
        self.low_size = 0  # the smallest size since the last sync (a truncation to redo)
        self.synced_size = 0
        self.nlink = 2 if is_dir else 1
        self.mtime_ns = time.time_ns()

    def write(self, data: bytes, offset: int) -> None:
        end = offset + len(data)
        position = offset
        while position < end:
            index, start = divmod(position, CHUNK)
            take = min(CHUNK - start, end - position)
            chunk = self.chunks.get(index)
            if chunk is None:
                chunk = self.chunks[index] = bytearray(CHUNK)
            chunk[start : start + take] = data[position - offset : position - offset + take]
            self.dirty.add(index)
            position += take
        if end > self.size:
            self.size = end
        self.mtime_ns = time.time_ns()

    def read(self, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        out = bytearray()
        position = offset
        while position < end:
            index, start = divmod(position, CHUNK)
            take = min(CHUNK - start, end - position)
            chunk = self.chunks.get(index)
            out += chunk[start : start + take] if chunk is not None else bytes(take)
            position += take
        return bytes(out)

    def truncate(self, length: int) -> None:
        if length < self.size:
            last = length // CHUNK
            for index in [i for i in self.chunks if i > last or (i == last and length % CHUNK == 0)]:
                del self.chunks[index]
            if length % CHUNK and last in self.chunks:
                self.chunks[last][length % CHUNK :] = bytes(CHUNK - length % CHUNK)
                self.dirty.add(last)
            self.low_size = min(self.low_size, length)
        self.size = length
        self.mtime_ns = time.time_ns()

    def blocks(self) -> int:
        return len(self.chunks) * CHUNK // 512


class PowerFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, image: Path) -> None:
        self.image = image
        (image / "files").mkdir(parents=True, exist_ok=True)
        (image / "dirs").mkdir(parents=True, exist_ok=True)
        self.mutex = threading.Lock()
        self.handles: dict[int, Node] = {}
        self.next_handle = 1
        self.next_ino = ROOT + 1
        loaded: dict[int, Node] = {}
        self.root = self._load(ROOT, True, loaded)
        self.next_ino = max([ROOT, *loaded, *self._image_inodes()]) + 1

    # -- the disk image ---------------------------------------------------------------------

    def _image_inodes(self) -> list[int]:
        names = [p.name for p in (self.image / "files").iterdir()]
        names += [p.name.split(".")[0] for p in (self.image / "dirs").iterdir()]
        return [int(name) for name in names if name.isdigit()]

    def _load(self, ino: int, is_dir: bool, loaded: dict[int, Node]) -> Node:
        if ino in loaded:
            return loaded[ino]
        node = loaded[ino] = Node(ino, is_dir)
        if is_dir:
            try:
                entries = json.loads((self.image / "dirs" / f"{ino}.json").read_bytes())
            except FileNotFoundError:
                entries = {}
            for name, (child, kind) in entries.items():
                node.entries[name] = self._load(int(child), kind == "d", loaded)
                if kind == "d":
                    node.nlink += 1
            return node
        try:
            fd = os.open(self.image / "files" / str(ino), os.O_RDONLY)
        except FileNotFoundError:
            return node  # named durably but never synced: an empty file
        try:
            size = os.fstat(fd).st_size
            position = 0
            while position < size:  # read the data regions only: segment images are sparse
                try:
                    start = os.lseek(fd, position, os.SEEK_DATA) // CHUNK * CHUNK
                except OSError as error:
                    if error.errno != errno.ENXIO:
                        raise
                    break  # nothing but a hole up to the end
                end = os.lseek(fd, start, os.SEEK_HOLE)
                for index in range(start, end, CHUNK):
                    piece = os.pread(fd, CHUNK, index)
                    if piece.strip(b"\0"):
                        node.chunks[index // CHUNK] = bytearray(piece.ljust(CHUNK, b"\0"))
                position = max(end, start + CHUNK)
        finally:
            os.close(fd)
        node.size = node.synced_size = node.low_size = size
        return node

    def _sync_file(self, node: Node) -> None:
        path = self.image / "files" / str(node.ino)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if node.low_size < node.synced_size:
                os.ftruncate(fd, node.low_size)  # bytes cut since the last sync read as zeros
            os.ftruncate(fd, node.size)
            for index in sorted(node.dirty):
                start = index * CHUNK
                if start >= node.size:
                    continue
                chunk = node.chunks.get(index)
                data = bytes(chunk[: node.size - start]) if chunk is not None else bytes(
                    min(CHUNK, node.size - start))
                os.pwrite(fd, data, start)
        finally:
            os.close(fd)
        node.dirty.clear()
        node.synced_size = node.low_size = node.size

    def _sync_dir(self, node: Node) -> None:
        entries = {name: [child.ino, "d" if child.is_dir else "f"]
                   for name, child in node.entries.items()}
        path = self.image / "dirs" / f"{node.ino}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries))
        os.replace(temporary, path)

    # -- name resolution --------------------------------------------------------------------

    def _node(self, path: str | None, fh: int | None = None) -> Node:
        if fh is not None and fh in self.handles:
            return self.handles[fh]
        if path is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        node = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not node.is_dir or part not in node.entries:
                raise mfusepy.FuseOSError(errno.ENOENT)
            node = node.entries[part]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._node(head or "/")
        if not parent.is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return parent, name

    def _new(self, is_dir: bool) -> Node:
        node = Node(self.next_ino, is_dir)
        self.next_ino += 1
        return node

    def _handle(self, node: Node) -> int:
        handle = self.next_handle
        self.next_handle += 1
        self.handles[handle] = node
        return handle

    # -- operations ---------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self.mutex:
            node = self._node(path, fh)
            mode = (stat.S_IFDIR | 0o755) if node.is_dir else (stat.S_IFREG | 0o644)
            return {"st_mode": mode, "st_nlink": node.nlink, "st_size": node.size,
                    "st_blocks": node.blocks(), "st_ino": node.ino, "st_mtime": node.mtime_ns,
                    "st_ctime": node.mtime_ns, "st_atime": node.mtime_ns,
                    "st_uid": os.getuid(), "st_gid": os.getgid()}

    def readdir(self, path: str, fh: int) -> list[str]:
        with self.mutex:
            return [".", "..", *self._node(path).entries]

    def mkdir(self, path: str, mode: int) -> int:
        with self.mutex:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise mfusepy.FuseOSError(errno.EEXIST)
            parent.entries[name] = self._new(True)
            parent.nlink += 1
            return 0

    def rmdir(self, path: str) -> int:
        with self.mutex:
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if not node.is_dir:
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            if node.entries:
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            del parent.entries[name]
            parent.nlink -= 1
            return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self.mutex:
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                node = parent.entries[name] = self._new(False)
            return self._handle(node)

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            node = self._node(path)
            if flags & os.O_TRUNC:
                node.truncate(0)
            return self._handle(node)

    def opendir(self, path: str) -> int:
        with self.mutex:
            return self._handle(self._node(path))

    def release(self, path: str, fh: int) -> int:
        with self.mutex:
            self.handles.pop(fh, None)
            return 0

    def releasedir(self, path: str, fh: int) -> int:
        return self.release(path, fh)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            return self._node(path, fh).read(size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            self._node(path, fh).write(data, offset)
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self.mutex:
            self._node(path, fh).truncate(length)
            return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        with self.mutex:
            node = self._node(path, fh)
            if mode & ~0x01:  # only plain allocation and FALLOC_FL_KEEP_SIZE
                raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
            if not mode & 0x01 and offset + size > node.size:
                node.size = offset + size  # the new range reads as zeros
            return 0

    def unlink(self, path: str) -> int:
        with self.mutex:
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if node.is_dir:
                raise mfusepy.FuseOSError(errno.EISDIR)
            del parent.entries[name]
            return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            old_parent, old_name = self._parent(old)
            new_parent, new_name = self._parent(new)
            node = old_parent.entries.get(old_name)
            if node is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            target = new_parent.entries.get(new_name)
            if target is not None and target.is_dir and target.entries:
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            del old_parent.entries[old_name]
            new_parent.entries[new_name] = node
            if node.is_dir and old_parent is not new_parent:
                old_parent.nlink -= 1
                new_parent.nlink += 1
            return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            node = self._node(path, fh)
            if node.is_dir:
                self._sync_dir(node)
            else:
                self._sync_file(node)
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            self._sync_dir(self._node(path, fh))
            return 0

    def flush(self, path: str, fh: int) -> int:
        return 0  # close() writes nothing back: only fsync does

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 24, "f_bfree": 1 << 23,
                "f_bavail": 1 << 23, "f_files": 1 << 20, "f_ffree": 1 << 19, "f_namemax": 255}

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        return 0

    def chmod(self, path: str, mode: int) -> int:
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def access(self, path: str, amode: int) -> int:
        with self.mutex:
            self._node(path)
            return 0


def main() -> None:
    image, mount_point = Path(sys.argv[1]), sys.argv[2]
    logging.basicConfig(level=logging.WARNING)
    filesystem = PowerFS(image)
    mfusepy.FUSE(filesystem, mount_point, foreground=True, nothreads=True, hard_remove=True,
                 fsname="powerfs", default_permissions=True)


if __name__ == "__main__":
    main()
