"""``owner_of`` in a frame Dynamo resumed after a graph break in the owner's own forward: a converted model
compiled at the owner itself (the attention module, its forward broken before the attention) still finds the
learned state on the module and trains it, against the eager run of the same attention; a resumed frame where
the owner is no longer a local is refused by name, never run without its state."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import attnrewrite
from attnrewrite.rewriter.failures import RewriteFailed


class BrokenOwner(nn.Module):
    """Attention whose forward has a graph break between the projections and the attention."""

    def __init__(self, uses_self_after: bool = True):
        super().__init__()
        self.uses_self_after = uses_self_after
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        if self.uses_self_after:
            torch._dynamo.graph_break()
            return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True)).sum(1)
        torch._dynamo.graph_break()  # `self` is dead after this: the resumed frame does not get it
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(1)


OPTIONS = {"to": "sigmoid", "learned": True}


def _eager_sigmoid(model, x):
    q, k, v = model.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
    out = attnrewrite.converted_attention(model, q, k, v, "sigmoid", is_causal=True, learned=True)
    return model.out(out).sum(1)


def test_state_found_after_a_graph_break_in_the_owners_forward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BrokenOwner().double()
    x = torch.randn(2, 8, 16, dtype=torch.double)
    attnrewrite.convert(model, "sigmoid", (x,), learned=True)
    state = model.attnrewrite_sigmoid
    with torch.no_grad():  # off its initial values: a run without the state would differ
        for p in state.parameters():
            p.add_(0.3 * torch.randn_like(p))
    compiled = torch.compile(model, backend="attnrewrite", options={**OPTIONS, "compiler": "eager", "strict": True})
    got = compiled(x)
    report = attnrewrite.recent_reports()[-1]
    assert len(report.rewritten) == 1 and not report.skipped, report
    got.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = _eager_sigmoid(model, x)
    want.square().sum().backward()
    assert_close(got, want)
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, msg=lambda m, n=name: f"d{n}: {m}")
    assert state.log_temperature.grad.abs().max() > 0


def test_owner_no_longer_a_local_is_refused_by_name():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BrokenOwner(uses_self_after=False).double()
    x = torch.randn(2, 8, 16, dtype=torch.double)
    attnrewrite.convert(model, "sigmoid", (x,), learned=True)
    assert not hasattr(model, "attnrewrite_sigmoid")
    reasons = " ".join(str(site) for site in model.attnrewrite_report.skipped)
    assert "resumed after a graph break" in reasons and "no longer a local" in reasons, model.attnrewrite_report
    compiled = torch.compile(model, backend="attnrewrite", options={**OPTIONS, "compiler": "eager", "strict": True})
    with pytest.raises(RewriteFailed, match="resumed after a graph break.*no longer a local"):
        compiled(x)
