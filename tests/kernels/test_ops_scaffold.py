"""The op scaffold (attnrewrite.kernels._ops): one schema for SDPA's arguments, one rule for impl=."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels._ops import resolve_impl, sdpa_schema
from attnrewrite.kernels.checks import DtypeMismatchError, check_qkv, key_padding_mask
from attnrewrite.kernels.linear import linear_attention_dispatch
from attnrewrite.kernels.sigmoid import sigmoid_attention_dispatch

SDPA_OPS = ["softmax_attention", "sigmoid_attention", "linear_attention", "summary_attention", "hashed_attention"]


def test_sdpa_schema_reads_like_sdpa():
    assert sdpa_schema() == ("(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
                             "bool is_causal=False, float? scale=None, bool enable_gqa=False) -> Tensor")
    assert sdpa_schema("int n=1", is_causal=True).endswith("bool is_causal=True, float? scale=None, "
                                                           "bool enable_gqa=False, int n=1) -> Tensor")


@pytest.mark.parametrize("name", SDPA_OPS)
def test_every_public_op_starts_with_sdpas_arguments(name):

    args = getattr(torch.ops.attnrewrite, name).default._schema.arguments
    got = [(a.name, str(a.type)) for a in args[:8]]
    assert got == [("q", "Tensor"), ("k", "Tensor"), ("v", "Tensor"), ("attn_mask", "Optional[Tensor]"),
                   ("dropout_p", "float"), ("is_causal", "bool"), ("scale", "Optional[float]"),
                   ("enable_gqa", "bool")]


CPU = torch.device("cpu")
RULE = dict(what="x", dtype=torch.float16, head_dims=(64, 64), triton_dtypes=(torch.float16,))


def test_auto_takes_the_kernels_on_cuda_only_when_they_fit():
    assert resolve_impl("auto", CPU, **RULE) == "torch"
    assert resolve_impl("auto", torch.device("cuda"), **RULE) == "triton"
    assert resolve_impl("auto", torch.device("cuda"), **{**RULE, "head_dims": (64, 512)}) == "torch"
    assert resolve_impl("auto", torch.device("cuda"), refusal="no dropout", **RULE) == "torch"
    assert resolve_impl("auto", torch.device("cuda"), available=False, **RULE) == "torch"


@pytest.mark.parametrize("change,error,message", [
    (dict(impl="cuda"), ValueError, "x: impl must be 'auto', 'triton' or 'torch', got 'cuda'"),
    (dict(available=False), RuntimeError, r"x\(impl='triton'\): triton is not installed"),
    (dict(refusal="no dropout"), ValueError, r"x\(impl='triton'\): no dropout; use impl='torch'"),
    (dict(dtype=torch.float64), ValueError, r"x\(impl='triton'\): the kernels take float16, got torch.float64"),
    (dict(head_dims=(64, 512)), ValueError, r"head dims up to 256 are supported, got \(64, 512\)"),
    (dict(), RuntimeError, "set TRITON_INTERPRET=1"),
    (dict(device=torch.device("meta")), RuntimeError, "the kernels run on CUDA devices"),
])
def test_an_explicit_triton_never_falls_back(change, error, message):
    kwargs = dict(RULE, impl="triton", device=CPU)
    kwargs.update(change)
    with pytest.raises(error, match=message):
        resolve_impl(kwargs.pop("impl"), kwargs.pop("device"), **kwargs)


@pytest.mark.parametrize("dispatch,what", [(sigmoid_attention_dispatch, "sigmoid attention"),
                                           (linear_attention_dispatch, "linear attention")])
def test_both_kinds_word_their_refusals_alike(dispatch, what):
    q = k = v = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"^{what}\(impl='triton'\): the kernels take float16, bfloat16 or "
                                         "float32, got torch.float64"):
        dispatch(q, k, v, impl="triton")
    with pytest.raises(ValueError, match=rf"^{what}: impl must be 'auto', 'triton' or 'torch'"):
        dispatch(q, k, v, impl="gpu")


# --------------------------------------------------------------------------- one exception type per fault

PUBLIC = {
    "softmax attention": lambda *a, **kw: ops.softmax_attention(*a, **kw),
    "sigmoid attention": lambda *a, **kw: ops.sigmoid_attention(*a, **kw),
    "linear attention": lambda *a, **kw: ops.linear_attention(*a, **kw),
    "summary attention": lambda *a, **kw: ops.summary_attention(*a, **kw),
    "hashed attention": lambda *a, **kw: ops.hashed_attention(*a, **kw),
}


def _qkv():
    return torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)


@pytest.mark.parametrize("what", list(PUBLIC))
@pytest.mark.parametrize("fault,error,message", [
    (lambda q, k, v: ((q.long(), k.long(), v.long()), {}), TypeError, "q must be floating point, got torch.int64"),
    # SDPA's type for it (RuntimeError), still a ValueError as every other inconsistency here
    (lambda q, k, v: ((q, k.double(), v), {}), DtypeMismatchError, "q, k, v must share a dtype"),
    (lambda q, k, v: ((q, k[..., :8], v), {}), ValueError, "q and k head dims differ: 16 vs 8"),
    (lambda q, k, v: ((q, k, v), {"enable_gqa": False}), ValueError, "pass enable_gqa=True"),
    (lambda q, k, v: ((q[:, :3], k, v), {}), ValueError, r"query heads \(3\) to be a multiple of key/value heads"),
    (lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(2, 1, 1, 8, dtype=torch.int32)}), TypeError,
     "attn_mask must be bool or floating point"),
], ids=["integer", "dtypes differ", "head dims", "gqa off", "gqa heads", "mask dtype"])
def test_every_kind_raises_one_type_per_fault(what, fault, error, message):
    """The checks of attnrewrite.kernels.checks, shared: same fault, same type, same words, in every kind."""
    args, kwargs = fault(*_qkv())
    kwargs.setdefault("enable_gqa", True)
    with pytest.raises(error, match=f"^{what}: .*{message}") as caught:
        PUBLIC[what](*args, **kwargs)
    assert type(caught.value) is error


def test_a_non_tensor_is_a_type_error():
    """(The public ops' schemas refuse a non-tensor before any check runs; the dispatchers and the
    checks themselves see it.)"""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="^x: v must be a tensor, got list"):
        check_qkv(q, k, v.tolist(), "x")
    with pytest.raises(TypeError, match="^sigmoid attention: k must be a tensor, got NoneType"):
        sigmoid_attention_dispatch(q, None, v)


def test_key_padding_mask_is_the_key_axis():
    keep = torch.tensor([True, True, False])
    assert key_padding_mask(keep, 2, 3, "x").shape == (1, 3)
    assert key_padding_mask(keep.expand(2, 1, 1, 3), 2, 3, "x").shape == (2, 3)
    with pytest.raises(ValueError, match="^x: attn_mask of shape \\(3, 3\\) is not a key-padding mask"):
        key_padding_mask(torch.ones(3, 3, dtype=torch.bool), 2, 3, "x")
