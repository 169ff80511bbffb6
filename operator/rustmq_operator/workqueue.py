"""A keyed, delaying, de-duplicating work queue for reconcile passes (asyncio).

kopf delivers watch events for the CR and for every child; many of them concern the same
cluster within milliseconds (a pod's status, the StatefulSet's status, the Service's ingress).
Queuing the cluster's key instead of the event collapses them into one pass, a key is never
processed by two workers at once, and a pass can ask to run again after a delay (progress
checks, periodic drift checks). This is the shape of controller-runtime's work queue; kopf has
no equivalent for "reconcile the parent when a child changes".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)


class WorkQueue(Generic[Key]):
    def __init__(self) -> None:
        self._due: dict[Key, float] = {}
        self._processing: set[Key] = set()
        self._changed = asyncio.Event()

    def add(self, key: Key, delay: float = 0.0) -> None:
        """Ask for a pass over ``key`` in ``delay`` seconds (earlier requests win)."""
        due = time.monotonic() + max(delay, 0.0)
        self._due[key] = min(self._due.get(key, due), due)
        self._changed.set()

    def forget(self, key: Key) -> None:
        self._due.pop(key, None)

    def __len__(self) -> int:
        return len(self._due)

    async def get(self) -> Key:
        """Wait for the earliest due key that no other worker is processing, and claim it."""
        while True:
            now = time.monotonic()
            ready = [(due, key) for key, due in self._due.items() if key not in self._processing]
            if ready:
                due, key = min(ready, key=lambda item: item[0])
                if due <= now:
                    del self._due[key]
                    self._processing.add(key)
                    return key
                timeout: float | None = due - now
            else:
                timeout = None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    def done(self, key: Key) -> None:
        self._processing.discard(key)
        self._changed.set()
