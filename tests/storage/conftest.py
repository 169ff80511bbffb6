"""Storage test setup: makes the shared helpers importable as `storage_testlib`.

--import-mode=importlib keeps test directories off sys.path, so the helper module is loaded by
path here, before the test modules of this directory are collected.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("storage_testlib", Path(__file__).with_name("storage_testlib.py"))
assert _spec and _spec.loader
storage_testlib = importlib.util.module_from_spec(_spec)
sys.modules["storage_testlib"] = storage_testlib
_spec.loader.exec_module(storage_testlib)


@pytest.fixture
def small():  # type: ignore[no-untyped-def]
    """A config with 4 KiB segments, 256-byte index interval, no time-based behaviour."""
    return storage_testlib.small_config()
