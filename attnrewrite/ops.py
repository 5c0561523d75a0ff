"""The attention kinds as operators, all with the signature of ``F.scaled_dot_product_attention``
(layout [B, H, T, D]) plus each kind's own keyword options.

- :func:`softmax_attention` — exact (SDPA semantics; also takes is_causal with a mask)
- :func:`sink_softmax_attention` — exact, with learned sink logits (gpt-oss: one zero-value key per head)
- :func:`sigmoid_attention` — Σ sigmoid(s·q·kᵀ + b)·v, ``bias="auto"`` (b = −log n) or a number
- :func:`linear_attention` — φ(q)·Σφ(k)ᵀv / φ(q)·Σφ(k) (feature maps elu, relu, or your own)
- :func:`summary_attention` — a window of chunks in full, one summary key/value per older chunk
- :func:`hashed_attention` — exact softmax over sinks, a recent window and the top-k keys by code agreement
- :func:`dual_triangle_attention` — the first heads see j ≤ i, the others j ≥ i (softmax in each triangle)
- :func:`sliding_window_attention` — exact softmax over the last ``window`` keys (+ ``sinks`` first keys)
"""

from attnrewrite.kernels.dual_triangle.public import dual_triangle_attention
from attnrewrite.kernels.hashed.public import hashed_attention
from attnrewrite.kernels.linear.public import linear_attention
from attnrewrite.kernels.sigmoid.public import sigmoid_attention
from attnrewrite.kernels.sliding_window.public import sliding_window_attention
from attnrewrite.kernels.softmax.op import sink_softmax_attention, softmax_attention
from attnrewrite.kernels.summary.public import summary_attention

__all__ = ["dual_triangle_attention", "hashed_attention", "linear_attention", "sigmoid_attention",
           "sink_softmax_attention", "sliding_window_attention", "softmax_attention", "summary_attention"]
