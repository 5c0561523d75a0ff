"""Attention inside higher-order ops: activation checkpointing, nested compile regions, other HOP
bodies (reported, never silently left), and FlexAttention.

The kinds' oracles here are written from their definitions (README, "Kinds"): sigmoid attention is
Σ_j sigmoid(s·q·k_jᵀ − log n_i)·v_j over the n_i keys query i sees; linear attention (φ = elu + 1, no
scale on q) is φ(q)·Σ_{j≤i} φ(k_j)ᵀv_j / (φ(q)·Σ_{j≤i} φ(k_j) + 1e-6).
"""

from __future__ import annotations

import copy
import warnings
import zlib
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import attnrewrite
from attnrewrite.rewriter.failures import RewriteFailed, RewriteWarning, reset_warnings
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import (
    assert_close_rel,
    assert_gradients_close,
    compile_rewritten,
)

D, HEADS, T = 16, 2, 6


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _attend(q, k, v, kind, causal=True):
    """softmax (as models write it), or the hand-written sigmoid / linear kind; q, k, v [B, H, T, D]."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    keep = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril()
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if kind == "softmax":
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v
    if kind == "sigmoid":
        n = keep.sum(-1, keepdim=True).to(s.dtype)
        return (torch.sigmoid(s - torch.log(n)) * keep) @ v
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    w = (fq @ fk.transpose(-2, -1)) * keep
    return (w / (w.sum(-1, keepdim=True) + 1e-6)) @ v


class Attention(nn.Module):
    def __init__(self, kind="softmax", checkpointed=False):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.kind, self.checkpointed = kind, checkpointed

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        if self.checkpointed:  # only the attention itself is checkpointed
            o = checkpoint(_attend, q, k, v, self.kind, use_reentrant=False)
        else:
            o = _attend(q, k, v, self.kind)
        return self.out(o.transpose(1, 2).reshape(b, t, D))


class Block(nn.Module):
    def __init__(self, kind="softmax", checkpointed_attention=False):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = Attention(kind, checkpointed_attention)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Model(nn.Module):
    """Two blocks; ``where`` is what is checkpointed: "layer" (each whole block), "attention" (only the
    attention inside each block) or "none"."""

    def __init__(self, where="layer", kind="softmax"):
        super().__init__()
        self.where = where
        self.blocks = nn.ModuleList(Block(kind, where == "attention") for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.where == "layer" else block(x)
        return x

    def as_kind(self, kind):
        """A copy with the same weights whose attention is the hand-written ``kind``, nothing checkpointed."""
        other = copy.deepcopy(self)
        other.where = "none"
        for block in other.blocks:
            block.attn.kind, block.attn.checkpointed = kind, False
        return other


def _model(where, seed="model"):
    torch.manual_seed(zlib.crc32(seed.encode()))
    return Model(where)


def _x(name="x"):
    return torch.randn(2, T, D, generator=_generator(name), requires_grad=True)


def _compare(compiled, oracle, model, x):
    """Outputs and every parameter gradient (and the input's) of ``compiled`` match ``oracle``'s."""
    weights = torch.randn(2, T, D, generator=_generator("loss weights"))
    params = list(model.parameters()) + [x]
    got = compiled(x)
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    want = oracle(x)
    want_grads = torch.autograd.grad((want * weights).sum(), list(oracle.parameters()) + [x])
    assert_close_rel(got, want, 1e-5, "output")
    assert_gradients_close([n for n, _ in model.named_parameters()] + ["x"], got_grads, want_grads, 1e-4)


def _rewritten_inside(report, hop, count, kind):
    sites = report.attention_sites()
    assert len(sites) == count, report
    for site in sites:
        assert site.status == "rewritten" and site.kind == kind, report
        assert any(f"inside the {hop} body" in note for note in site.notes), report


# --------------------------------------------------------------------------- activation checkpointing


SLOW = pytest.mark.slow
CHECKPOINT_CELLS = [
    ("layer", "softmax", "eager", ()), ("layer", "sigmoid", "eager", ()), ("layer", "linear", "eager", ()),
    ("attention", "softmax", "eager", ()), ("attention", "sigmoid", "eager", SLOW),
    ("attention", "linear", "eager", ()), ("layer", "sigmoid", "aot_eager", ()),
    ("attention", "linear", "aot_eager", ()), ("layer", "softmax", "aot_eager", SLOW),
]


@pytest.mark.parametrize("where,kind,compiler", [pytest.param(*c[:3], marks=c[3]) for c in CHECKPOINT_CELLS])
def test_checkpointed_attention_is_rewritten_and_trains_as_the_kind(where, kind, compiler):
    model = _model(where)
    report = Report()
    compiled = compile_rewritten(model, report, to=kind, compiler=compiler, strict=True)
    _compare(compiled, model.as_kind(kind), model, _x())
    _rewritten_inside(report, "tag_activation_checkpoint", 2, kind)
    assert all(s.spec["causal"] and not s.spec["bias"] for s in report.attention_sites()), report


def test_the_oracles_tell_the_kinds_apart():
    """The comparison above has teeth: the three kinds' outputs differ far beyond its tolerance."""
    model, x = _model("none"), _x()
    with torch.no_grad():
        outs = {kind: model.as_kind(kind)(x) for kind in ("softmax", "sigmoid", "linear")}
    for a, b in (("softmax", "sigmoid"), ("softmax", "linear"), ("sigmoid", "linear")):
        assert float((outs[a] - outs[b]).abs().max()) > 1e-2 * float(outs[b].abs().max()), (a, b)


def _forward_op_calls(compiled, x) -> int:
    """How many times the sigmoid kind's forward op ran in one forward + backward (outermost calls)."""
    names = {"attnrewrite::sigmoid_chunked_fwd", "attnrewrite::sigmoid_attention"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled(x).sum().backward()
    counts = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("attnrewrite::"):
            parent = parent.cpu_parent
        if event.name in names and parent is None:
            counts[event.name] += 1
    assert len(counts) == 1, counts
    return sum(counts.values())


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_the_backward_recomputes_the_rewritten_attention(compiler):
    """Checkpointed, the kind's op runs twice per layer (forward, then again in the backward): the
    recomputation runs the rewritten body.  Not checkpointed, once."""
    x = _x()
    calls = {}
    for where in ("layer", "none"):
        torch._dynamo.reset()
        compiled = compile_rewritten(_model(where), to="sigmoid", compiler=compiler, strict=True)
        compiled(x).sum().backward()  # compiles
        calls[where] = _forward_op_calls(compiled, x)
    assert calls == {"layer": 4, "none": 2}


def test_verify_finds_no_softmax_in_a_checkpointed_model():
    """verify runs forward and backward (the recomputation included) under the profiler."""
    result = attnrewrite.verify(_model("layer"), _x(), to="sigmoid", options={"strict": True})
    assert result.ok and len(result.report.rewritten) == 2


def test_nested_checkpoints_are_entered():
    def inner(q, k, v):
        return checkpoint(_attend, q, k, v, "softmax", use_reentrant=False) * 2

    def outer(q, k, v):
        return checkpoint(inner, q, k, v, use_reentrant=False)

    q, k, v = (torch.randn(1, HEADS, T, 4, generator=_generator(n)) for n in "qkv")
    report = Report()
    out = compile_rewritten(outer, report, to="sigmoid", strict=True)(q, k, v)
    assert_close_rel(out, 2 * _attend(q, k, v, "sigmoid"), 1e-5, "output")
    _rewritten_inside(report, "tag_activation_checkpoint", 1, "sigmoid")


def _masked_attend(q, k, v, keep):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def _padded_and_checkpointed(q, k, v, pad):
    """The mask is built outside the checkpointed body: causal and key padding."""
    keep = torch.ones(T, T, dtype=torch.bool).tril() & pad[:, None, None, :]
    return checkpoint(_masked_attend, q, k, v, keep, use_reentrant=False)


def _pad():
    pad = torch.ones(2, T, dtype=torch.bool)
    pad[1, T - 2:] = False
    return pad


def test_a_mask_built_outside_the_body_is_split_there():
    """The causal part is proven and the padding reaches the kind on its own: linear attention, which
    takes no additive mask, is possible."""
    q, k, v = _qkv("lifted")
    report = Report()
    got = compile_rewritten(_padded_and_checkpointed, report, to="linear", feature_map="elu", strict=True)(
        q, k, v, _pad())
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.spec["causal"] and site.spec["bias"] == ["keep"], report
    keep = _pad()[:, None, None, :]
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    w = (fq @ fk.transpose(-2, -1)) * torch.ones(T, T, dtype=torch.bool).tril() * keep
    assert_close_rel(got, (w / (w.sum(-1, keepdim=True) + 1e-6)) @ v, 1e-5, "output")


def test_a_failure_inside_a_body_leaves_that_body_as_it_was(monkeypatch):
    """The body, and the operands lifted masks added to its call, are restored; its sites are reported."""
    from attnrewrite.rewriter import pipeline

    def finish(ctx):
        if ctx.inside:
            raise RuntimeError("a body-local failure")
        pipeline.finish(ctx)

    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:-1] + (("finish", finish),))
    from attnrewrite.rewriter.backend import attnrewrite_backend

    graphs, report = [], Report()

    def backend(gm, example_inputs):
        graphs.append(gm)
        options = {"to": "linear", "feature_map": "elu", "compiler": "eager"}
        return attnrewrite_backend(gm, example_inputs, options=options, _report_sink=report.merge)

    q, k, v = (t.detach() for t in _qkv("lifted"))
    reset_warnings()
    with pytest.warns(RewriteWarning, match="a body-local failure"):
        got = torch.compile(_padded_and_checkpointed, backend=backend)(q, k, v, _pad())
    assert_close_rel(got, _padded_and_checkpointed(q, k, v, _pad()), 1e-6, "output (left as it was)")
    (site,) = report.attention_sites()
    assert site.status == "skipped" and "the pass failed on the tag_activation_checkpoint body" in site.reason
    (gm,) = graphs
    (call,) = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.tag_activation_checkpoint]
    body = getattr(gm, call.args[0].target)
    assert len(call.args) - 1 == sum(n.op == "placeholder" for n in body.graph.nodes)


def test_kinds_with_per_site_parameters_are_not_attached_inside_a_body():
    reset_warnings()
    report = Report()
    with pytest.warns(RewriteWarning, match="per-site parameters.*inside the tag_activation_checkpoint body"):
        compile_rewritten(_model("layer"), report, to="linear", feature_map="hedgehog")(_x())
    assert [s.status for s in report.attention_sites()] == ["skipped", "skipped"], report


# --------------------------------------------------------------------------- HF gradient checkpointing


def _hf(family, kind):
    import transformers as T

    torch.manual_seed(0)
    if family == "llama":
        config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, use_cache=False)
        model = T.LlamaForCausalLM._from_config(config, attn_implementation="eager")
    else:
        config = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                              resid_pdrop=0.0, embd_pdrop=0.0, initializer_range=0.3, use_cache=False)
        model = T.GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    return model


@pytest.mark.parametrize("family,kind,compiler", [
    ("llama", "sigmoid", "eager"), ("gpt2", "linear", "eager"),
    pytest.param("llama", "linear", "aot_eager", marks=SLOW), pytest.param("gpt2", "sigmoid", "aot_eager", marks=SLOW)])
def test_hf_gradient_checkpointing_is_rewritten(family, kind, compiler):
    import test_training_matrix as matrix  # its hand-written kinds, as an HF AttentionInterface

    model = _hf(family, kind)
    oracle = copy.deepcopy(model)
    oracle.set_attn_implementation("training_matrix_oracle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable's rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(), oracle.train()
    inputs = matrix._inputs()
    report = Report()
    compiled = compile_rewritten(model, report, to=kind, compiler=compiler, strict=True,
                                 **({"feature_map": "elu"} if kind == "linear" else {}))
    loss = compiled(**inputs).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    matrix._oracle.kind, matrix._oracle.calls = kind, 0
    want = oracle(**inputs).loss
    want_grads = torch.autograd.grad(want, list(oracle.parameters()))
    assert matrix._oracle.calls == 2
    _rewritten_inside(report, "tag_activation_checkpoint", 2, kind)
    assert all(s.spec["causal"] for s in report.attention_sites()), report  # the mask, split outside the body
    assert_close_rel(loss, want, 1e-5, "loss")
    assert_gradients_close([n for n, _ in model.named_parameters()], grads, want_grads, 1e-4)


# --------------------------------------------------------------------------- nested compile regions


@torch.compiler.nested_compile_region
def _region(q, k, v):
    return _attend(q, k, v, "softmax")


@torch.compiler.nested_compile_region
def _masked_region(q, k, v, keep):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def _qkv(name):
    return [torch.randn(2, HEADS, T, 4, generator=_generator(f"{name}{n}"), requires_grad=True) for n in "qkv"]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_a_nested_compile_region_called_twice_is_rewritten_once(kind):
    def f(q, k, v):
        return _region(q, k, v) + _region(2 * q, k, v)

    q, k, v = _qkv("region")
    report = Report()
    got = compile_rewritten(f, report, to=kind, compiler="aot_eager", strict=True)(q, k, v)
    want = _attend(q, k, v, kind) + _attend(2 * q, k, v, kind)
    assert_close_rel(got, want, 1e-5, "output")
    assert_close_rel(torch.autograd.grad(got.sum(), q)[0], torch.autograd.grad(want.sum(), q)[0], 1e-4, "dq")
    _rewritten_inside(report, "invoke_subgraph", 1, kind)
    assert "called 2×" in report.attention_sites()[0].notes[-1]


def test_a_region_called_with_two_masks_assumes_neither():
    """Called once with a causal mask and once with none, the body's mask is not a constant: proving it
    causal from the first call would change the second call's output."""
    def f(q, k, v):
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        full = torch.ones(T, T, dtype=torch.bool)
        return _masked_region(q, k, v, causal) + _masked_region(q, k, v, full)

    q, k, v = _qkv("masks")
    report = Report()
    got = compile_rewritten(f, report, to="softmax", strict=True)(q, k, v)
    assert_close_rel(got, _attend(q, k, v, "softmax") + _attend(q, k, v, "softmax", causal=False), 1e-5, "output")
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and not site.spec["causal"] and site.spec["bias"] == ["keep"], report


# --------------------------------------------------------------------------- bodies not entered: reported


def _strict_raises(run, cause):
    """``run`` raises RewriteFailed naming ``cause`` (torch.compile wraps it in BackendCompilerFailed)."""
    with pytest.raises(Exception) as caught:
        run()
    failed = getattr(caught.value, "inner_exception", caught.value)
    assert isinstance(failed, RewriteFailed) and all(cause in f.cause for f in failed.failures), caught.value


def _cond(q, k, v):
    return torch.cond(q.sum() > 0, lambda q, k, v: _attend(q, k, v, "softmax"),
                      lambda q, k, v: 2 * _attend(q, k, v, "softmax"), (q, k, v))


def _while_loop(q, k, v):
    return torch._higher_order_ops.while_loop(
        lambda i, x: i < 2, lambda i, x: (i + 1, _attend(x, k, v, "softmax")), (torch.tensor(0), q))[1]


def _map(q, k, v):
    return torch._higher_order_ops.map(lambda qkv: _attend(*qkv, "softmax"), (q, k, v))


class _CustomFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        return _attend(q, k, v, "softmax")

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _custom_function(q, k, v):
    return _CustomFunction.apply(q, k, v)


@pytest.mark.parametrize("fn,sites,what", [
    (_cond, 2, "torch.cond branch"), (_while_loop, 1, "torch.while_loop body"),
    (_map, 1, "torch.map body"),
    (_custom_function, 1, "custom autograd.Function's forward")])
def test_attention_in_a_body_not_entered_is_reported(fn, sites, what):
    # without gradients Dynamo inlines a custom Function's forward (nothing of its backward can run)
    q, k, v = _qkv("cond") if fn is _custom_function else (t.detach() for t in _qkv("cond"))
    reset_warnings()
    report = Report()
    with pytest.warns(RewriteWarning, match=what):
        out = compile_rewritten(fn, report, to="sigmoid")(q, k, v)
    assert_close_rel(out, fn(q, k, v), 1e-6, "output (left as it was)")
    found = report.attention_sites()
    assert len(found) == sites and all(s.status == "skipped" and what in s.reason for s in found), report
    torch._dynamo.reset()
    _strict_raises(lambda: compile_rewritten(fn, None, to="sigmoid", strict=True)(q, k, v), what)


class _MultiheadInCond(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.mha(x, x, x, need_weights=False)[0], lambda x: 2 * x, (x,))


def test_a_fused_multihead_attention_in_a_body_not_entered_is_reported():
    """nn.MultiheadAttention's fused op is attention too: found on a copy of the body (unfused there)."""
    model, x = _MultiheadInCond().eval(), torch.randn(2, T, D, generator=_generator("mha")).abs()
    reset_warnings()
    report = Report()
    with torch.no_grad():
        with pytest.warns(RewriteWarning, match="torch.cond branch"):
            out = compile_rewritten(model, report, to="sigmoid")(x)
        assert_close_rel(out, model(x), 1e-6, "output (left as it was)")
    (site,) = report.attention_sites()
    assert site.status == "skipped" and site.pattern == "multihead" and site.module == "mha", report


def test_verify_names_attention_left_in_a_cond_branch():
    q, k, v = (t.detach() for t in _qkv("cond"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewriteWarning)
        result = attnrewrite.verify(_cond, q, k, v, to="sigmoid", raise_on_failure=False)
    assert not result.ok and any("torch.cond branch" in f.cause for f in result.failures), result


# --------------------------------------------------------------------------- FlexAttention


def _flex(**kw):
    from torch.nn.attention.flex_attention import flex_attention

    def f(q, k, v):
        return flex_attention(q, k, v, **kw)

    return f


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex_causal(q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(_causal_mask_mod, None, None, q.shape[-2], k.shape[-2], device="cpu")
    return flex_attention(q, k, v, block_mask=block_mask)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("causal", [False, True])
def test_flex_attention_is_rewritten(kind, causal):
    fn = _flex_causal if causal else _flex()
    q, k, v = (t.detach() for t in _qkv("flex"))  # FlexAttention has no backward on CPU
    report = Report()
    got = compile_rewritten(fn, report, to=kind, strict=True)(q, k, v)
    assert_close_rel(got, _attend(q, k, v, kind, causal=causal), 1e-5, "output")
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.pattern == "flex_attention" and site.spec["causal"] == causal


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_grouped_query_heads():
    q = torch.randn(2, 2 * HEADS, T, 4, generator=_generator("gqa q"))
    k, v = (torch.randn(2, HEADS, T, 4, generator=_generator(f"gqa {n}")) for n in "kv")
    fn = _flex(enable_gqa=True)
    report = Report()
    got = compile_rewritten(fn, report, to="sigmoid", strict=True)(q, k, v)
    want = _attend(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), "sigmoid", causal=False)
    assert_close_rel(got, want, 1e-5, "output")
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.spec["kv_groups"] == 2, report


def _alibi(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * (h + 1) * 0.25


def _sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 3)


def _flex_with_mask(mask_mod, **kw):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def f(q, k, v):
        block_mask = create_block_mask(mask_mod, None, None, q.shape[-2], k.shape[-2], device="cpu")
        return flex_attention(q, k, v, block_mask=block_mask, **kw)

    return f


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def _causal_score_mod(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, -float("inf"))


@pytest.mark.parametrize("fn,bias,causal", [
    (_flex(score_mod=_alibi), ["add"], False), (_flex_with_mask(_sliding_window), ["keep"], False),
    (_flex_with_mask(_causal_mask_mod, score_mod=_alibi), ["add"], True),
    (_flex(score_mod=_causal_score_mod), [], True)])
def test_flex_attention_mods_of_positions_are_read(fn, bias, causal):
    """A score_mod that adds a bias of positions and heads (ALiBi, or −∞: a mask) and a mask_mod other
    than causal (a sliding window) are read at every position; the softmax kind reproduces FlexAttention."""
    q, k, v = (t.detach() for t in _qkv("flex"))
    report = Report()
    got = compile_rewritten(fn, report, to="softmax", strict=True)(q, k, v)
    assert_close_rel(got, fn(q, k, v), 1e-5, "output")
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.spec["bias"] == bias and site.spec["causal"] == causal, report


def _softcap(score, b, h, q_idx, kv_idx):
    return 5.0 * torch.tanh(score / 5.0)


def _flex_documents(q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = (torch.arange(q.shape[-2]) >= q.shape[-2] // 2).long() + (q.sum() > 0).long()

    def same_document(b, h, q_idx, kv_idx):
        return document[q_idx] == document[kv_idx]

    block_mask = create_block_mask(same_document, None, None, q.shape[-2], k.shape[-2], device="cpu")
    return flex_attention(q, k, v, block_mask=block_mask)


def _flex_lse(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    out, lse = flex_attention(q, k, v, return_lse=True)
    return out + lse.unsqueeze(-1)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("fn,reason", [
    (_flex(score_mod=_softcap), "score_mod is not the scores plus a bias"),
    (_flex_documents, "reads tensors"),
    (_flex_lse, "log-sum-exp"),
])
def test_flex_attention_it_cannot_read_is_reported(fn, reason):
    q, k, v = (t.detach() for t in _qkv("flex"))
    reset_warnings()
    report = Report()
    with pytest.warns(RewriteWarning, match=reason):
        out = compile_rewritten(fn, report, to="softmax")(q, k, v)
    assert_close_rel(out, fn(q, k, v), 1e-6, "output (left as it was)")
    (site,) = report.attention_sites()
    assert site.status == "skipped" and reason in site.reason, report
    torch._dynamo.reset()
    _strict_raises(lambda: compile_rewritten(fn, None, to="softmax", strict=True)(q, k, v), reason)


# --------------------------------------------------------------------------- inductor


@SLOW
def test_checkpointed_attention_under_inductor():
    model = _model("layer")
    report = Report()
    compiled = compile_rewritten(model, report, to="sigmoid", compiler="inductor", strict=True)
    _compare(compiled, model.as_kind("sigmoid"), model, _x())
    _rewritten_inside(report, "tag_activation_checkpoint", 2, "sigmoid")
