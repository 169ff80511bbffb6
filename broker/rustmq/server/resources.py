"""File descriptors and memory maps: raise what can be raised at start, refuse before running out.

A broker holds one descriptor per connection plus those of its segments, and one or more memory
maps per segment. Running out of either fails at an arbitrary point (accept, a segment roll in
the middle of an append), so the server checks first, with headroom, and answers with a clear
error instead: new connections get TOO_MANY_CONNECTIONS, new topics and partitions and produce
requests (which may roll a segment) get LIMIT_REACHED.

Counting is Linux /proc (``/proc/self/fd``, ``/proc/self/maps``), cached for a short interval so
a burst of accepts or produces does not re-read it every time; elsewhere nothing is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from pathlib import Path

log = logging.getLogger(__name__)

FD_COUNT_TTL_S = 0.2
MAP_COUNT_TTL_S = 1.0
MAX_MAP_COUNT_FILE = Path("/proc/sys/vm/max_map_count")


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, error)
    return soft


def read_max_map_count() -> int | None:
    try:
        return int(MAX_MAP_COUNT_FILE.read_text().strip())
    except (OSError, ValueError):
        return None


def _count_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError as error:
        if error.errno in (errno.EMFILE, errno.ENFILE):
            # Hazard: listing the directory itself needs a descriptor, so a process at its limit
            # cannot count; that is the case the guard exists for, so report it as full.
            return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return None


def _count_maps() -> int | None:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


class ResourceGuard:
    """Answers "is there room for one more connection / more segments?" from cached counts."""

    def __init__(self, fd_limit: int | None, map_limit: int | None, fd_headroom: int, map_headroom: int) -> None:
        self.fd_limit = fd_limit
        self.map_limit = map_limit
        self.fd_headroom = fd_headroom
        self.map_headroom = map_headroom
        self._fds: tuple[float, int | None] = (-1e9, None)
        self._maps: tuple[float, int | None] = (-1e9, None)

    @classmethod
    def for_process(cls, fd_headroom: int, map_headroom: int) -> ResourceGuard:
        fd_limit = raise_nofile_limit()
        map_limit = read_max_map_count()
        log.info("open files limit %d, vm.max_map_count %s", fd_limit, map_limit)
        return cls(fd_limit, map_limit, fd_headroom, map_headroom)

    def fds_in_use(self) -> int | None:
        now = time.monotonic()
        checked, used = self._fds
        # Near the limit the cached count is not trusted: a burst of connections within one TTL
        # could otherwise carry the process past the headroom to the limit itself.
        near = (used is not None and self.fd_limit is not None
                and used + 2 * self.fd_headroom >= self.fd_limit)
        if near or now - checked >= FD_COUNT_TTL_S:
            self._fds = (now, _count_fds())
        return self._fds[1]

    def maps_in_use(self) -> int | None:
        now = time.monotonic()
        if now - self._maps[0] >= MAP_COUNT_TTL_S:
            self._maps = (now, _count_maps())
        return self._maps[1]

    def connection_refusal(self) -> str | None:
        """Why a new connection must be refused, or None."""
        used = self.fds_in_use()
        if self.fd_limit is None or used is None:
            return None
        if used + self.fd_headroom >= self.fd_limit:
            return f"{used} of {self.fd_limit} file descriptors in use ({self.fd_headroom} kept free)"
        return None

    def segment_refusal(self, new_segments: int = 0) -> str | None:
        """Why new segments (topics, partitions, or a produce that may roll) must be refused."""
        used = self.maps_in_use()
        if self.map_limit is None or used is None:
            return None
        if used + self.map_headroom + 3 * new_segments >= self.map_limit:
            return (f"{used} of vm.max_map_count {self.map_limit} memory maps in use "
                    f"({self.map_headroom} kept free)")
        fds = self.fds_in_use()
        if self.fd_limit is not None and fds is not None and fds + self.fd_headroom + 3 * new_segments >= self.fd_limit:
            return f"{fds} of {self.fd_limit} file descriptors in use ({self.fd_headroom} kept free)"
        return None

    def forget(self) -> None:
        """Counts changed a lot (a topic was created or deleted): count again next time."""
        self._fds = self._maps = (-1e9, None)
