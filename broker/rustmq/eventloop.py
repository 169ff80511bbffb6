"""Which event loop runs the broker and the command-line clients: uvloop when installed.

uvloop's socket paths and timers shorten the broker's latency tail and raise its request rate
(docs/benchmarks.md); it is an optional dependency (``rustmq[uvloop]``, installed by
scripts/setup and in the broker image), so its absence only means the standard asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, uvloop_wanted: bool = True) -> T:
    """Run `main` to completion on uvloop when wanted and importable, else on asyncio's loop."""
    if uvloop_wanted:
        try:
            import uvloop
        except ImportError:
            logging.getLogger(__name__).info("uvloop is not installed: using the asyncio event loop")
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def name() -> str:
    """'uvloop' or 'asyncio': the loop running the caller (for benchmark reports)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
