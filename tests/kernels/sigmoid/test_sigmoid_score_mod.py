"""Score modifications in sigmoid attention: the program language, the torch path and the Triton kernels
(under TRITON_INTERPRET=1), outputs and gradients by name against plain torch written here."""

from __future__ import annotations


import pytest
import torch

from attnrewrite.kernels import score_mods
from attnrewrite.kernels.sigmoid import sigmoid_attention_dispatch
from attnrewrite.ops import sigmoid_attention
from attnrewrite.testing.checks import record_kernel_launches
from sigmoid_testing import BIAS, masked_inputs, plain_sigmoid, seeded

#: (program, the same function written in plain torch)
PROGRAMS = {
    "softcap": ("div 5.0; tanh; mul 5.0", lambda s: torch.tanh(s / 5.0) * 5.0),
    "sigmoid": ("mul 0.5; add 1.0; sigmoid; mul 4.0; add -2.0", lambda s: torch.sigmoid(s * 0.5 + 1.0) * 4.0 - 2.0),
    "exp": ("mul 0.25; exp; neg", lambda s: -torch.exp(s * 0.25)),
    "abs": ("add 0.5; abs", lambda s: (s + 0.5).abs()),
    "relu": ("relu; mul 2.0", lambda s: torch.relu(s) * 2.0),
    "erf": ("div 2.0; erf; mul 3.0", lambda s: torch.erf(s / 2.0) * 3.0),
    "square": ("mul 0.5; square; neg", lambda s: -((s * 0.5) ** 2)),
    "affine": ("neg", lambda s: -s),
    # more than one nonlinear step, clamp, pow, rdiv: generated into the kernels (attnrewrite.kernels.triton_score_mods)
    "chain": ("div 4.0; tanh; mul 4.0; clamp -2.0 none; pow 2.0; add 1.0; rdiv 2.0",
              lambda s: 2.0 / (torch.clamp(torch.tanh(s / 4.0) * 4.0, min=-2.0) ** 2 + 1.0)),
    "softcap_sigmoid": ("div 5.0; tanh; mul 5.0; sigmoid; mul 3.0", lambda s: torch.sigmoid(torch.tanh(s / 5.0) * 5.0) * 3.0),
    "square_tanh": ("mul 0.5; square; tanh; mul 2.0", lambda s: torch.tanh((s * 0.5) ** 2) * 2.0),
    "clamp_exp": ("clamp -1.0 1.5; exp; neg", lambda s: -torch.exp(torch.clamp(s, -1.0, 1.5))),
    "pow": ("mul 0.5; pow 3.0; add 1.0", lambda s: (s * 0.5) ** 3 + 1.0),
    # singular at 0 (an infinite derivative), the score of every padded row and column of a tile
    "root": ("abs; pow 0.5; mul 2.0", lambda s: s.abs() ** 0.5 * 2.0),
}
KERNEL_PROGRAMS = sorted(PROGRAMS)
GENERATED = [name for name, (text, _) in PROGRAMS.items() if score_mods.parse(text).affine_form() is None]



def _inputs(name, dtype, heads_q=4, heads_kv=2, len_q=9, len_k=11, dim=8):
    _, inputs = masked_inputs(name, heads_q, heads_kv, len_q, len_k, dim)
    return [t.to(dtype).requires_grad_() for t in inputs]


def _reference(q, k, v, mask, mod, causal, scale):
    """sigmoid(mod(scale·q·kᵀ) + mask + b)·v over visible keys, in plain torch (float64)."""
    return plain_sigmoid(q, k, v, scale, causal, mask, mod=mod)


def _check(name, impl, dtype, causal, tol, mask_grad=True):
    """Outputs and gradients by name; ``mask_grad=False``: the mask needs no gradient (the kernels' other
    backward branch), and only dq, dk, dv are compared."""
    text, mod = PROGRAMS[name]
    q, k, v, mask = _inputs(name + impl, dtype)
    out = sigmoid_attention_dispatch(q, k, v, mask if mask_grad else mask.detach(), is_causal=causal, scale=0.4,
                                     enable_gqa=True, bias=BIAS, impl=impl, score_mod=text)
    grad = torch.randn(out.shape, generator=seeded("grad" + name), dtype=torch.float64)
    inputs = (q, k, v, mask) if mask_grad else (q, k, v)
    got = dict(zip(("dq", "dk", "dv", "dmask"), torch.autograd.grad(out, inputs, grad.to(dtype))))
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    expected_out = _reference(*ref_inputs, mod, causal, 0.4)
    expected = dict(zip(("dq", "dk", "dv", "dmask"), torch.autograd.grad(expected_out, ref_inputs, grad)))
    torch.testing.assert_close(out.double(), expected_out, rtol=tol, atol=tol)
    for key in got:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")
    if mask_grad:
        assert torch.all(got["dmask"][..., 3] == 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_torch_path_applies_the_modification(name, causal):
    _check(name, "torch", torch.float64, causal, 1e-9)


@pytest.mark.parametrize("name", KERNEL_PROGRAMS)
def test_triton_kernels_apply_the_modification(name, monkeypatch):
    launches = record_kernel_launches(monkeypatch)
    _check(name, "triton", torch.float32, causal=name in ("softcap", "erf", "abs", "square_tanh", "root"), tol=2e-4)
    assert {kernel for kernel, _, _ in launches} == {"sigmoid_fwd_kernel", "sigmoid_bwd_dq_kernel",
                                                     "sigmoid_bwd_dkdv_kernel"}
    # one kernel per pass: a chain runs in a generated specialisation, a single step in the fixed table
    assert all(mod == PROGRAMS[name][0] and generated == (name in GENERATED) for _, mod, generated in launches)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_softcap_without_a_mask_gradient(causal):
    _check("softcap", "triton", torch.float32, causal=causal, tol=2e-4, mask_grad=False)


def test_triton_softcap_in_bfloat16_is_within_the_accuracy_of_plain_torch():
    text, mod = PROGRAMS["softcap"]
    q, k, v, mask = (t.detach().to(torch.bfloat16) for t in _inputs("bf16", torch.float64))
    out = sigmoid_attention_dispatch(q, k, v, mask, is_causal=True, scale=0.4, enable_gqa=True, bias=BIAS,
                                     impl="triton", score_mod=text)
    exact = _reference(*(t.double() for t in (q, k, v, mask)), mod, True, 0.4)
    plain = _reference(q, k, v, mask, mod, True, 0.4)
    assert (out.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_triton_chain_without_a_mask_gradient(causal):
    """The dQ kernel's other branch (mod' folded into p(1 − p) before the dP product) with a generated function."""
    _check("softcap_sigmoid", "triton", torch.float32, causal=causal, tol=2e-4, mask_grad=False)


def test_the_public_op_takes_the_program_and_checks_it():
    q, k, v, mask = (t.detach() for t in _inputs("public", torch.float32))
    text, mod = PROGRAMS["softcap"]
    out = sigmoid_attention(q, k, v, mask, scale=0.4, enable_gqa=True, bias=BIAS, score_mod=text)
    torch.testing.assert_close(out.double(), _reference(*(t.double() for t in (q, k, v, mask)), mod, False, 0.4),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown step 'cosh'"):
        sigmoid_attention(q, k, v, enable_gqa=True, score_mod="cosh")
    with pytest.raises(ValueError, match="takes 1 constant"):
        sigmoid_attention(q, k, v, enable_gqa=True, score_mod="mul")


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_program_text_round_trips_and_its_derivative_is_autograds(name):
    text, mod = PROGRAMS[name]
    program = score_mods.parse(text)
    assert score_mods.parse(program.text()) == program
    x = torch.linspace(-6, 6, 96, dtype=torch.float64).requires_grad_()  # not 0: |x|^0.5 has no derivative there
    y, d = program.with_grad(x)
    torch.testing.assert_close(y, mod(x))
    torch.testing.assert_close(d, torch.autograd.grad(mod(x).sum(), x)[0])
