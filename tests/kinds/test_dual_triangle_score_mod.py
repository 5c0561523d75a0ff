"""dual_triangle with a score modification (soft-capping and other programs of ``kernels/score_mods.py``).

The program is applied to scale · q kᵀ before the mask and each triangle's softmax, as the canonical form orders
them.  The op is checked against the written-out oracle (``naive_dual_triangle_attention`` with the modification
as a plain function) in every output and gradient; a soft-capped bidirectional encoder rewritten to dual_triangle
equals the same encoder written by hand with the two triangles, output and parameter gradients; a modification
without a program is skipped with the reason.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn as nn

from attnrewrite.kernels.dual_triangle.public import dual_triangle_attention
from attnrewrite.kernels.dual_triangle.reference import naive_dual_triangle_attention
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

B, T, E, H = 2, 7, 32, 4
D = E // H
CAP = 2.0  # small enough that the cap changes the scores of these inputs


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


#: program text: the same modification as a plain function of the scores
PROGRAMS = {
    "div 2.0; tanh; mul 2.0": lambda s: torch.tanh(s / 2.0) * 2.0,
    "mul 0.5; tanh; mul 3.0; clamp -2.0 none": lambda s: (torch.tanh(s * 0.5) * 3.0).clamp(min=-2.0),
    "abs; add 1.0; rdiv 2.0": lambda s: 2.0 / (s.abs() + 1.0),
    "sigmoid; mul 4.0": lambda s: torch.sigmoid(s) * 4.0,
}


def _masks(name: str):
    keep = torch.rand(B, 1, 1, T, generator=_gen(name)) > 0.3
    keep[..., 0] = True  # (every row of a past head sees key 0; future heads may see nothing: 0)
    return {"none": None, "bool_padding": keep,
            "float_bias": torch.randn(1, H, T, T, generator=_gen(name + "f"), dtype=torch.float64)}


@pytest.mark.parametrize("mask_name", ["none", "bool_padding", "float_bias"])
@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("kv_heads,past_heads", [(H, None), (H // 2, 1), (H, H)], ids=["mha", "gqa_1past", "all_past"])
def test_op_with_a_program_equals_the_written_out_oracle_outputs_and_gradients(program, mask_name, kv_heads,
                                                                                past_heads):
    name = f"{program}{mask_name}{kv_heads}{past_heads}"
    q = torch.randn(B, H, T, D, generator=_gen(name + "q"), dtype=torch.float64) * 2
    k, v = (torch.randn(B, kv_heads, T, D, generator=_gen(name + n), dtype=torch.float64) * 2 for n in "kv")
    mask = _masks(name)[mask_name]
    inputs = [q, k, v] + ([mask] if mask is not None and mask.is_floating_point() else [])
    for x in inputs:
        x.requires_grad_()
    got = dual_triangle_attention(q, k, v, mask, scale=0.4, enable_gqa=kv_heads != H, past_heads=past_heads,
                                  score_mod=program)
    want = naive_dual_triangle_attention(q, k, v, mask, scale=0.4, past_heads=past_heads, score_mod=PROGRAMS[program])
    assert_close_rel(got, want, 1e-10, "output")
    plain = naive_dual_triangle_attention(q, k, v, mask, scale=0.4, past_heads=past_heads)
    assert float((want - plain).abs().max()) > 1e-3 * float(plain.abs().max()), "the modification changed nothing"
    weights = torch.randn(got.shape, generator=_gen(name + "w"), dtype=torch.float64)
    for x, g, w in zip(inputs, torch.autograd.grad((got * weights).sum(), inputs),
                       torch.autograd.grad((want * weights).sum(), inputs), strict=True):
        assert_close_rel(g, w, 1e-9, f"gradient of a {tuple(x.shape)} input")


def test_op_in_float32_with_a_program_is_within_twice_the_plain_torch_error():
    """float32 against the float64 oracle: at most 2 × the error of the oracle itself run in float32, plus rounding."""
    q, k, v = (torch.randn(B, H, T, D, generator=_gen("f32" + n), dtype=torch.float64) * 2 for n in "qkv")
    mod = PROGRAMS["div 2.0; tanh; mul 2.0"]
    exact = naive_dual_triangle_attention(q, k, v, score_mod=mod)
    f32 = [x.float() for x in (q, k, v)]
    got = dual_triangle_attention(*f32, score_mod="div 2.0; tanh; mul 2.0")
    torch_err = float((naive_dual_triangle_attention(*f32, score_mod=mod).double() - exact).abs().max())
    err = float((got.double() - exact).abs().max())
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_op_refuses_a_program_that_is_not_one():
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="frobnicate"):
        dual_triangle_attention(q, k, v, score_mod="frobnicate 2.0")


# --------------------------------------------------------------------------- rewriting a soft-capped encoder


class Encoder(nn.Module):
    """Bidirectional self-attention with Gemma-2's soft-capping and a key padding mask.  ``form="dual"``: the same
    model written by hand with dual-triangle attention (heads < H/2: j ≤ i, the others j ≥ i)."""

    def __init__(self, form: str = "softmax"):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.form = form

    def forward(self, x, keep):  # keep [B, T] bool
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # [B, H, T, D] each
        s = torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / CAP) * CAP
        visible = keep[:, None, None, :]
        if self.form == "dual":
            i, j = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
            triangle = torch.stack([j <= i if h < H // 2 else j >= i for h in range(H)])  # [H, T, T]
            visible = visible & triangle
        p = torch.softmax(s.masked_fill(~visible, -math.inf), dim=-1)
        if self.form == "dual":  # a future head's last rows may see only padding: 0, as the op gives
            p = p.nan_to_num(0.0)
        return self.out((p @ v).transpose(1, 2).reshape(B, T, E))


def test_a_soft_capped_encoder_rewritten_to_dual_triangle_equals_it_written_by_hand():
    torch._dynamo.reset()
    torch.manual_seed(7)
    model, by_hand = Encoder(), Encoder("dual")
    by_hand.load_state_dict(model.state_dict())
    x = torch.randn(B, T, E, generator=_gen("enc x")) * 3
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, -2:] = False
    report = Report(to="dual_triangle")
    got = compile_rewritten(model, report, to="dual_triangle", strict=True)(x, keep)
    want = by_hand(x, keep)
    (site,) = report.sites
    assert site.status == "rewritten", report
    assert_close_rel(got, want, 1e-5, "output")
    params = list(model.parameters())
    for (label, _), g, w in zip(model.named_parameters(), torch.autograd.grad(got.square().sum(), params),
                                torch.autograd.grad(want.square().sum(), list(by_hand.parameters())), strict=True):
        assert_close_rel(g, w, 1e-4, f"gradient of {label}")


def test_a_modification_without_a_program_is_skipped_by_dual_triangle_with_the_reason():
    class TensorCapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cap", torch.tensor(CAP))

        def forward(self, q, k, v):
            return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * D**-0.5) * self.cap, dim=-1) @ v

    torch._dynamo.reset()
    q, k, v = (torch.randn(B, H, T, D, generator=_gen("t" + n)) for n in "qkv")
    report = Report(to="dual_triangle")
    compile_rewritten(TensorCapped(), report, to="dual_triangle")(q, k, v)
    (site,) = report.sites
    assert site.status == "skipped" and "not a constant number" in site.reason, report
