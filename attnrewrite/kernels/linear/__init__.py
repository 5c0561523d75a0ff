"""Linear attention: chunked causal, bidirectional and recurrent-decode Triton kernels, a chunked
torch path, and the plain-torch oracles they are checked against.

Public:

- :func:`linear_attention_dispatch` — SDPA's signature plus ``feature_map``, ``eps``, ``kv_lens``,
  ``cu_seqlens``, ``initial_state``, ``output_final_state`` and ``impl``;
- :func:`linear_attention_decode` — continue from a :class:`LinearState` token by token;
- ``torch.ops.attnrewrite.linear_attn_fwd / linear_attn_bwd / linear_attn_decode`` — the CUDA
  (``triton_op``) ops behind ``impl="triton"``, with ``*_interpreted`` twins for the CPU interpreter.

Modules: ``reference`` (oracles), ``feature_maps``, ``chunk_torch`` (torch path), ``chunk_fwd`` /
``chunk_bwd`` / ``bidirectional`` / ``fused_recurrent`` (Triton, imported only when used), ``op``
(torch.library registration), ``tune`` (search spaces), ``tuning/`` (per-GPU tables).
"""

from . import op  # noqa: F401  (registers the torch.library ops)
from .api import LinearState, linear_attention_decode, linear_attention_dispatch
from .feature_maps import FEATURE_MAPS

__all__ = ["FEATURE_MAPS", "LinearState", "linear_attention_decode", "linear_attention_dispatch"]
