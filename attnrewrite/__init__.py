"""attnrewrite: find every attention computation in a PyTorch model, prove it, rewrite it.

Public API (the rest of the package is internal):

- ``torch.compile(model, backend="attnrewrite", options={"to": "softmax"})``
- :func:`explain` — what the pass finds in a model, and why it skipped what it skipped
- :func:`rewrite` — decorator / wrapper that makes a module run rewritten
- :mod:`attnrewrite.ops` — the attention kinds as ``torch.library`` custom ops
"""

__version__ = "0.1.0"
