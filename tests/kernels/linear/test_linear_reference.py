"""The oracles agree with each other, and the chunked torch path (the CPU path) agrees with them."""

import pytest
import torch

from attnrewrite.kernels.linear import LinearState, linear_attention_dispatch, linear_attention_decode
from attnrewrite.kernels.linear.chunk_torch import _pairs_cheaper, chunk_linear_attn_torch
from attnrewrite.kernels.linear.feature_maps import FEATURE_MAPS, apply_feature_map
from attnrewrite.kernels.linear.reference import naive_quadratic_linear_attn, naive_recurrent_linear_attn

from _linear_testing import compare, make_qkv, make_state


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_quadratic_and_recurrent_forms_agree(causal, feature_map):
    q, k, v = make_qkv(tq=23, dk=8, dv=6, dtype=torch.float64, positive=feature_map == "identity")
    key_mask = torch.rand(q.shape[0], k.shape[2]) > 0.3
    state = tuple(t.double() for t in make_state(q.shape[0], k.shape[1], 8, 6))
    leaves = [x.requires_grad_() for x in (q, k, v, *state)]
    kw = dict(causal=causal, feature_map=feature_map, scale=0.6, key_mask=key_mask, initial_state=tuple(leaves[3:]))
    quad = naive_quadratic_linear_attn(*leaves[:3], **kw)
    rec = naive_recurrent_linear_attn(*leaves[:3], **kw)
    upstream = [torch.randn_like(t) for t in quad]
    grads = [torch.autograd.grad(sum((t * u).sum() for t, u in zip(res, upstream)), leaves) for res in (quad, rec)]
    for name, a, b in zip(["out", "S", "z"], quad, rec):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    for name, a, b in zip(["dq", "dk", "dv", "dS0", "dz0"], *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_reference_semantics_on_a_single_key():
    """With one valid key every query that sees it returns that key's value (up to eps)."""
    q, k, v = make_qkv(batch=1, heads_q=1, heads_kv=1, tq=5, dk=4, dv=3, dtype=torch.float64)
    key_mask = torch.tensor([[False, False, True, False, False]])
    out, S, z = naive_recurrent_linear_attn(q, k, v, causal=False, key_mask=key_mask, eps=1e-12)
    torch.testing.assert_close(out[0, 0], v[0, 0, 2].expand(5, 3))
    torch.testing.assert_close(S[0, 0], apply_feature_map(k[0, 0, 2], "elu")[:, None] * v[0, 0, 2][None, :])
    causal_out, _, _ = naive_recurrent_linear_attn(q, k, v, causal=True, key_mask=key_mask, eps=1e-12)
    torch.testing.assert_close(causal_out[0, 0, 2:], v[0, 0, 2].expand(3, 3))
    assert causal_out[0, 0, :2].abs().max() == 0  # nothing visible yet: 0 / eps


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_reference(causal, dtype):
    q, k, v = make_qkv(tq=77, dtype=dtype)
    key_mask = torch.rand(q.shape[0], k.shape[2]) > 0.2
    state = make_state(q.shape[0], k.shape[1], q.shape[-1], v.shape[-1])

    def candidate(q_, k_, v_, st):
        out, final = linear_attention_dispatch(q_, k_, v_, torch.where(key_mask, 0.0, float("-inf"))[:, None, None, :],
                                      is_causal=causal, scale=0.7, enable_gqa=True, initial_state=st,
                                      output_final_state=True, impl="torch")
        return out, final.S, final.z

    compare(candidate, q, k, v, dtype=dtype, causal=causal, scale=0.7, key_mask=key_mask, state=state)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_gradcheck_float64(causal):
    q, k, v = make_qkv(batch=1, heads_q=2, heads_kv=1, tq=9, dk=3, dv=2, dtype=torch.float64)
    S0, z0 = (t.double() for t in make_state(1, 1, 3, 2))
    leaves = [x.requires_grad_() for x in (q, k, v, S0, z0)]

    def fn(q_, k_, v_, s_, z_):
        out, st = linear_attention_dispatch(q_, k_, v_, is_causal=causal, enable_gqa=True, initial_state=(s_, z_),
                                   output_final_state=True, impl="torch")
        return out, st.S, st.z

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("tq, tk", [(12, 12), (5, 9), (9, 0)])
def test_short_bidirectional_calls_take_the_quadratic_form_with_the_linear_forms_result(tq, tk):
    """Without the final state, a short bidirectional call with many features computes the weights of every
    query-key pair (fewer multiply-adds there than φ(k)ᵀv and φ(q)·S): output and gradients are the linear
    form's (float64: to rounding), padded keys and grouped query heads included."""
    q, k, v = make_qkv(batch=2, heads_q=4, heads_kv=2, tq=tq, tk=tk, dk=64, dv=16, dtype=torch.float64)
    key_mask = torch.rand(2, tk, generator=torch.Generator().manual_seed(1)) > 0.3
    assert _pairs_cheaper(2 * tq, tk, 64, 16)
    results, grads = [], []
    for final_state in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, S, z = chunk_linear_attn_torch(*leaves, causal=False, scale=0.7, key_mask=key_mask,
                                            final_state=final_state)
        assert (S is None and z is None) == (not final_state)  # the quadratic form keeps no state
        results.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaves,
                                         allow_unused=True))
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["dq", "dk", "dv"], *grads):
        if a is None or b is None:  # no key: nothing reaches k, v in either form
            assert tk == 0 and name != "dq" or a is b, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    # hedgehog's sizes in float32 (2·256 features, head dim 32, 16 tokens): to float32 rounding
    q, k, v = make_qkv(batch=2, heads_q=3, heads_kv=3, tq=16, dk=512, dv=32, positive=True)
    linear, _, _ = chunk_linear_attn_torch(q, k, v, causal=False, feature_map="identity")
    quadratic, S, _ = chunk_linear_attn_torch(q, k, v, causal=False, feature_map="identity", final_state=False)
    assert S is None
    torch.testing.assert_close(quadratic, linear, rtol=1e-5, atol=1e-6)
    # long sequences keep the linear form, with or without the state
    q, k, v = make_qkv(tq=200, dk=64, dv=8, dtype=torch.float64)
    assert not _pairs_cheaper(2 * 200, 200, 64, 8)
    assert chunk_linear_attn_torch(q, k, v, causal=False, final_state=False)[1] is not None


def test_torch_path_chunk_size_does_not_change_the_result():
    q, k, v = make_qkv(tq=70, dtype=torch.float64)
    results = [chunk_linear_attn_torch(q, k, v, causal=True, chunk_size=c) for c in (1, 16, 64, 128)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _saved_bytes(T: int) -> int:
    """Bytes autograd keeps for the backward of one causal call of length T."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    q, k, v = (x.requires_grad_() for x in make_qkv(batch=1, heads_q=2, heads_kv=2, tq=T, dk=16, dv=16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_attention_dispatch(q, k, v, is_causal=True, impl="torch")
    return total


def test_torch_path_memory_is_linear_in_T():
    small, large = _saved_bytes(512), _saved_bytes(2048)
    assert large <= 4.2 * small, f"saved tensors grow faster than T: {small} B at T=512, {large} B at T=2048"


def test_torch_path_traces_with_torch_compile():
    q, k, v = make_qkv(tq=40)
    compiled = torch.compile(lambda *a: linear_attention_dispatch(*a, is_causal=True, enable_gqa=True, impl="torch"),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), linear_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True,
                                                                   impl="torch"))


def test_torch_decode_continues_a_prefill():
    q, k, v = make_qkv(tq=30, dtype=torch.float64)
    full, final = linear_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, output_final_state=True, impl="torch")
    _, state = linear_attention_dispatch(q[:, :, :20], k[:, :, :20], v[:, :, :20], is_causal=True, enable_gqa=True,
                                output_final_state=True, impl="torch")
    outs = []
    for t in range(20, 30):
        out, state = linear_attention_decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, impl="torch")
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), full[:, :, 20:])
    assert isinstance(state, LinearState)
    torch.testing.assert_close(state.S, final.S)
    torch.testing.assert_close(state.z, final.z)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_varlen_matches_per_sequence_calls(causal):
    lengths = [13, 0, 40, 5]
    cu = torch.tensor([0, 13, 13, 53, 58], dtype=torch.int32)
    q, k, v = make_qkv(batch=1, tq=58, dtype=torch.float64)
    S0, z0 = (t.double() for t in make_state(4, 1, q.shape[-1], v.shape[-1]))
    out, state = linear_attention_dispatch(q, k, v, is_causal=causal, enable_gqa=True, cu_seqlens=cu, initial_state=(S0, z0),
                                  output_final_state=True, impl="torch")
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref, S, z = naive_recurrent_linear_attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=causal,
                                                initial_state=(S0[i:i + 1], z0[i:i + 1]))
        torch.testing.assert_close(out[:, :, a:b], ref)
        torch.testing.assert_close(state.S[i:i + 1], S)
        torch.testing.assert_close(state.z[i:i + 1], z)
    assert lengths[1] == 0 and torch.equal(state.S[1], S0[1])  # an empty sequence passes its state through
