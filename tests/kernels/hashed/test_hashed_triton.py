"""The Triton path of hashed attention (``impl="triton"``; under ``TRITON_INTERPRET=1`` on the CPU) against
the reference: codes bit for bit with the torch packing, the selected sets equal to the reference's,
outputs and gradients by name (GQA, masks, padding, decode-shaped calls), and the impl switch's rules.

Shapes are tiny: the interpreter runs one program at a time."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.hashed import public
from attnrewrite.kernels.hashed.codes import pack, random_hyperplanes
from attnrewrite.kernels.hashed.reference import naive_hashed_attention

triton_ops = pytest.importorskip("attnrewrite.kernels.hashed.triton_ops")
from attnrewrite.kernels.hashed.triton_codes import pack_codes  # noqa: E402
from attnrewrite.kernels.hashed.triton_select import select_keys  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_ops.interpreter_active(),
                                reason="the kernels need a GPU or TRITON_INTERPRET=1")


def _inputs(b=1, hq=4, hkv=2, tq=12, tk=12, d=8, dv=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)  # noqa: E731
    return make(b, hq, tq, d), make(b, hkv, tk, d), make(b, hkv, tk, dv)


def _mask(name, b, tq, tk):
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(b, 1, tq, tk, generator=g) > 0.3
    if name == "none":
        return None
    if name == "bool":
        return keep.to(DEVICE)
    if name == "padding":  # left padding of the last sequence, as a [B, 1, 1, Tk] mask
        pad = torch.ones(b, 1, 1, tk, dtype=torch.bool)
        pad[-1, ..., :3] = False
        return pad.to(DEVICE)
    bias = 0.5 * torch.randn(b, 1, tq, tk, generator=g)
    return bias.masked_fill(~keep, float("-inf")).to(DEVICE)  # "additive"


@pytest.mark.parametrize("bits,per_head", [(8, False), (24, False), (64, True)])
def test_codes_equal_the_torch_packing_bit_for_bit(bits, per_head):
    x = _inputs(b=2, hq=3, tq=37, d=16)[0]
    plane = random_hyperplanes(16, bits, 3)
    if per_head:  # one projection per head, as hash="learned" has them
        plane = plane + 0.1 * torch.randn(3, 16, bits, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plane = plane.to(DEVICE)
    got = pack_codes(x.transpose(1, 2).contiguous().transpose(1, 2), plane)  # a strided x
    want = pack(x, plane)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want)


# (b, hq, hkv, tq, tk, causal, mask, top_k, window, sinks, bits)
CASES = [
    (1, 4, 2, 12, 12, True, "none", 3, 2, 1, 16),       # GQA: one selection per group
    (2, 2, 2, 12, 12, True, "padding", 2, 3, 2, 8),     # padding: masked keys are never chosen
    (1, 2, 1, 10, 10, False, "additive", 4, 1, 1, 24),  # a float mask: excluded keys and a bias
    (1, 2, 2, 1, 25, False, "bool", 5, 3, 2, 32),       # a decoding query against a cache
    (1, 2, 2, 9, 9, True, "none", 20, 0, 0, 8),         # top_k beyond the keys: all visible keys
]


def _reference(q, k, v, mask, causal, top_k, window, sinks, bits):
    plane = random_hyperplanes(q.shape[-1], bits, 0)
    return naive_hashed_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                  None if mask is None else mask.cpu(), causal, top_k=top_k, window=window,
                                  sinks=sinks, proj_q=plane, proj_k=plane)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[5] and 'causal' or 'cross'}-{c[6]}-g{c[1] // c[2]}" for c in CASES])
def test_selection_output_and_gradients_equal_the_reference(case):
    b, hq, hkv, tq, tk, causal, mask_name, top_k, window, sinks, bits = case
    q, k, v = _inputs(b, hq, hkv, tq, tk)
    mask = _mask(mask_name, b, tq, tk)
    want, chosen = _reference(q, k, v, mask, causal, top_k, window, sinks, bits)

    # the selection, slot order aside
    plane = random_hyperplanes(q.shape[-1], bits, 0).to(DEVICE)
    keep, _ = triton_ops.mask_views(mask)
    index = select_keys(pack_codes(q, plane), pack_codes(k, plane), keep, causal, top_k, window, sinks)
    got_sets = [[[sorted(j for j in row if j >= 0) for row in head] for head in batch] for batch in index.tolist()]
    assert got_sets == chosen

    # outputs and gradients by name (through a random weighting of the output)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.hashed_attention(*leaves, mask, is_causal=causal, enable_gqa=True, bits=bits, top_k=top_k,
                               window=window, sinks=sinks, impl="triton")
    torch.testing.assert_close(out.double().cpu(), want, rtol=0, atol=2e-6)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got_grads = torch.autograd.grad((out.double().cpu() * weights).sum(), leaves)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out, _ = naive_hashed_attention(*ref_leaves, None if mask is None else mask.cpu(), causal, top_k=top_k,
                                        window=window, sinks=sinks, proj_q=plane.cpu(), proj_k=plane.cpu())
    want_grads = torch.autograd.grad((ref_out * weights).sum(), ref_leaves)
    for name, got_g, want_g in zip("qkv", got_grads, want_grads):
        assert want_g.abs().max() > 1e-3, name
        torch.testing.assert_close(got_g.double().cpu(), want_g, rtol=0, atol=5e-6, msg=f"gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    """16-bit inputs: the same selection (codes of the rounded inputs), outputs within the dtype's rounding."""
    q, k, v = _inputs(1, 4, 2, 12, 12, dtype=dtype)
    kw = dict(is_causal=True, enable_gqa=True, bits=16, top_k=3, window=2, sinks=1)
    got = ops.hashed_attention(q, k, v, impl="triton", **kw)
    want = ops.hashed_attention(q, k, v, impl="torch", **kw)
    assert got.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)


def test_empty_selection_gives_zeros_and_no_gradient():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 6, 6))
    out = ops.hashed_attention(q, k, v, is_causal=True, bits=8, top_k=0, window=0, sinks=0, impl="triton")
    assert not out.any()
    out.sum().backward()
    assert not q.grad.any() and not k.grad.any() and not v.grad.any()


def test_impl_rules(monkeypatch):
    q, k, v = _inputs(1, 2, 2, 6, 6)
    with pytest.raises(ValueError, match="impl must be"):
        ops.hashed_attention(q, k, v, impl="fast")
    # hash="learned" runs on the kernels (test_learned_triton.py)
    with pytest.raises(ValueError, match="float64"):
        ops.hashed_attention(q.double(), k.double(), v.double(), impl="triton")

    def refuse(*args, **kwargs):
        raise AssertionError("the kernels ran")

    monkeypatch.setattr(triton_ops, "hashed_attention_triton", refuse)
    if DEVICE == "cpu":  # "auto" runs the torch path on the CPU
        ops.hashed_attention(q, k, v, is_causal=True, bits=8, top_k=1, window=1, sinks=1)
    with pytest.raises(AssertionError, match="the kernels ran"):  # "triton" never falls back
        ops.hashed_attention(q, k, v, is_causal=True, bits=8, top_k=1, window=1, sinks=1, impl="triton")
    monkeypatch.setattr(public, "_triton", None)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        ops.hashed_attention(q, k, v, impl="triton")


@pytest.mark.parametrize("padded", [False, True])
def test_decode_over_the_cache_equals_the_reference(padded):
    """The split decode kernels over a HashedLayer's stores (keys, values, packed codes): the reference's
    selection and output for a query after every key; several pieces, ties across pieces."""
    from attnrewrite.decode.hashed import HashedLayer
    from attnrewrite.kernels.hashed.triton_decode import decode_select, hashed_decode

    q, k, v = _inputs(2, 4, 2, 1, 45, d=8, dv=6, seed=4)
    valid = None
    if padded:
        valid = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
        valid[1, :7] = False   # left padding
        valid[0, 20:23] = False
    layer = HashedLayer(bits=8, top_k=6, window=3, sinks=2)
    layer.append(k, v, valid)
    length = layer.length
    keys, values = layer.key_store[:, :, :length], layer.value_store[:, :, :length]
    codes = layer.code_store[:, :, :length]
    config = {"SPLIT": 16, "BLOCK_N": 8, "num_warps": 4}
    mask = None if valid is None else valid[:, None, None, :]
    want, chosen = _reference(q, k, v, mask, False, 6, 3, 2, 8)
    index = decode_select(pack_codes(q, layer.proj_q), codes, valid, 6, 3, 2, config)
    got_sets = [[[sorted(j for j in row if j >= 0) for row in head] for head in batch] for batch in index.tolist()]
    assert got_sets == chosen
    out = hashed_decode(q, keys, values, codes, layer.proj_q, 8 ** -0.5, 6, 3, 2, valid, config)
    torch.testing.assert_close(out.double().cpu(), want, rtol=0, atol=2e-6)


def test_tuning_declarations():
    """The spaces' defaults fit every shape they are fitted to, the workloads cover every kernel with the
    shapes the launchers bucket by, and a table written from them validates (nothing is launched)."""
    from attnrewrite.kernels import tuning
    from attnrewrite.kernels.hashed import spaces, tune

    assert "hashed" in tuning.TUNABLE_KINDS
    workloads = list(tune.workloads(quick=True))
    assert {w.space.kernel for w in workloads} == set(spaces.SPACES)
    assert len(workloads) < len(list(tune.workloads(quick=False)))
    for w in workloads:
        assert set(w.shape) == {"D", "DV", "G", "bits", "Tq", "Tk", "dtype"}
        assert w.space.valid(spaces.fit(w.space.kernel, w.space.default, w.shape), w.shape)
    q, k, v = _inputs(1, 4, 2, 12, 12)
    assert spaces.shape_of(q, k, v, 16) == {"D": 8, "DV": 6, "G": 2, "bits": 16, "Tq": 12, "Tk": 12, "dtype": "float32"}
    table = {"schema": tuning.SCHEMA_VERSION, "kind": "hashed", "device": "test", "kernels": {
        w.space.kernel: {w.space.bucket(w.shape): {"config": dict(w.space.default), "ms": 1.0}} for w in workloads}}
    assert tuning.validate_table(table, spaces.SPACES) == []
    # a large group at D = 128 is moved off the default to a point without spills (bench/hashed_aot.py)
    big = dict(workloads[0].shape, G=8)
    assert spaces.fit("bwd", spaces.SPACES["bwd"].default, big) != dict(spaces.SPACES["bwd"].default)
