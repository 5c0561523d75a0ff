"""The pattern tests reuse the rewriter tests' helpers (``check_rewrite``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rewriter"))
