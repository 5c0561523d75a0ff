"""attnrewrite: find every attention computation in a PyTorch model, prove it, rewrite it.

Public API (the rest of the package is internal):

- ``torch.compile(model, backend="attnrewrite", options={"to": "softmax"})``
- :func:`explain` — what the pass finds in a model, and why it skipped what it skipped
- :func:`rewrite` — decorator / wrapper that makes a module run rewritten
- :func:`convert` — attach a kind's per-site parameters (learned feature maps ...) before compiling;
  :func:`converted_attention` — a converted site's attention called eagerly (inside context parallelism)
- :func:`distill` — from a pretrained softmax model to another kind: attention transfer, then
  low-rank fine-tuning against the original's outputs
- :func:`verify` — run the model once and prove which attention actually executed
- :mod:`attnrewrite.ops` — the attention kinds as ``torch.library`` custom ops
- :mod:`attnrewrite.kinds` — the kinds a site can be rewritten to
- :class:`SummaryCache`, :class:`HashedCache`, :class:`SlidingCache` — KV caches that decode with the
  ``summary``, ``hashed`` and ``sliding_window`` kinds (transformers ``Cache`` subclasses, also taken by
  the llama target's ``generate``)
"""

from attnrewrite import kinds, ops
from attnrewrite.distill import distill
from attnrewrite.ir.spec import AttentionSpec
from attnrewrite.rewriter.backend import attnrewrite_backend, register
from attnrewrite.rewriter.convert import convert, converted_attention
from attnrewrite.rewriter.decorator import explain, rewrite
from attnrewrite.rewriter.failures import RewriteFailed, RewriteWarning
from attnrewrite.rewriter.report import Report, SiteReport, recent_reports
from attnrewrite.rewriter.verify import Verification, verify

__version__ = "0.1.0"

# The caches subclass transformers' Cache: imported on first use, so that importing attnrewrite
# does not import transformers.
_LAZY = {"SummaryCache": "attnrewrite.decode.summary", "HashedCache": "attnrewrite.decode.hashed",
         "SlidingCache": "attnrewrite.decode.sliding"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnrewrite' has no attribute {name!r}")


__all__ = [
    "AttentionSpec",
    "HashedCache",
    "Report",
    "RewriteFailed",
    "RewriteWarning",
    "SiteReport",
    "SlidingCache",
    "SummaryCache",
    "Verification",
    "attnrewrite_backend",
    "convert",
    "converted_attention",
    "distill",
    "explain",
    "kinds",
    "ops",
    "recent_reports",
    "register",
    "rewrite",
    "verify",
]
