"""attnrewrite.convert: per-site parameters attached to the model, trained, saved and reloaded."""

import io

import pytest
import torch
import transformers as T

import attnrewrite
from attnrewrite.kernels.linear.stateful_maps import FavorFeatureMap, HedgehogFeatureMap, redraw_favor
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten

CFG = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(T.LlamaConfig(**CFG), attn_implementation="eager")


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def test_hedgehog_states_are_parameters_of_the_model_and_train():
    model = attnrewrite.convert(_llama(), "linear", {"input_ids": IDS}, feature_map="hedgehog")
    names = [n for n, _ in model.named_parameters() if "attnrewrite" in n]
    assert names == [f"model.layers.{i}.self_attn.attnrewrite_linear.{m}.weight"
                     for i in range(2) for m in ("q_map", "k_map")]
    assert len(model.attnrewrite_report.rewritten) == 2
    hedgehog = model.model.layers[0].self_attn.attnrewrite_linear.q_map
    assert isinstance(hedgehog, HedgehogFeatureMap)
    torch.testing.assert_close(hedgehog.weight[0], torch.eye(8))  # initialised to the identity

    report = Report()
    compiled = compile_rewritten(model, report, to="linear", feature_map="hedgehog", compiler="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = hedgehog.weight.detach().clone()
    loss = compiled(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert hedgehog.weight.grad is not None and hedgehog.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(before, hedgehog.weight.detach())
    assert len(report.rewritten) == 2


def test_hedgehogs_key_gate_weighs_each_key_by_exp_k_dot_u_and_starts_as_no_gate():
    torch.manual_seed(0)
    plain, gated = HedgehogFeatureMap(2, 4, 8, seed=3), HedgehogFeatureMap(2, 4, 8, seed=3, key_gate=True)
    assert plain.gate is None and gated.gate.shape == (2, 4)
    k = torch.randn(3, 2, 5, 4)
    torch.testing.assert_close(gated(k, is_query=False), plain(k, is_query=False))  # the gate starts at 0
    with torch.no_grad():
        gated.gate.copy_(torch.randn(2, 4))
    factor = torch.einsum("bhtd,hd->bht", k, gated.gate).exp().unsqueeze(-1)  # one factor per key and head
    torch.testing.assert_close(gated(k, is_query=False), plain(k, is_query=False) * factor)
    with torch.no_grad():  # the exponent is clamped: exp() stays finite
        gated.gate.fill_(1e4)
    assert torch.isfinite(gated(k, is_query=False)).all()


def test_the_key_gate_is_a_parameter_of_the_keys_map_only_and_trains():
    model = attnrewrite.convert(_llama(), "linear", {"input_ids": IDS}, feature_map="hedgehog", key_gate=True)
    names = [n for n, _ in model.named_parameters() if "attnrewrite" in n]
    assert names == [f"model.layers.{i}.self_attn.attnrewrite_linear.{m}" for i in range(2)
                     for m in ("q_map.weight", "k_map.weight", "k_map.gate")]
    gate = model.model.layers[0].self_attn.attnrewrite_linear.k_map.gate
    compiled = compile_rewritten(model, None, to="linear", feature_map="hedgehog", key_gate=True)
    compiled(input_ids=IDS, labels=IDS).loss.backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    report = attnrewrite.explain(_llama().eval(), input_ids=IDS, to="linear", options={"key_gate": True})
    assert not report.rewritten and all("key_gate=True is a part of the hedgehog feature map" in s.reason
                                        for s in report.skipped)


def test_the_gate_normaliser_adds_a_power_of_the_keys_softmax_normaliser_and_starts_at_none():
    torch.manual_seed(0)
    gated = HedgehogFeatureMap(2, 4, 8, seed=3, key_gate=True)
    both = HedgehogFeatureMap(2, 4, 8, seed=3, key_gate=True, gate_normaliser=True)
    assert both.gate_normaliser.shape == (2,)
    k = torch.randn(3, 2, 5, 4)
    torch.testing.assert_close(both(k, is_query=False), gated(k, is_query=False))  # a = 0: the key gate alone
    with torch.no_grad():
        u, a = torch.randn(2, 4), torch.tensor([1.0, 0.5])
        gated.gate.copy_(u)
        both.gate.copy_(u)
        both.gate_normaliser.copy_(a)
    z = torch.einsum("bhtd,hde->bhte", k, both.weight.detach())
    logits = torch.cat([z, -z], dim=-1)  # [B, H, T, 2F]
    want = gated(k, is_query=False) * (a[:, None] * logits.logsumexp(-1)).exp().unsqueeze(-1)  # one factor per key
    torch.testing.assert_close(both(k, is_query=False), want)
    # head 0 (a = 1): the softmax's normaliser undone, exp([x W, -x W]) times the gate
    torch.testing.assert_close(both(k, is_query=False)[:, 0], (logits[:, 0] + (k[:, 0] @ u[0])[..., None]).exp())
    with torch.no_grad():  # the exponent is clamped with the gate's: exp() stays finite
        both.gate_normaliser.fill_(1e4)
    assert torch.isfinite(both(k, is_query=False)).all()
    with pytest.raises(ValueError, match="give key_gate=True with it"):
        HedgehogFeatureMap(2, 4, 8, gate_normaliser=True)


def test_the_gate_normaliser_is_a_parameter_of_the_keys_map_and_trains_and_needs_the_key_gate():
    options = dict(feature_map="hedgehog", key_gate=True, gate_normaliser=True)
    model = attnrewrite.convert(_llama(), "linear", {"input_ids": IDS}, **options)
    names = [n for n, _ in model.named_parameters() if "attnrewrite" in n]
    assert names == [f"model.layers.{i}.self_attn.attnrewrite_linear.{m}" for i in range(2)
                     for m in ("q_map.weight", "k_map.weight", "k_map.gate", "k_map.gate_normaliser")]
    k_map = model.model.layers[0].self_attn.attnrewrite_linear.k_map
    compiled = compile_rewritten(model, None, to="linear", **options)
    compiled(input_ids=IDS, labels=IDS).loss.backward()
    assert k_map.gate_normaliser.grad is not None and k_map.gate_normaliser.grad.abs().sum() > 0
    for refused in ({"feature_map": "hedgehog"}, {"feature_map": "favor"}):  # no key gate to extend
        report = attnrewrite.explain(_llama().eval(), input_ids=IDS, to="linear",
                                     options={**refused, "gate_normaliser": True})
        assert not report.rewritten and all("gate_normaliser=True is a part of hedgehog's key gate" in s.reason
                                            for s in report.skipped)


def test_hedgehogs_feature_bias_adds_a_bias_per_head_and_feature_to_the_logits_and_starts_at_none():
    torch.manual_seed(0)
    plain, biased = HedgehogFeatureMap(2, 4, 8, seed=3), HedgehogFeatureMap(2, 4, 8, seed=3, feature_bias=True)
    assert plain.bias is None and biased.bias.shape == (2, 8)  # [H, 2·F]
    x = torch.randn(3, 2, 5, 4)
    torch.testing.assert_close(biased(x), plain(x))  # b = 0: the map without it
    with torch.no_grad():
        b = torch.randn(2, 8)
        biased.bias.copy_(b)
    z = torch.einsum("bhtd,hde->bhte", x, biased.weight.detach())
    want = torch.softmax(torch.cat([z, -z], dim=-1) + b[:, None, :], dim=-1)  # each head its own bias
    torch.testing.assert_close(biased(x), want)
    assert not torch.allclose(biased(x), plain(x))
    # with the key gate: the gate's factor times the biased softmax
    gated = HedgehogFeatureMap(2, 4, 8, seed=3, key_gate=True, feature_bias=True)
    with torch.no_grad():
        u = torch.randn(2, 4)
        gated.gate.copy_(u)
        gated.bias.copy_(b)
    torch.testing.assert_close(gated(x, is_query=False), want * torch.einsum("bhtd,hd->bht", x, u).exp()[..., None])


def test_the_feature_bias_is_a_parameter_of_both_maps_and_trains_and_needs_hedgehog():
    options = dict(feature_map="hedgehog", key_gate=True, feature_bias=True)
    model = attnrewrite.convert(_llama(), "linear", {"input_ids": IDS}, **options)
    names = [n for n, _ in model.named_parameters() if "attnrewrite" in n]
    assert names == [f"model.layers.{i}.self_attn.attnrewrite_linear.{m}" for i in range(2)
                     for m in ("q_map.weight", "q_map.bias", "k_map.weight", "k_map.gate", "k_map.bias")]
    state = model.model.layers[0].self_attn.attnrewrite_linear
    compiled = compile_rewritten(model, None, to="linear", **options)
    compiled(input_ids=IDS, labels=IDS).loss.backward()
    for bias in (state.q_map.bias, state.k_map.bias):
        assert bias.grad is not None and bias.grad.abs().sum() > 0
    report = attnrewrite.explain(_llama().eval(), input_ids=IDS, to="linear",
                                 options={"feature_map": "favor", "feature_bias": True})
    assert not report.rewritten and all("feature_bias=True is a part of the hedgehog feature map" in s.reason
                                        for s in report.skipped)


def test_saving_and_reloading_restores_the_outputs():
    model = attnrewrite.convert(_llama().eval(), "linear", {"input_ids": IDS}, feature_map="hedgehog")
    with torch.no_grad():
        for layer in model.model.layers:  # move the maps away from their initial value
            layer.self_attn.attnrewrite_linear.q_map.weight.add_(0.1 * torch.randn(4, 8, 8))
    want = compile_rewritten(model, None, to="linear", feature_map="hedgehog")(input_ids=IDS).logits
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)

    torch._dynamo.reset()
    fresh = attnrewrite.convert(_llama().eval(), "linear", {"input_ids": IDS}, feature_map="hedgehog")
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    got = compile_rewritten(fresh, None, to="linear", feature_map="hedgehog")(input_ids=IDS).logits
    torch.testing.assert_close(got, want)


def test_favor_features_are_seeded_and_redrawable():
    a = attnrewrite.convert(_llama().eval(), "linear", {"input_ids": IDS}, feature_map="favor", seed=3)
    b = attnrewrite.convert(_llama().eval(), "linear", {"input_ids": IDS}, feature_map="favor", seed=3)
    maps_a = [m for m in a.modules() if isinstance(m, FavorFeatureMap)]
    maps_b = [m for m in b.modules() if isinstance(m, FavorFeatureMap)]
    assert len(maps_a) == 2 and torch.equal(maps_a[0].projection, maps_b[0].projection)
    assert not torch.equal(maps_a[0].projection, maps_a[1].projection)  # layers draw independently
    before = maps_a[0].projection.clone()
    assert redraw_favor(a, seed=7) == 2 and not torch.equal(before, maps_a[0].projection)


def test_favor_approximates_softmax_attention():
    """Positive random features estimate exp(q·k/√d) without bias: the error of the output is a Monte-Carlo
    error, which falls as 1/√m with the number of features m.  So the bound is not a fixed number:
    16× more features must cut the mean error (over seeds) by at least 2 (4 in the limit; 2.5 measured),
    and at 4096 features the error must be under a third of the uniform average's (a quarter measured) (what a feature map that
    ignores q and k gives: every key weighted alike)."""
    from attnrewrite import ops
    from attnrewrite.kernels.linear.stateful_maps import LinearSiteState

    g = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(1, 2, 32, 8, generator=g, dtype=torch.float64) for _ in range(3))
    exact = ops.softmax_attention(q, k, v)

    def error(features: int, seed: int) -> float:
        favor = FavorFeatureMap(8, num_features=features, scale=8**-0.5, seed=seed).double()
        state = LinearSiteState(favor, favor)
        maps = (lambda x: state.q_map(x, True), lambda x: state.k_map(x, False))
        return float((ops.linear_attention(q, k, v, feature_map=maps) - exact).abs().max())

    few, many = (sum(error(m, seed) for seed in range(4)) / 4 for m in (256, 4096))
    uniform = float((v.mean(-2, keepdim=True) - exact).abs().max())
    assert many <= few / 2, f"error {many:.3g} at 4096 features against {few:.3g} at 256: not Monte-Carlo"
    assert many <= uniform / 3, f"error {many:.3g} is not far below the uniform average's {uniform:.3g}"


def test_compiling_without_convert_explains_what_to_do():
    report = attnrewrite.explain(_llama().eval(), input_ids=IDS, to="linear", options={"feature_map": "hedgehog"})
    assert not report.rewritten
    assert all("attnrewrite.convert" in s.reason for s in report.skipped)


def test_convert_needs_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        attnrewrite.convert(lambda x: x, "linear")


def test_converted_attention_is_the_rewritten_sites_attention_called_eagerly():
    """converted_attention: the kind's op with the owner's state as the rewrite applies it (here an HF llama's
    first layer, hedgehog maps); learned options without a state and options other than the conversion's raise;
    options without state need none (the plain op)."""
    model = attnrewrite.convert(_llama(), "linear", {"input_ids": IDS}, feature_map="hedgehog")
    owner = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 8, 8, generator=g) for h in (4, 2, 2))
    state = owner.attnrewrite_linear
    fq, fk = state(q, k)  # use_scale=False (the default): the maps see q as it is
    expected = attnrewrite.ops.linear_attention(fq, fk, v, is_causal=True, enable_gqa=True, feature_map="identity")
    got = attnrewrite.converted_attention(owner, q, k, v, "linear", is_causal=True, scale=8 ** -0.5, enable_gqa=True,
                                          feature_map="hedgehog")
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="made for"):
        attnrewrite.converted_attention(owner, q, k, v, "linear", is_causal=True, enable_gqa=True, feature_map="favor")
    bare = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs per-site parameters.*convert the model first"):
        attnrewrite.converted_attention(bare, q, k, v, "sigmoid", is_causal=True, enable_gqa=True, learned=True)
    torch.testing.assert_close(attnrewrite.converted_attention(bare, q, k, v, "sigmoid", is_causal=True, enable_gqa=True),
                               attnrewrite.ops.sigmoid_attention(q, k, v, is_causal=True, enable_gqa=True))
