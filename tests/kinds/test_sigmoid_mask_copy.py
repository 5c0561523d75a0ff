"""A rewritten sigmoid site hands an additive [B, H, T, T] mask to the op as it is: the op itself leaves
entries <= MASKED_SCORE out of bias="auto"'s count, so no per-forward copy turns them into -inf."""

import math

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.kinds.sigmoid import emit
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

B, H, T, D = 2, 2, 8, 8
OPTIONS = {"bias": "auto", "impl": "auto"}


class BiasedAttention(nn.Module):
    def forward(self, q, k, v, bias):  # bias: [B, H, T, T], BERT's -10000 on padded keys plus a relative bias
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D) + bias, dim=-1) @ v


class MaskReads(TorchDispatchMode):
    """Records every op that reads ``mask``'s storage, by name."""

    def __init__(self, mask):
        super().__init__()
        self.ptr, self.readers = mask.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.ptr for a in flat):
            self.readers.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen, requires_grad=True) for _ in range(3))
    keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
    keep[1, ..., 5:] = False
    relative = 0.1 * torch.randn(1, H, T, T, generator=gen)
    bias = ((~keep) * -10000.0 + relative).contiguous()
    # what the op computes for it: the padded keys masked (weight 0) and left out of bias="auto"'s count
    want = torch.ops.attnrewrite.sigmoid_attention(q, k, v, relative.masked_fill(~keep, float("-inf")))
    return (q, k, v, bias), want


def _assert_same_outputs_and_gradients(got, want, qkv):
    assert_close_rel(got, want, 1e-5, "output")
    grads = torch.autograd.grad(got.square().sum(), qkv)
    for name, g, w in zip("qkv", grads, torch.autograd.grad(want.square().sum(), qkv)):
        assert_close_rel(g, w, 1e-5, f"d{name}")


def test_the_kind_hands_the_mask_to_the_op_uncopied():
    (q, k, v, bias), want = _inputs()
    call = AttentionCall(q, k, v, bias, 0.0, False, None, False)
    with MaskReads(bias) as reads:  # (a dispatch mode: torch.compile would not run under it, so the kind eagerly)
        got = emit(call, {**OPTIONS, "bias": "auto"}, None)
    assert not {"aten.masked_fill", "aten.where", "aten.clone", "aten.le"} & set(reads.readers), reads.readers
    _assert_same_outputs_and_gradients(got, want, (q, k, v))


def test_a_rewritten_site_with_a_bert_mask_gives_the_ops_outputs_and_gradients():
    (q, k, v, bias), want = _inputs()
    report = Report(to="sigmoid")
    got = compile_rewritten(BiasedAttention(), report, to="sigmoid")(q, k, v, bias)
    (site,) = report.attention_sites()
    assert site.status == "rewritten", site
    _assert_same_outputs_and_gradients(got, want, (q, k, v))
