import sys
from pathlib import Path

# the rewriter tests' helpers (compile_rewritten ...) are shared with this folder
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rewriter"))
sys.modules.setdefault("rewrite_helpers_path", __import__("rewrite_helpers"))
