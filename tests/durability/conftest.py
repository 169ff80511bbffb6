"""Power-loss tests: powerfs.py and powercut.py in this directory are imported by name."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
