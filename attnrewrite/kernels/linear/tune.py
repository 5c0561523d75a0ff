"""The workloads ``python -m attnrewrite tune --kind linear`` times the linear kernels on (see
:mod:`attnrewrite.kernels.tuning` for the protocol; the search spaces are in
:mod:`attnrewrite.kernels.linear.spaces`).

Importing this module defines no kernel (the workloads import them when called).
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..tuning import Workload
from .spaces import SPACES, dtype_name


_TOKENS_PER_BATCH = 32768  # batch = tokens / T, so every workload moves about the same data
_HEADS = 16


class _Inputs:
    """Random inputs and the forward's by-products for one workload shape, built on first use
    (on the GPU), shared by every kernel timed on that shape."""

    def __init__(self, T: int, d: int, dtype: torch.dtype):
        self.T, self.d, self.dtype = T, d, dtype
        self._built = None

    def get(self) -> dict:
        from .triton_common import direct_launches

        if self._built is None:
            with direct_launches():
                self._built = self._build()
        return self._built

    def _build(self) -> dict:
        from .bidirectional import bidirectional_linear_attn_fwd
        from .chunk_bwd import _Launch, bwd_gamma
        from .chunk_fwd import chunk_linear_attn_fwd

        batch, dev = max(1, _TOKENS_PER_BATCH // self.T), torch.device("cuda")
        q, k, v, do = (torch.randn(batch, _HEADS, self.T, self.d, device=dev, dtype=self.dtype) for _ in range(4))
        kw = dict(feature_map_id=0, scale=1.0, eps=1e-6, num_splits=1)
        out, inv_den, final_S, final_z, start_S, start_z = chunk_linear_attn_fwd(q, k, v, **kw)
        b_out, b_inv_den, S, z = bidirectional_linear_attn_fwd(q, k, v, **kw)
        return dict(q=q, k=k, v=v, do=do, inv_den=inv_den, gamma=bwd_gamma(do, out, inv_den), S=S, z=z,
                    start_S=start_S, start_z=start_z, b_inv_den=b_inv_den, b_gamma=bwd_gamma(do, b_out, b_inv_den),
                    launch=_Launch(q, k, v, do, 0, 1.0, None, None, batch, 1))


def _bench(kernel: str, inputs: _Inputs, config) -> "callable":
    from . import bidirectional as bi
    from . import chunk_bwd as cb
    from .chunk_fwd import chunk_linear_attn_fwd, chunk_state
    from .fused_recurrent import fused_recurrent_linear_attn

    x = inputs.get()
    q, k, v, do, L = x["q"], x["k"], x["v"], x["do"], x["launch"]
    one = dict(feature_map_id=0, num_splits=1)
    benches = {
        "chunk_fwd": lambda: chunk_linear_attn_fwd(q, k, v, scale=1.0, eps=1e-6, configs={"chunk_fwd": config}, **one),
        "chunk_state": lambda: chunk_state(k, v, num_seqs=q.shape[0], group=1, feature_map_id=0, scale=1.0,
                                           num_splits=4, config=config),
        "chunk_bwd_dq": lambda: cb.chunk_bwd_dq(L, x["inv_den"], x["gamma"], x["start_S"], x["start_z"], False, config),
        "chunk_bwd_dk": lambda: cb.chunk_bwd_dk(L, x["inv_den"], x["gamma"], None, None, config),
        "chunk_bwd_dv": lambda: cb.chunk_bwd_dv(L, x["inv_den"], None, config),
        "bidir_fwd": lambda: bi.bidir_out(q, x["S"], x["z"], heads_kv=k.shape[1], scale=1.0, eps=1e-6, config=config,
                                          **one),
        "bidir_bwd_dq": lambda: bi.bidir_bwd_dq(q, do, x["b_inv_den"], x["b_gamma"], x["S"], x["z"], scale=1.0,
                                                config=config, **one),
        "bidir_bwd_dk": lambda: bi.bidir_bwd_dk(k, v, x["S"], x["z"], heads_q=q.shape[1], config=config, **one),
        "bidir_bwd_dv": lambda: bi.bidir_bwd_dv(k, v, x["S"], heads_q=q.shape[1], config=config, **one),
        "recurrent_fwd": lambda: fused_recurrent_linear_attn(q[:, :, :1], k[:, :, :1], v[:, :, :1], x["S"], x["z"],
                                                             feature_map_id=0, scale=1.0, eps=1e-6, config=config),
    }
    from .triton_common import direct_launches

    def bench():
        with direct_launches():  # time the kernel, not the higher-order-op dispatch around it
            benches[kernel]()

    return bench


def workloads(quick: bool) -> Iterable[Workload]:
    """Every kernel on T ∈ {1k, 4k, 16k} × D ∈ {64, 128} × {bf16, fp16} (quick: T = 8k, D = 128, bf16),
    with batch = 32k tokens / T and 16 heads.  Inputs are allocated on the GPU when first timed."""
    if quick:
        shapes = [(8192, 128, torch.bfloat16)]
    else:
        shapes = [(t, d, dt) for t in (1024, 4096, 16384) for d in (64, 128) for dt in (torch.bfloat16, torch.float16)]
    for T, d, dtype in shapes:
        inputs = _Inputs(T, d, dtype)
        shape = {"N": max(1, _TOKENS_PER_BATCH // T), "Hq": _HEADS, "Hkv": _HEADS, "T": T, "Dk": d, "Dv": d,
                 "dtype": dtype_name(dtype)}
        for kernel, space in SPACES.items():
            yield Workload(space, shape, lambda config, kernel=kernel, inputs=inputs: _bench(kernel, inputs, config))
