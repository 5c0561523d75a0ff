"""The Triton kernels (under TRITON_INTERPRET=1 on the CPU) against the fp64 recurrent oracle.

Outputs, final state and every gradient (q, k, v, initial state) are compared by name with a bound
of 2 × plain torch at the same precision (see _linear_testing.py).  bf16 is not checked here: the
interpreter's bf16 matmul is wrong; bench/gpu_checks/linear.py checks it on a GPU.
"""

import os

import pytest
import torch

from attnrewrite.kernels import tuning
from attnrewrite.kernels.linear import linear_attention_dispatch, linear_attention_decode
from attnrewrite.kernels.linear.op import ops_for
from attnrewrite.kernels.linear.reference import naive_quadratic_linear_attn, naive_recurrent_linear_attn
from attnrewrite.testing.numerics import assert_within_budget, error_budget, max_error, rounding_band

from _linear_testing import compare, make_qkv, make_state, results

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _api(causal, scale=1.0, feature_map="elu", **kw):
    """A compare() candidate running the public API with impl='triton'."""

    def candidate(q, k, v, state):
        to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
        out, final = linear_attention_dispatch(to(q), to(k), to(v), is_causal=causal, scale=scale, enable_gqa=True,
                                      feature_map=feature_map, initial_state=None if state is None else tuple(map(to, state)),
                                      output_final_state=True, impl="triton", **kw)
        return out.cpu(), final.S.cpu(), final.z.cpu()

    return candidate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("feature_map", ["elu", "relu", "identity"])
def test_matches_reference(feature_map, causal, dtype):
    q, k, v = make_qkv(tq=80, dk=32, dv=16, dtype=dtype, positive=feature_map == "identity")
    state = make_state(q.shape[0], k.shape[1], 32, 16)
    compare(_api(causal, scale=0.7, feature_map=feature_map), q, k, v, dtype=dtype, causal=causal, scale=0.7,
            feature_map=feature_map, state=state)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_query_groups_of_three(causal):
    q, k, v = make_qkv(batch=1, heads_q=6, heads_kv=2, tq=50, dk=16, dv=32)
    compare(_api(causal), q, k, v, dtype=torch.float32, causal=causal, state=make_state(1, 2, 16, 32))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_head_dims_that_are_not_powers_of_two(causal):
    """Padded feature columns must stay zero (elu+1 maps a padded 0 to 1)."""
    q, k, v = make_qkv(batch=1, tq=45, dk=24, dv=20)
    compare(_api(causal), q, k, v, dtype=torch.float32, causal=causal, state=make_state(1, 1, 24, 20))


def test_bidirectional_queries_and_keys_may_differ_in_length():
    q, k, v = make_qkv(tq=37, tk=90)
    compare(_api(False), q, k, v, dtype=torch.float32, causal=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("how", ["bool_mask", "additive_mask", "kv_lens"])
def test_key_padding(how, causal):
    q, k, v = make_qkv(tq=70)
    lens = torch.tensor([70, 41])
    keep = torch.arange(70)[None, :] < lens[:, None]
    if how == "bool_mask":
        kw = {"attn_mask": keep[:, None, None, :].to(DEVICE)}
    elif how == "additive_mask":
        kw = {"attn_mask": torch.zeros(2, 1, 1, 70).masked_fill(~keep[:, None, None, :], float("-inf")).to(DEVICE)}
    else:
        kw = {"kv_lens": lens.to(DEVICE)}
    compare(_api(causal, **kw), q, k, v, dtype=torch.float32, causal=causal, key_mask=keep)

    # padded keys change nothing and get exactly zero gradient
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 41:], v2[1, :, 41:] = 9.0, -9.0
    leaves = [x.clone().requires_grad_() for x in (q, k2, v2)]
    out = linear_attention_dispatch(*leaves, is_causal=causal, enable_gqa=True, impl="triton", **kw)
    torch.testing.assert_close(out, linear_attention_dispatch(q, k, v, is_causal=causal, enable_gqa=True, impl="triton", **kw))
    out.backward(torch.randn_like(out))
    assert leaves[1].grad[1, :, 41:].abs().max() == 0 and leaves[2].grad[1, :, 41:].abs().max() == 0
    assert leaves[1].grad[1, :, :41].abs().max() > 0


def _packed(lengths, dtype=torch.float32):
    total = sum(lengths)
    q, k, v = make_qkv(batch=1, tq=total, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_varlen_matches_per_sequence_reference(causal):
    lengths = [37, 0, 70, 21]
    q, k, v, cu = _packed(lengths)
    state = make_state(len(lengths), k.shape[1], q.shape[-1], v.shape[-1])
    bounds = cu.tolist()

    def per_sequence(fn, **kw):
        def run(q_, k_, v_, st):
            outs, Ss, zs = [], [], []
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                out, S, z = fn(q_[:, :, a:b], k_[:, :, a:b], v_[:, :, a:b], causal=causal,
                               initial_state=(st[0][i:i + 1], st[1][i:i + 1]), **kw)
                outs.append(out)
                Ss.append(S)
                zs.append(z)
            return torch.cat(outs, dim=2), torch.cat(Ss), torch.cat(zs)
        return run

    # the packed call against the oracle run sequence by sequence (compare's dense oracle would mix them)
    got = _api(causal, cu_seqlens=cu.to(DEVICE))
    oracle = per_sequence(naive_recurrent_linear_attn)
    plain = per_sequence(naive_quadratic_linear_attn, compute_dtype=torch.float32)
    _compare_three(got, oracle, plain, q, k, v, state)


def _compare_three(got_fn, oracle_fn, plain_fn, q, k, v, state):
    ref_out, ref_S, ref_z = oracle_fn(q.double(), k.double(), v.double(), tuple(t.double() for t in state))
    upstream = (torch.randn_like(ref_out), torch.randn_like(ref_S), torch.randn_like(ref_z))
    ref = results(oracle_fn, q, k, v, state, torch.float64, upstream)
    base = results(plain_fn, q, k, v, state, torch.float32, upstream)
    got = results(got_fn, q, k, v, state, torch.float32, upstream)
    for name, expected in ref.items():
        assert_within_budget(got[name], base[name], expected, torch.float32, name,
                             band=rounding_band(torch.float32, expected, length=k.shape[2]))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_sequence_split_into_segments(causal):
    """num_splits > 1 (what the launcher picks when batch × heads leave the GPU idle) gives the same
    function; 260 tokens make three 128-token segments, the last one partial."""
    q, k, v = make_qkv(batch=1, tq=260, dk=16, dv=16)
    state = make_state(q.shape[0], k.shape[1], 16, 16)
    fwd = ops_for(torch.device(DEVICE))[0]

    def candidate(q_, k_, v_, st):
        out, _, S, z, _, _ = fwd(q_, k_, v_, None, None, st[0], st[1], causal, "elu", 1.0, 1e-6, 3)
        return out, S, z

    compare(candidate, q, k, v, dtype=torch.float32, causal=causal, state=state)


@pytest.mark.parametrize("forward_splits,reverse_splits", [(1, 3), (3, 2)])
def test_backward_walks_its_own_segments(forward_splits, reverse_splits):
    """dk/dv cut the sequence into their own segments (fewer programs per kv head than the forward)."""
    from attnrewrite.kernels.linear.chunk_bwd import chunk_linear_attn_bwd
    from attnrewrite.kernels.linear.chunk_fwd import chunk_linear_attn_fwd

    q, k, v = make_qkv(batch=1, heads_q=4, heads_kv=2, tq=300, dk=16, dv=16)
    S0, z0 = make_state(1, 2, 16, 16)
    key_mask = (torch.rand(1, 300) > 0.2)
    def grads(fn, dtype, upstream=None):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, S0, z0)]
        out_, S_, z_ = fn(*leaves[:3], causal=True, key_mask=key_mask, initial_state=tuple(leaves[3:]))
        upstream = upstream or tuple(torch.randn_like(t, dtype=torch.float64) for t in (out_, S_, z_))
        loss = sum((t.double() * u).sum() for t, u in zip((out_, S_, z_), upstream))
        return torch.autograd.grad(loss, leaves), upstream

    expected, (d_out, d_S, d_z) = grads(naive_recurrent_linear_attn, torch.float64)
    plain, _ = grads(naive_quadratic_linear_attn, torch.float32, (d_out, d_S, d_z))
    mask8 = key_mask.to(torch.int8)
    out, inv_den, _, _, start_S, start_z = chunk_linear_attn_fwd(q, k, v, feature_map_id=0, scale=1.0, eps=1e-6,
                                                                 num_splits=forward_splits, key_mask=mask8,
                                                                 initial_S=S0, initial_z=z0)
    got = chunk_linear_attn_bwd(d_out.float(), q, k, v, out, inv_den, start_S, start_z, feature_map_id=0, scale=1.0,
                                has_start=True, d_final_S=d_S.float(), d_final_z=d_z.float(), key_mask=mask8,
                                reverse_splits=reverse_splits)
    for name, g, e, p in zip(["dq", "dk", "dv", "dS0", "dz0"], got, expected, plain):
        assert_within_budget(g, p, e, torch.float32, name, band=rounding_band(torch.float32, e, length=300))


@pytest.mark.parametrize("block", [16, 128])
def test_block_sizes(block, monkeypatch):
    """Chunks and value/key blocks both smaller and larger than the defaults."""
    config = {"BLOCK_T": block, "BLOCK_V": block, "BLOCK_K": block, "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(tuning, "choose", lambda kind, space, *a, **kw: {k: config[k] for k in space.axes})
    q, k, v = make_qkv(batch=1, tq=140, dk=32, dv=32)
    compare(_api(True), q, k, v, dtype=torch.float32, causal=True, state=make_state(1, 1, 32, 32))


def test_prefill_then_decode_agree():
    """One causal call over T tokens = a prefill over the first T0 + decoding the rest token by token
    (decode kernel) = the same prefill continued by a second chunked call through initial_state."""
    q, k, v = make_qkv(tq=75, dk=32, dv=16)
    t0 = 50
    kw = dict(is_causal=True, enable_gqa=True, output_final_state=True, impl="triton", scale=0.8)
    full, full_state = linear_attention_dispatch(q, k, v, **kw)
    _, state = linear_attention_dispatch(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], **kw)
    decoded = []
    dec_state = state
    for t in range(t0, 75):
        out, dec_state = linear_attention_decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], dec_state,
                                                 scale=0.8, impl="triton")
        decoded.append(out)
    second, second_state = linear_attention_dispatch(q[:, :, t0:], k[:, :, t0:], v[:, :, t0:], initial_state=state, **kw)
    three_at_once, _ = linear_attention_decode(q[:, :, t0:t0 + 3], k[:, :, t0:t0 + 3], v[:, :, t0:t0 + 3], state,
                                               scale=0.8, impl="triton")

    ref, ref_S, ref_z = naive_recurrent_linear_attn(q.double(), k.double(), v.double(), causal=True, scale=0.8)
    plain, _, _ = naive_quadratic_linear_attn(q, k, v, causal=True, scale=0.8)
    # one budget, from the whole sequence, for every way of computing its last 25 tokens
    bound = error_budget(plain, ref, torch.float32, band=rounding_band(torch.float32, ref, length=75))
    for name, got in [("one call", full[:, :, t0:]), ("token by token", torch.cat(decoded, dim=2)),
                      ("two chunked calls", second), ("three tokens at once", torch.cat([three_at_once], dim=2))]:
        err = max_error(got, ref[:, :, t0:t0 + got.shape[2]])
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"
    for name, st in [("one call", full_state), ("token by token", dec_state), ("two chunked calls", second_state)]:
        for part, got, expected in [("S", st.S, ref_S), ("z", st.z, ref_z)]:
            rel = ((got.double() - expected).abs().max() / expected.abs().max()).item()
            assert rel < 1e-5, f"{name} final {part}: relative error {rel:.2e}"


def test_launchers_run_outside_the_ops():
    """What eager decode on CUDA and the tuning workloads do: launch without the op around them."""
    from attnrewrite.kernels.linear.fused_recurrent import fused_recurrent_linear_attn
    from attnrewrite.kernels.linear.triton_common import direct_launches

    q, k, v = make_qkv(tq=1, dk=16, dv=16)
    S0, z0 = make_state(2, 1, 16, 16)
    with direct_launches():
        out, S, z = fused_recurrent_linear_attn(q, k, v, S0, z0, feature_map_id=0, scale=1.0, eps=1e-6)
    ref, ref_S, ref_z = naive_recurrent_linear_attn(q, k, v, causal=True, initial_state=(S0, z0))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(S, ref_S)
    torch.testing.assert_close(z, ref_z)


def test_decode_with_gradients_goes_through_the_differentiable_op():
    q, k, v = make_qkv(tq=3, dk=16, dv=16)
    state = make_state(2, 1, 16, 16)

    def candidate(q_, k_, v_, st):
        out, new = linear_attention_decode(q_, k_, v_, st, impl="triton")
        return out, new.S, new.z

    compare(candidate, q, k, v, dtype=torch.float32, causal=True, state=state)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_opcheck(causal):
    fwd, bwd, decode = ops_for(torch.device(DEVICE))
    q, k, v = make_qkv(batch=1, tq=20, dk=16, dv=16)
    S0, z0 = make_state(1, 1, 16, 16)
    key_mask = (torch.rand(1, 20) > 0.2).to(torch.int8)
    args = (q, k, v, key_mask, None, S0, z0, causal, "elu", 0.9, 1e-6, 1)
    torch.library.opcheck(fwd, tuple(x.clone().requires_grad_() if x is q or x is S0 else x for x in args))
    out, inv_den, S, z, seg_S, seg_z = fwd(*args)
    grads = (torch.randn_like(out), torch.randn_like(S), None)
    torch.library.opcheck(bwd, (*grads, q, k, v, out, inv_den, S, z, seg_S, seg_z, key_mask, None, causal, "elu",
                                0.9, True, 1))
    if causal:
        torch.library.opcheck(decode, (q[:, :, :1], k[:, :, :1], v[:, :, :1], S, z, "relu", 0.9, 1e-6))


def test_interpreter_op_runs_under_torch_compile():
    q, k, v = make_qkv(batch=1, tq=40, dk=16, dv=16)
    fn = lambda *a: linear_attention_dispatch(*a, is_causal=True, enable_gqa=True, impl="triton")  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(q, k, v), fn(q, k, v))
