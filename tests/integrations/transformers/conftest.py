"""Without the ``transformers`` extra these tests are not collected (and the TRL ones need ``trl`` too)."""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("transformers") else ["test_*.py"]
if importlib.util.find_spec("trl") is None:
    collect_ignore_glob.append("test_trl.py")
