"""The exact kind: softmax attention, with the semantics of ``F.scaled_dot_product_attention``."""

from attnrewrite.kernels.softmax.op import softmax_attention

__all__ = ["softmax_attention"]
