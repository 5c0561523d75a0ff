"""The kind you ask for is the kind that runs: training setups that used to leave softmax in place.

Each test uses its own models and spellings; the issue's reproducers are examples only.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnrewrite
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten


class DropoutAttention(nn.Module):
    """Self-attention whose probability dropout comes from an attribute: under ``dynamic=True`` Dynamo
    turns such a float into a graph input (a SymFloat), which the matcher used to reject."""

    def __init__(self, spelling: str, p: float = 0.2):
        super().__init__()
        self.spelling, self.proj, self.drop, self.p = spelling, nn.Linear(24, 72), nn.Dropout(p), p

    def forward(self, x):  # [B, T, 24]
        q, k, v = self.proj(x).unflatten(-1, (3, 3, 8)).permute(2, 0, 3, 1, 4)  # each [B, 3, T, 8]
        if self.spelling == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0,
                                                 is_causal=True)
        else:
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * 8**-0.5
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            probs = self.drop(probs) if self.spelling == "module" else F.dropout(probs, self.p, self.training)
            out = probs @ v
        return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("spelling", ["module", "functional", "sdpa"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_dropout_probability_under_dynamic_shapes_is_rewritten(spelling, kind):
    """dynamic=True, train mode: every site is rewritten (strict passes) for lengths that vary; when the
    probability changes, the graph that runs (Dynamo guards p) is rewritten too and honours the new p."""
    model = DropoutAttention(spelling).train()
    report = Report()
    compiled = compile_rewritten(model, report, to=kind, strict=True, dynamic=True)
    for length in (5, 9, 12):
        out = compiled(torch.randn(2, length, 24))
        assert out.shape == (2, length, 24) and torch.isfinite(out).all()
    assert report.attention_sites() and all(s.status == "rewritten" and s.kind == kind for s in report.sites)
    assert all(s.spec["dropout_p"] == pytest.approx(0.2) for s in report.sites)

    model.p = model.drop.p = 0.0  # no dropout now: the output is deterministic and can be compared
    x = torch.randn(2, 7, 24)
    if kind == "softmax":
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    else:
        q, k, v = model.proj(x).unflatten(-1, (3, 3, 8)).permute(2, 0, 3, 1, 4)
        want = attnrewrite.ops.sigmoid_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-6)
    assert all(s.status == "rewritten" and s.kind == kind for s in report.sites), report


def test_a_kind_without_dropout_skips_a_symbolic_probability_loudly():
    """linear has no dropout: the site is skipped with the reason, and strict raises (never silent)."""
    model = DropoutAttention("module").train()
    with pytest.raises(Exception, match="dropout on the attention probabilities"):
        compile_rewritten(model, to="linear", strict=True, dynamic=True)(torch.randn(2, 6, 24))


def _softmax_over_queries(q, k, v):
    """Not attention: the softmax runs over the *query* dim. Inductor's serialized SDPA pattern
    ignores the softmax dim (torch 2.13) and would fuse it into SDPA."""
    return torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-2) @ v


@pytest.mark.slow
def test_inductor_does_not_fuse_what_attnrewrite_left_alone():
    """With the default compiler (inductor) the result equals eager; inductor alone gets it wrong, so
    this test can fail.  (Outputs, not fusion counters, are compared: a compile served from inductor's
    FX graph cache counts nothing.)"""
    q, k, v = (torch.randn(2, 4, 16, 16) for _ in range(3))
    want = _softmax_over_queries(q, k, v)
    report = Report()
    got = compile_rewritten(_softmax_over_queries, report, compiler="inductor")(q, k, v)
    assert report.sites and not report.rewritten  # a near miss: left alone by the matcher
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    wrong = torch.compile(_softmax_over_queries)(q, k, v)
    assert not torch.allclose(wrong, want, rtol=1e-3, atol=1e-3), "inductor no longer fuses this: update the test"


def test_attention_fusion_is_filtered_only_inside_the_block():
    from torch._inductor.fx_passes import joint_graph

    from attnrewrite.rewriter.backend import _is_attention_fusion, without_inductor_attention_fusion

    original = joint_graph.pass_patterns[0]
    joint_graph.lazy_init(torch.device("cpu"))
    entries = [e for group in original.patterns.values() for e in group]
    fusion = [e for e in entries if _is_attention_fusion(e)]
    assert fusion and len(fusion) < len(entries)  # the other pattern passes stay
    with without_inductor_attention_fusion():
        assert joint_graph.pass_patterns[0] is not original
        with without_inductor_attention_fusion():  # nested compiles
            assert joint_graph.pass_patterns[0].inner is original
    assert joint_graph.pass_patterns[0] is original


def test_inductor_cache_keys_name_the_attnrewrite_source(tmp_path):
    """The AOTAutograd cache keys a graph before attnrewrite's composite ops decompose: the marker pass
    in inductor's config carries a digest of the package source, which any source edit changes."""
    import torch._inductor.config as inductor_config

    from attnrewrite.rewriter.backend import digest_sources, source_fingerprint, without_inductor_attention_fusion

    with without_inductor_attention_fusion():
        uuid = inductor_config.joint_custom_pre_pass.uuid()
    assert source_fingerprint() in uuid
    package = tmp_path / "pkg"
    (package / "kernels").mkdir(parents=True)
    (package / "kernels" / "op.py").write_text("CAUSAL = 1\n")
    (package / "notes.txt").write_text("not code")
    before = digest_sources(package)
    (package / "notes.txt").write_text("still not code")
    assert digest_sources(package) == before
    (package / "kernels" / "op.py").write_text("CAUSAL = 0\n")
    assert digest_sources(package) != before
    (package / "kernels" / "op.py").write_text("CAUSAL = 1\n")
    assert digest_sources(package) == before
    (package / "kernels" / "op.py").rename(package / "op.py")  # the same bytes elsewhere
    assert digest_sources(package) != before


class Decoder(nn.Module):
    """Two causal attention layers and a classifier softmax (not attention); ``pause`` puts a graph
    break inside the attention of layer 0, before or after its softmax.  (Not a loop over layers:
    Dynamo runs a whole frame eagerly when a loop body breaks the graph.)"""

    def __init__(self, pause: str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))
        self.head, self.pause = nn.Linear(16, 5), pause

    def attend(self, i: int, x):  # [B, T, 16]
        q, k, v = self.layers[i](x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * 8**-0.5
        if i == 0 and self.pause == "scores":
            torch._dynamo.graph_break()
        future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        if i == 0 and self.pause == "probs":
            torch._dynamo.graph_break()
        return x + (probs @ v).transpose(1, 2).flatten(2)

    def forward(self, x):
        x = self.attend(0, x)
        x = self.attend(1, x)
        return self.head(x).softmax(-1)


class Biased(Decoder):
    def forward(self, x):
        q, k, v = self.layers[0](x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        bias = torch.linspace(0, 1, x.shape[1])  # an additive bias: linear cannot honour it
        return (torch.softmax(q @ k.transpose(-1, -2) + bias, -1) @ v).sum(1)


def test_verify_passes_when_every_attention_ran_as_the_kind():
    result = attnrewrite.verify(Decoder(), torch.randn(2, 6, 16), to="sigmoid")
    assert result.ok and len(result.report.rewritten) == 2 and result.regions, result


@pytest.mark.parametrize("pause", ["scores", "probs"])
def test_verify_names_an_attention_split_by_a_graph_break(pause):
    with pytest.raises(attnrewrite.RewriteFailed, match="split by a graph break") as caught:
        attnrewrite.verify(Decoder(pause), torch.randn(2, 6, 16), to="sigmoid")
    (failure,) = caught.value.failures  # layer 1 is still rewritten; the classifier is not attention
    assert "split by a graph break" in failure.cause


@pytest.mark.parametrize("pause", ["scores", "probs"])
def test_strict_raises_on_an_attention_split_by_a_graph_break(pause):
    """The halves are found at compile time too: strict raises, non-strict warns."""
    from attnrewrite.rewriter.failures import reset_warnings

    with pytest.raises(Exception, match="split by a graph break"):
        compile_rewritten(Decoder(pause), to="sigmoid", strict=True)(torch.randn(2, 6, 16))
    torch._dynamo.reset()
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning, match="split by a graph break"):
        compile_rewritten(Decoder(pause), to="sigmoid")(torch.randn(2, 6, 16))


def test_verify_names_attention_a_kind_left_as_it_was():
    result = attnrewrite.verify(Biased(), torch.randn(2, 6, 16), to="linear", raise_on_failure=False)
    (failure,) = result.failures
    assert "attention not rewritten" in failure.cause and "additive bias" in failure.cause


@pytest.mark.parametrize("pause", [None, "probs"])
def test_verify_reads_only_the_reports_of_the_graphs_that_ran(pause):
    """Dynamo numbers compiles from 0/0 again after a reset: a report of another model compiled before
    under the same compile id is not this run's (verify read it as this run's, and listed its failure)."""
    x = torch.randn(2, 6, 16)
    assert len(attnrewrite.verify(Biased(), x, to="linear", raise_on_failure=False).failures) == 1
    torch._dynamo.reset()
    result = attnrewrite.verify(Decoder(pause), x, to="sigmoid", raise_on_failure=False)
    assert [f for f in result.failures if "additive bias" in f.cause] == [], result
    assert len(result.failures) == (pause is not None), result  # the attention split by the graph break
    assert len(result.report.rewritten) == 2 - (pause is not None), result
    assert {s.kind for s in result.report.rewritten} == {"sigmoid"}, result


def test_verify_sees_attention_that_ran_eagerly_past_the_recompile_limit():
    """A model the user compiled: past Dynamo's recompile limit a new shape runs the original code
    eagerly; verify names the softmax calls and the model line that ran them."""
    model = Decoder()
    compiled = torch.compile(model, backend="attnrewrite", options={"to": "sigmoid", "compiler": "eager"},
                             dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
        compiled(torch.randn(2, 6, 16))
        result = attnrewrite.verify(compiled, torch.randn(2, 7, 16), raise_on_failure=False)
        assert attnrewrite.verify(compiled, torch.randn(2, 6, 16)).ok  # the compiled shape is fine
    eager = [f for f in result.failures if "ran eagerly" in f.cause]
    assert len(eager) == 3, result  # two attention softmaxes and the classifier's: all ran eagerly
    assert {f.module.rsplit(": ", 1)[-1] for f in eager} == {"attend", "forward"}, result  # model lines


def test_verify_checks_its_arguments():
    with pytest.raises(ValueError, match="options= goes with to="):
        attnrewrite.verify(Decoder(), torch.randn(2, 6, 16), options={"compiler": "eager"})
    with pytest.raises(ValueError, match="unknown attention kind"):
        attnrewrite.verify(Decoder(), torch.randn(2, 6, 16), to="nope")


@attnrewrite.rewrite(to="sigmoid", compiler="eager")
class RewrittenBlock(nn.Module):
    """Module level, so that pickle finds the class."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return (torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v).sum(1)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_of_a_decorated_class_stay_rewritten(how):
    import copy
    import io

    x = torch.randn(2, 5, 16)
    block = RewrittenBlock()
    if how == "deepcopy":
        twin = copy.deepcopy(block)
    else:
        buffer = io.BytesIO()
        torch.save(block, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert attnrewrite.verify(twin, x).ok
    torch.testing.assert_close(twin(x), block(x))


def test_a_copy_of_an_instance_rewritten_in_place_is_caught_by_verify():
    import copy

    block = attnrewrite.rewrite(DropoutAttention("module").eval(), to="sigmoid", compiler="eager")
    with pytest.raises(attnrewrite.RewriteFailed, match="ran eagerly"):
        attnrewrite.verify(copy.deepcopy(block), torch.randn(2, 5, 24))


class ShapeSpecialised(nn.Module):
    """Causal softmax attention; compiled with dynamic=False, every new length is a recompile."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


def test_the_compile_that_reaches_the_recompile_limit_warns():
    """The frame's 3rd compile (recompile_limit=3) says that later lengths run unrewritten; the lengths
    compiled before and at the limit are rewritten, the one after runs softmax (verify names it)."""
    import warnings

    from attnrewrite.rewriter.failures import reset_warnings

    reset_warnings()
    model = ShapeSpecialised()
    report = Report()
    compiled = torch.compile(model, backend=functools.partial(
        attnrewrite_backend, options={"to": "sigmoid", "compiler": "eager"}, _report_sink=report.merge),
        dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=3), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in (4, 5):
            compiled(torch.randn(1, length, 16))
        assert not [w for w in caught if issubclass(w.category, attnrewrite.RewriteWarning)]
        compiled(torch.randn(1, 6, 16))
        said = [str(w.message) for w in caught if issubclass(w.category, attnrewrite.RewriteWarning)]
        assert len(said) == 1 and "3th time" in said[0] and "recompile_limit" in said[0], said
        assert "forward" in said[0] and "original attention" in said[0]
        assert len(report.rewritten) == 3
        with pytest.raises(attnrewrite.RewriteFailed, match="ran eagerly"):  # the 4th length: softmax
            attnrewrite.verify(compiled, torch.randn(1, 7, 16))


def test_strict_raises_at_the_recompile_limit():
    compiled = compile_rewritten(ShapeSpecialised(), to="sigmoid", strict=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2):
        compiled(torch.randn(1, 4, 16))
        with pytest.raises(Exception, match="recompile_limit"):
            compiled(torch.randn(1, 5, 16))


@torch._dynamo.disable
def _attention_dynamo_skips(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class HiddenFromDynamo(ShapeSpecialised):
    """Its attention runs in a function Dynamo does not compile: no graph ever shows it to the pass."""

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return _attention_dynamo_skips(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("form", ["instance", "class"])
def test_strict_rewrite_checks_its_first_call(form):
    """strict=True: attention that ran eagerly in the first call raises, naming the op; a module
    whose attention is rewritten passes and computes the kind."""
    x = torch.randn(2, 5, 16)
    if form == "instance":
        hidden = attnrewrite.rewrite(HiddenFromDynamo(), to="sigmoid", strict=True, compiler="eager")
        good = attnrewrite.rewrite(ShapeSpecialised(), to="sigmoid", strict=True, compiler="eager")
    else:
        hidden = attnrewrite.rewrite(to="sigmoid", strict=True, compiler="eager")(
            type("Hidden", (HiddenFromDynamo,), {}))()
        good = attnrewrite.rewrite(to="sigmoid", strict=True, compiler="eager")(
            type("Good", (ShapeSpecialised,), {}))()
    with pytest.raises(attnrewrite.RewriteFailed, match="ran eagerly") as caught:
        hidden(x)
    assert "first call" in str(caught.value) and "scaled_dot_product_attention" in str(caught.value)
    out = good(x)
    q, k, v = good.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
    want = attnrewrite.ops.sigmoid_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out, want)


def test_verify_names_attention_run_eagerly_inside_a_compiled_frame():
    """A function Dynamo skips runs inside the compiled frame's region but in none of its graphs."""
    with pytest.raises(attnrewrite.RewriteFailed, match="in none of its graphs") as caught:
        attnrewrite.verify(HiddenFromDynamo(), torch.randn(2, 5, 16), to="sigmoid")
    assert "test_trust.py" in caught.value.failures[0].module  # the line that ran it


def _general_mask_sigmoid(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Hand-written sigmoid attention under an arbitrary additive mask, no causality claimed: Σ_j sigmoid(s·q·k_j +
    m_ij − log n_i)·v_j, n_i the keys row i sees: those whose mask entry is not HF's masked value (bias "auto")."""
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = (query @ k.transpose(-2, -1)) * scaling + attention_mask
    n_i = (attention_mask > torch.finfo(attention_mask.dtype).min).sum(-1, keepdim=True).clamp(min=1)
    weights = torch.sigmoid(scores - torch.log(n_i.to(scores.dtype)))
    return (weights @ v).transpose(1, 2).contiguous(), None


def _layer_with_its_mask():
    """A Llama decoder layer (GQA) and its inputs, the causal-and-padding mask built outside it (as a model does
    before its layers), so that compiling the layer alone makes the mask an input of its graph."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    embeddings = model.model.rotary_emb(x, torch.arange(10)[None].expand(2, -1))
    keep = torch.ones(10, 10, dtype=torch.bool).tril()[None, None] & torch.tensor(
        [[True] * 10, [False] * 3 + [True] * 7])[:, None, None, :]
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return model.model.layers[0], dict(hidden_states=x, attention_mask=mask, position_embeddings=embeddings)


def test_a_mask_from_another_graph_is_rewritten_as_a_general_mask_by_kinds_that_take_one():
    """A layer compiled on its own (FSDP2 per-layer compile, ``layer.compile()``): its mask is a graph input and
    cannot be proven causal.  sigmoid takes it as a general additive mask (no causality claimed) and equals the
    hand-written sigmoid with that mask; kinds that need causality (linear, summary, hashed) skip it, and under
    strict say why."""
    import copy

    import transformers as T

    layer, inputs = _layer_with_its_mask()
    T.AttentionInterface.register("trust_general_mask_sigmoid", _general_mask_sigmoid)
    oracle = copy.deepcopy(layer)
    oracle.self_attn.config._attn_implementation = "trust_general_mask_sigmoid"
    report = Report()
    with torch.no_grad():
        got = compile_rewritten(layer, report, to="sigmoid", strict=True)(**inputs)
        want = oracle(**inputs)
        softmax = layer(**inputs)
    sites = report.attention_sites()
    assert len(sites) == 1 and sites[0].status == "rewritten"
    assert (want - softmax).abs().max() > 1e-2  # sigmoid is not the softmax the layer had
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for kind in ("linear", "summary", "hashed"):
        torch._dynamo.reset()
        report = Report()
        with torch.no_grad():
            compile_rewritten(layer, report, to=kind)(**inputs)
        (site,) = report.attention_sites()
        assert site.status == "skipped" and site.reason, (kind, site)
        torch._dynamo.reset()
        with torch.no_grad(), pytest.raises(attnrewrite.RewriteFailed, match=kind):
            compile_rewritten(layer, Report(), to=kind, strict=True)(**inputs)


def test_sigmoid_gives_the_same_model_compiled_whole_or_layer_by_layer():
    """Compiling each decoder layer alone (FSDP2's per-layer compile) hands the layers a causal-and-padding mask built
    in another graph, which sigmoid takes as a general mask; compiled whole, the same sites are proven causal with
    padding.  bias="auto" counts, per query row, the keys the mask leaves it, so both give the model the same
    sigmoid attention (an n counting every key made the two differ by ~0.1 in the logits)."""
    import copy

    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    padding = torch.tensor([[1] * 9, [0] * 2 + [1] * 7])  # left padding in the second row
    whole_report, layer_report = Report(), Report()
    layered = copy.deepcopy(model)
    for i, layer in enumerate(layered.model.layers):
        layered.model.layers[i] = compile_rewritten(layer, layer_report, to="sigmoid", strict=True)
    with torch.no_grad():
        whole = compile_rewritten(model, whole_report, to="sigmoid", strict=True)(ids, attention_mask=padding).logits
        by_layer = layered(ids, attention_mask=padding).logits
        softmax = model(ids, attention_mask=padding).logits
    assert [s.status for s in whole_report.attention_sites()] == ["rewritten"] * 2
    assert [s.status for s in layer_report.attention_sites()] == ["rewritten"] * 2
    assert (whole - softmax).abs().max() > 1e-2  # sigmoid ran
    keep = padding.bool()  # the padded query rows see no real key; compare the rows of real tokens
    torch.testing.assert_close(by_layer[keep], whole[keep], rtol=1e-5, atol=1e-5)


class ScaledByAttribute(nn.Module):
    """Causal attention with key padding and two query heads per key/value head, scaled by a float attribute;
    q and k made float32 inside an autocast region (as a rotary embedding in float32 does) while v stays in the
    autocast dtype.  Under ``dynamic=True`` Dynamo reads ``self.scaling`` as a graph value (a SymFloat)."""

    def __init__(self):
        super().__init__()
        self.proj, self.scaling = nn.Linear(16, 32), 0.3
        self.turn = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x, keep):  # x [B, T, 16], keep [B, T] bool: the keys that are not padding
        q, k, v = self.proj(x).split([16, 8, 8], dim=-1)
        q = q.unflatten(-1, (2, 8)).transpose(1, 2)  # [B, 2, T, 8]
        k, v = k[:, None], v[:, None]  # [B, 1, T, 8]
        q, k = q * self.turn.float(), k * self.turn.float()  # float32 under autocast
        k, v = k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1)
        scores = (q @ k.transpose(-1, -2)) * self.scaling
        t = q.shape[-2]
        visible = torch.ones(t, t, dtype=torch.bool, device=x.device).tril() & keep[:, None, None, :]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return (probs.to(v.dtype) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "sliding_window"])
def test_a_symbolic_scale_computes_as_a_constant_one_under_autocast(kind):
    """The same model captured with dynamic=None (its scale a constant) and dynamic=True (a SymFloat) computes
    the same numbers, bit for bit, forward and backward, in bfloat16 autocast.  The symbolic scale used to be
    multiplied into q before the op, which then computed (q·scale)·kᵀ where the constant path computes
    scale·(q·kᵀ): float32 results a last bit apart, which the bfloat16 roundings after the op turn into
    differences of a bfloat16 step, and which 10 training steps amplified past the numerics rule (issue 12's
    bf16 training-matrix cells)."""
    x = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(3))
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 8:] = False
    results = []
    for dynamic in (None, True):
        torch.manual_seed(0)
        model = ScaledByAttribute()
        report = Report()
        compiled = compile_rewritten(model, report, to=kind, strict=True, dynamic=dynamic)
        with torch.autocast("cpu", torch.bfloat16):
            out = compiled(x, keep)
        out.float().square().sum().backward()
        assert [s.status for s in report.attention_sites()] == ["rewritten"], report
        results.append((out, model.proj.weight.grad, model.turn.grad))
        torch._dynamo.reset()
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
