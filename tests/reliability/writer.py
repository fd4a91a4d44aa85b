"""A writer process for the subprocess trials: ``python -m tests.reliability.writer ROOT SAVES MAX_ELEMENTS``.

It saves SAVES steps after the newest committed one, printing ``A <step>`` once each is durable. Fault points are
armed by the environment (``SAFEPOINT_FAULTS``), exactly as a user's CI would arm them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.reliability.suites import _safepoint_loop

if __name__ == "__main__":
    _safepoint_loop(sys.stdout.fileno(), Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
