"""``attnrewrite::sigmoid_attention``, the public sigmoid op: SDPA's signature plus ``bias``.

``CompositeImplicitAutograd`` over :func:`attnrewrite.kernels.sigmoid.api.sigmoid_attention_dispatch`, so it
decomposes into the kernel ops underneath — the Triton ``triton_op``s on CUDA (visible to
inductor, with their fake implementations and autograd), the chunked torch path elsewhere.
"""

from __future__ import annotations

import torch

from attnrewrite.kernels._ops import composite_op, sdpa_autocast, sdpa_schema
from attnrewrite.kernels.sigmoid.api import sigmoid_attention_dispatch


def _impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, bias=None,
          score_mod=None, impl="auto", position_slopes=None, position=None):
    return sigmoid_attention_dispatch(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                      bias="auto" if bias is None else bias, score_mod=score_mod, impl=impl,
                                      position_slopes=position_slopes, position=position)


# bias=None stands for "auto": a schema argument has one type, and a number is the common case
composite_op("sigmoid_attention", sdpa_schema('float? bias=None, str? score_mod=None, str impl="auto", '
                                                    'Tensor? position_slopes=None, str? position=None'), _impl)
sdpa_autocast("sigmoid_attention")  # q/k in fp32 beside a bf16 v run in bf16, as SDPA does


def sigmoid_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                      bias: str | float = "auto", score_mod: str | None = None, impl: str = "auto",
                      position_slopes: torch.Tensor | None = None, position: str | None = None) -> torch.Tensor:
    """Sigmoid attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    out_i = Σ_j sigmoid(mod(scale·q_i·k_j) + attn_mask_ij + b)·v_j over the keys query i may see; masked
    and padded keys contribute exactly 0, and a query that sees no key gets 0.

    Args:
        q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa: as in SDPA (``is_causal`` may be
            combined with ``attn_mask``; Tq may differ from Tk).
        bias: ``"auto"``: each query i has its own b_i = −log(n_i), n_i = the keys i itself sees
            (causal, padding, a mask's excluded keys: False in a bool mask, ≤ −9000 in a float one:
            −inf, the dtype's lowest value as HF's masks write a masked key, BERT's −10000).  So a causal or padding
            mask given as a mask counts as ``is_causal``/padding do, a token's output does not
            depend on the tokens after it, and a causal prefill's row i equals a decoding step of
            that token against the same keys.  A number sets b.
        score_mod: the score modification mod as a program of elementwise steps
            (:mod:`attnrewrite.kernels.score_mods`), e.g. soft-capping ``"div 50.0; tanh; mul 50.0"``;
            None for none (mod(s) = s).  Gradients flow through it.
        impl: ``"auto"`` (the Triton kernels on CUDA for 16-bit inputs, the torch path otherwise),
            ``"triton"`` (the kernels or an error naming why; on the CPU under ``TRITON_INTERPRET=1``)
            or ``"torch"``, as :func:`attnrewrite.kernels.sigmoid.api.sigmoid_attention_dispatch` takes it.
        position_slopes, position: a bias computed from the query and key positions i, j instead of read
            from a [Tq, Tk] mask: ``position="j-i"`` adds position_slopes[h]·(j − i) (ALiBi), ``"|j-i|"``
            adds position_slopes[h]·|j − i|; ``position_slopes`` holds Hq floats and must not require grad.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype.  Inside ``torch.autocast`` the floating-point inputs (float64
        excepted) are cast to the autocast dtype first and the output has it, as with SDPA.
    """
    if not (bias == "auto" or isinstance(bias, (int, float)) and not isinstance(bias, bool)):
        raise ValueError(f"bias must be 'auto' or a number, got {bias!r}")
    return torch.ops.attnrewrite.sigmoid_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                   bias=None if bias == "auto" else float(bias), score_mod=score_mod,
                                                   impl=impl, position_slopes=position_slopes, position=position)
