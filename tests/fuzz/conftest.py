"""Fuzz tests (hypothesis; bounded: a few seconds per target). strategies.py is imported by name.

A coverage-guided run by hand: tests/fuzz/atheris_harness.py (its docstring has the command).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
