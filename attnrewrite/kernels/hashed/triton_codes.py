"""Triton kernel for hashed attention's codes: signs of x·P, bit-packed into bytes.

The layout is that of :func:`attnrewrite.kernels.hashed.codes.pack`: bit b of a code is bit b % 8 of
byte b // 8, [B, H, T, bits / 8] uint8.  The products x·P are accumulated in float64 as the torch path
takes them, one head dimension after the other, so the two paths give the same bits except where
x·P lies within float64 rounding of 0 (different summation orders; for real data a probability near
2⁻⁵⁰ per bit).  One program packs BLOCK_T tokens of one (batch, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import head_strides


@triton.jit
def hashed_codes_kernel(X, P, Out, length, heads,
                        stride_xb, stride_xh, stride_xt, stride_xd,
                        stride_ph, stride_pd,
                        stride_ob, stride_oh, stride_ot,
                        D: tl.constexpr, N_BYTES: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)  # batch offsets may pass 2**31 elements
    h = pid_bh % heads
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_byte = tl.arange(0, BLOCK_BYTES)
    offs_bit = tl.arange(0, 8)
    column = offs_byte[:, None] * 8 + offs_bit[None, :]                        # [BYTES, 8]: bit index b
    column_ok = (offs_byte < N_BYTES)[:, None]
    t_ok = offs_t < length
    x_base = X + b * stride_xb + h * stride_xh + offs_t * stride_xt
    p_base = P + h * stride_ph + column
    acc = tl.zeros((BLOCK_T, BLOCK_BYTES, 8), dtype=tl.float64)
    for d in range(D):  # in order, in float64: as the torch path sums (up to its BLAS's order)
        x = tl.load(x_base + d * stride_xd, mask=t_ok, other=0.0).to(tl.float64)
        p = tl.load(p_base + d * stride_pd, mask=column_ok, other=0.0)
        acc += x[:, None, None] * p[None, :, :]
    weight = (1 << offs_bit).to(tl.int32)
    packed = tl.sum((acc > 0).to(tl.int32) * weight[None, None, :], axis=2)    # [T, BYTES]
    out = Out + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_byte[None, :]
    tl.store(out, packed.to(tl.uint8), mask=t_ok[:, None] & (offs_byte < N_BYTES)[None, :])


def pack_codes(x: torch.Tensor, projection: torch.Tensor, config: dict | None = None,
               launch=lambda kernel: kernel) -> torch.Tensor:
    """Codes [B, H, T, bits / 8] uint8 of x [B, H, T, D] under a float64 projection [D, bits] (shared)
    or [H, D, bits] (one per head), bit for bit as :func:`attnrewrite.kernels.hashed.codes.pack`.

    ``config``: {"BLOCK_T": ..., "num_warps": ...} (default: 32 tokens, 4 warps).
    """
    batch, heads, length, dim = x.shape
    bits = projection.shape[-1]
    if projection.dtype != torch.float64:
        raise TypeError(f"hashed codes: the projection must be float64 (as codes.projections gives), got "
                        f"{projection.dtype}")
    if bits % 8:
        raise ValueError(f"hashed codes: bits must be a multiple of 8, got {bits}")
    n_bytes = bits // 8
    config = config or {"BLOCK_T": 32, "num_warps": 4}
    out = torch.empty(batch, heads, length, n_bytes, dtype=torch.uint8, device=x.device)
    if out.numel() == 0:
        return out
    projection = projection.contiguous()
    stride_ph = projection.stride(0) if projection.dim() == 3 else 0
    grid = (triton.cdiv(length, config["BLOCK_T"]), batch * heads)
    launch(hashed_codes_kernel)[grid](
        x, projection, out, length, heads,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        stride_ph, projection.stride(-2),
        *head_strides(out),
        D=dim, N_BYTES=n_bytes, BLOCK_BYTES=triton.next_power_of_2(n_bytes), BLOCK_T=config["BLOCK_T"],
        num_warps=config["num_warps"])
    return out
