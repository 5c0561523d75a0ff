"""The attention kinds as operators, all with the signature of ``F.scaled_dot_product_attention``
(layout [B, H, T, D]) plus each kind's own keyword options."""

from attnrewrite.kernels.softmax import softmax_attention

__all__ = ["softmax_attention"]
