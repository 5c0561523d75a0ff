"""The exact kind: softmax attention, with the semantics of ``F.scaled_dot_product_attention``."""

from attnrewrite.kernels.softmax.op import sink_softmax_attention, softmax_attention

__all__ = ["sink_softmax_attention", "softmax_attention"]
