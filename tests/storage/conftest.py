"""Storage test setup: makes the shared helpers importable as `storage_testlib`.

--import-mode=importlib keeps test directories off sys.path, so the helper module is loaded by
path here, before the test modules of this directory are collected.
"""

from __future__ import annotations

import pytest

import storage_testlib


@pytest.fixture
def small():  # type: ignore[no-untyped-def]
    """A config with 4 KiB segments, 256-byte index interval, no time-based behaviour."""
    return storage_testlib.small_config()
