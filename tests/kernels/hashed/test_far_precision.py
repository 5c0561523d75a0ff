"""``far_dtype`` of the hashed op, kind and cache: the selected keys and values that are not sinks or window
are used at a lower precision (round trip x.to(far_dtype).to(compute dtype)), the rest at full precision.

Off by default and then the same output as before; with it set, the op equals the reference with the far
keys rounded (forward and the straight-through backward), and differs from full precision; bad names are
refused by name; the Triton path refuses float8 (and ``impl="auto"`` takes the torch path)."""

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.hashed import sparse
from attnrewrite.kernels.hashed.codes import random_hyperplanes
from attnrewrite.kernels.hashed.op import FAR_DTYPES
from attnrewrite.kernels.hashed.reference import naive_hashed_attention
from attnrewrite.kinds.hashed import KIND
from attnrewrite.kinds.options import check_options

KW = dict(enable_gqa=True, bits=16, top_k=3, window=4, sinks=2)


def _inputs(t=19, dtype=torch.float64, grad=False, name="far"):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)  # noqa: E731
    return make(2, 4, t, 8), make(2, 2, t, 8), make(2, 2, t, 6)


def _mask(kind, t):
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    keep = torch.rand(2, 1, t, t, generator=g) > 0.25
    if kind == "bool":
        return keep
    if kind == "additive":
        return (0.5 * torch.randn(2, 1, t, t, generator=g, dtype=torch.float64)).masked_fill(~keep, float("-inf"))
    return None


def _reference(q, k, v, mask, causal, far_dtype):
    plane = random_hyperplanes(q.shape[-1], KW["bits"], 0)
    return naive_hashed_attention(q, k, v, mask, is_causal=causal, top_k=KW["top_k"], window=KW["window"],
                                  sinks=KW["sinks"], proj_q=plane, proj_k=plane, far_dtype=far_dtype)[0]


@pytest.mark.parametrize("csr", [True, False])
def test_off_by_default_is_the_old_output(csr, monkeypatch):
    """No far_dtype (the default, also the kind's) and far_dtype=None run the unchanged code: bit-identical,
    and equal to the reference without rounding."""
    monkeypatch.setattr(sparse, "USE_CSR", csr)
    q, k, v = _inputs()
    default = ops.hashed_attention(q, k, v, is_causal=True, **KW)
    assert torch.equal(ops.hashed_attention(q, k, v, is_causal=True, far_dtype=None, **KW), default)
    torch.testing.assert_close(default, _reference(q, k, v, None, True, None), rtol=0, atol=1e-13)
    assert check_options("hashed", KIND.options, {})["far_dtype"] is None


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("causal", [True, False])
def test_far_keys_rounded_as_the_reference(mask, causal, monkeypatch):
    monkeypatch.setattr(sparse, "BLOCK_ELEMENTS", 3000)  # several query blocks
    q, k, v = _inputs()
    attn_mask = _mask(mask, 19)
    full = ops.hashed_attention(q, k, v, attn_mask, is_causal=causal, **KW)
    for name in FAR_DTYPES:
        got = ops.hashed_attention(q, k, v, attn_mask, is_causal=causal, far_dtype=name, **KW)
        want = _reference(q, k, v, attn_mask, causal, getattr(torch, name))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
        assert (got - full).abs().max() > 1e-4, name  # the far keys did change


def test_sinks_and_window_stay_full_precision(monkeypatch):
    """With top_k=0 only sinks and window are selected: far_dtype changes nothing (both on the gathering path,
    which far_dtype takes)."""
    monkeypatch.setattr(sparse, "USE_CSR", False)
    q, k, v = _inputs()
    kw = dict(KW, top_k=0)
    full = ops.hashed_attention(q, k, v, is_causal=True, **kw)
    assert torch.equal(ops.hashed_attention(q, k, v, is_causal=True, far_dtype="float16", **kw), full)


def test_float32_inputs_bfloat16_far():
    q, k, v = _inputs(dtype=torch.float32)
    got = ops.hashed_attention(q, k, v, is_causal=True, far_dtype="bfloat16", **KW)
    torch.testing.assert_close(got, _reference(q, k, v, None, True, torch.bfloat16), rtol=1e-5, atol=1e-5)
    assert (got - ops.hashed_attention(q, k, v, is_causal=True, **KW)).abs().max() > 1e-4


@pytest.mark.parametrize("mask", ["none", "additive"])
def test_gradients_pass_straight_through(mask):
    """dq, dk, dv equal the reference's autograd, whose rounding has the identity as its derivative."""
    q, k, v = _inputs(grad=True)
    attn_mask = _mask(mask, 19)
    weight = torch.randn(2, 4, 19, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((ops.hashed_attention(q, k, v, attn_mask, is_causal=True, far_dtype="bfloat16",
                                                    **KW) * weight).sum(), (q, k, v))
    want = torch.autograd.grad((_reference(q, k, v, attn_mask, True, torch.bfloat16) * weight).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


def test_bad_names_refused():
    q, k, v = _inputs(t=5)
    for bad in ("int8", "float32", "bf16"):
        with pytest.raises(ValueError, match="far_dtype"):
            ops.hashed_attention(q, k, v, is_causal=True, far_dtype=bad, **KW)
    with pytest.raises(ValueError, match="option 'far_dtype' of kind 'hashed'"):
        check_options("hashed", KIND.options, {"far_dtype": "int8"})
    with pytest.raises(TypeError, match="option 'far_dtype' of kind 'hashed'"):
        check_options("hashed", KIND.options, {"far_dtype": torch.bfloat16})
    assert check_options("hashed", KIND.options, {"far_dtype": "bfloat16"})["far_dtype"] == "bfloat16"


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8_e4m3fn in this torch")
def test_triton_refuses_float8_and_auto_takes_the_torch_path():
    """The kernels round through bfloat16 and float16 (tests/kernels/hashed/test_far_triton.py), not float8."""
    q, k, v = _inputs(t=5, dtype=torch.float32)
    with pytest.raises(Exception, match="far_dtype='float8_e4m3fn'"):
        ops.hashed_attention(q, k, v, is_causal=True, far_dtype="float8_e4m3fn", impl="triton", **KW)
    torch.testing.assert_close(
        ops.hashed_attention(q, k, v, is_causal=True, far_dtype="float8_e4m3fn", impl="auto", **KW),
        ops.hashed_attention(q, k, v, is_causal=True, far_dtype="float8_e4m3fn", impl="torch", **KW), rtol=0, atol=0)
    assert KIND.supports is not None


def test_opcheck_with_far_dtype():
    q, k, v = _inputs(t=7, grad=True)
    args = (q, k, v, None, 0.0, True, None, True)
    kwargs = dict(bits=16, top_k=2, window=2, sinks=1, far_dtype="bfloat16")
    torch.library.opcheck(torch.ops.attnrewrite.hashed_attention_torch.default, args, kwargs)


def test_kind_option_reaches_the_op():
    """A model rewritten to hashed with far_dtype computes the op with far_dtype (and differs from without)."""
    import torch.nn.functional as F

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (x[:1, :2] for x in _inputs(t=40, dtype=torch.float32))
    kind = dict(top_k=3, window=4, sinks=1)
    outs = {}
    for far_dtype in (None, "bfloat16"):
        torch._dynamo.reset()
        options = dict(to="hashed", compiler="eager", strict=True, far_dtype=far_dtype, **kind)
        outs[far_dtype] = torch.compile(Attention(), backend="attnrewrite", options=options)(q, k, v)
    want = ops.hashed_attention(q, k, v, is_causal=True, far_dtype="bfloat16", **kind)
    torch.testing.assert_close(outs["bfloat16"], want, rtol=0, atol=0)
    assert (outs["bfloat16"] - outs[None]).abs().max() > 1e-4
