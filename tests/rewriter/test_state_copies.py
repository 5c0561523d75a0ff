"""Per-site states (convert) survive every way a model is copied, saved, loaded or wrapped.

For each stateful kind and each copy path, the compiled copy computes what the compiled original
computes (not plain softmax), every site is rewritten, and training the copy changes the copy's
states — not the original's, which Dynamo would run if it reused the original's compiled code.
The original and the copy are compiled with one backend object, as two compiles of a model with the
same options are: Dynamo then shares compiled code between instances unless a guard tells them apart.
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import attnrewrite
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.state import is_state_name
from attnrewrite.targets.llama import Llama

T = 16
CASES = {
    "linear-hedgehog": ("linear", {"feature_map": "hedgehog"}),
    "linear-favor": ("linear", {"feature_map": "favor", "seed": 3}),
    "summary-learned": ("summary", {"summary": "learned", "chunk_size": 4, "window_chunks": 1}),
    "hashed-learned": ("hashed", {"hash": "learned", "bits": 16, "top_k": 3, "window": 3, "sinks": 1}),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm, self.attention = nn.LayerNorm(dim), Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attention(self.norm(x))
        return x + self.mlp(x)


class Decoder(nn.Module):
    """A tiny causal decoder: 2 pre-norm blocks of causal SDPA attention and an MLP."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _decoder():
    torch.manual_seed(0)
    return Decoder()


def _llama():
    torch.manual_seed(0)
    return Llama.from_name("tiny")


MODELS = {
    "decoder": (_decoder, torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))),
    "llama": (_llama, torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))),
}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2 holds sharded parameters as DTensors."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _states(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of every attnrewrite state (parameters and buffers), by name."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: _full(t).detach().clone() for name, t in named if is_state_name(name)}


def _convert(model: nn.Module, kind: str, options: dict, tokens: torch.Tensor) -> nn.Module:
    return attnrewrite.convert(model, kind, (tokens,), **options)


def _converted(model_name: str, kind: str, options: dict) -> nn.Module:
    """The model converted, its states moved away from their initial values (as training would)."""
    build, tokens = MODELS[model_name]
    model = _convert(build(), kind, options, tokens)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_state_name(name):
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model


# --------------------------------------------------------------------------- the copy paths


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group (FSDP2 and DDP need one); an in-process store, so no port is used."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def _deepcopy(model, model_name, kind, options):
    return copy.deepcopy(model)


def _pickle(model, model_name, kind, options):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _state_dict(model, model_name, kind, options):
    """The documented reload: build the model, convert it, load the saved state_dict."""
    build, tokens = MODELS[model_name]
    fresh = _convert(build(), kind, options, tokens)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    return fresh


def _orig_mod(model, model_name, kind, options):
    """A model wrapped by torch.compile before it is converted: every path starts with ``_orig_mod.``."""
    build, tokens = MODELS[model_name]
    fresh = _convert(torch.compile(build(), backend="eager"), kind, options, tokens)
    state = torch.compile(model, backend="eager").state_dict()
    assert any(name.startswith("_orig_mod.") and is_state_name(name) for name in state)
    fresh.load_state_dict(state)
    return fresh


def _fsdp2(model, model_name, kind, options):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(copy.deepcopy(model))


def _fsdp2_per_layer(model, model_name, kind, options):
    """FSDP2 as it is used: one group per layer, then the root (Dynamo then compiles each layer's frame)."""
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    for layer in sharded.layers:
        fully_shard(layer)
    return fully_shard(sharded)


def _ddp(model, model_name, kind, options):
    """DistributedDataParallel: every path starts with ``module.``."""
    return nn.parallel.DistributedDataParallel(copy.deepcopy(model))


PATHS = {"deepcopy": _deepcopy, "torch.save": _pickle, "state_dict": _state_dict, "orig_mod": _orig_mod,
         "fsdp2": _fsdp2, "fsdp2-per-layer": _fsdp2_per_layer, "ddp": _ddp}
DISTRIBUTED = {"fsdp2", "fsdp2-per-layer", "ddp"}


def _backend(kind: str, options: dict, reports: list) -> functools.partial:
    return functools.partial(attnrewrite_backend, options={"to": kind, "compiler": "eager", **options},
                             _report_sink=reports.append)


def _assert_all_rewritten(reports: list, sites: int | None = 2) -> None:
    """``sites`` sites rewritten in all (None: at least one, as when identical layers share one
    compiled graph) and none skipped."""
    rewritten = [s for r in reports for s in r.rewritten]
    skipped = [f"{s.module}: {s.reason}" for r in reports for s in r.skipped if s.spec is not None]
    assert (len(rewritten) >= 1 if sites is None else len(rewritten) == sites) and not skipped, (
        len(rewritten), skipped)


# The llama target runs every path on the hand-written decoder, and on itself the paths that differ in
# kind (a copy, a reload, a sharding, a wrapper).  Not FSDP2 per layer: its causal mask is built in the
# root and enters each layer's graph as an input, which the pass cannot prove causal (the sites are
# skipped with that reason, states or not).
COMBINATIONS = [("decoder", path) for path in PATHS] + [
    ("llama", path) for path in ("deepcopy", "state_dict", "fsdp2", "ddp")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("model_name,path", COMBINATIONS)
def test_a_copy_computes_and_trains_its_own_states(model_name, case, path, request):
    if path in DISTRIBUTED:
        request.getfixturevalue("process_group")
    kind, options = CASES[case]
    tokens = MODELS[model_name][1]
    original = _converted(model_name, kind, options)
    reports: list = []
    backend = _backend(kind, options, reports)
    want = torch.compile(original, backend=backend)(tokens).detach()  # with grad, as the copy: the same guards
    with torch.no_grad():
        plain = original(tokens)  # not compiled: softmax
    _assert_all_rewritten(reports)
    assert (want - plain).abs().max() > 1e-3, "the kind must differ from softmax, or the test proves nothing"
    original_states = _states(original)

    replica = PATHS[path](original, model_name, kind, options)
    optimizer = torch.optim.SGD(replica.parameters(), lr=0.5)  # before a forward: FSDP2 swaps parameters in it
    reports.clear()
    compiled = torch.compile(replica, backend=backend)
    got = compiled(tokens)
    torch.testing.assert_close(_full(got), want, rtol=1e-5, atol=1e-5)
    # a copy with the same structure may run the code compiled for the original (its states are graph
    # inputs); whatever was compiled for it rewrote every site, and it trains its own states (below)
    if reports:
        _assert_all_rewritten(reports, sites=None)

    before = _states(replica)
    assert before.keys() and all(torch.equal(a, b) for a, b in zip(before.values(), original_states.values()))
    trained = [name for name, p in replica.named_parameters() if is_state_name(name)]
    if case == "linear-favor":  # fixed random features: buffers, nothing to train
        assert not trained
        return
    assert trained
    for _ in range(2):
        compiled(tokens).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _states(replica)
    unchanged = [name for name in trained if torch.equal(before[name], after[name])]
    assert not unchanged, f"no gradient reached {unchanged}"
    # the copy trained its own states: the original's, baked into the code compiled first, are untouched
    assert all(torch.equal(t, original_states[name]) for name, t in _states(original).items())


# --------------------------------------------------------------------------- convert and options


def test_converting_again_keeps_the_trained_states():
    kind, options = CASES["linear-hedgehog"]
    model = _converted("decoder", kind, options)
    modules = {name: m for name, m in model.named_modules() if is_state_name(name)}
    trained = _states(model)
    _convert(model, kind, options, MODELS["decoder"][1])
    assert {name: m for name, m in model.named_modules() if is_state_name(name)} == modules  # the same objects
    assert all(torch.equal(t, trained[name]) for name, t in _states(model).items())
    assert len(model.attnrewrite_report.rewritten) == 2


def test_converting_with_other_options_raises_unless_replace():
    model = _converted("decoder", *CASES["linear-hedgehog"])
    tokens = MODELS["decoder"][1]
    with pytest.raises(ValueError, match="made for .*hedgehog.*replace=True"):
        _convert(model, "linear", {"feature_map": "favor"}, tokens)
    assert any(name.endswith("q_map.weight") for name in _states(model))  # nothing was touched

    attnrewrite.convert(model, "linear", (tokens,), replace=True, feature_map="favor")
    names = list(_states(model))
    assert names and all(name.endswith("projection") for name in names), names


def test_compiling_with_other_options_than_converted_skips_with_the_reason():
    """A hedgehog state must not run when favor is asked for: the sites stay softmax, and say why."""
    model = _converted("decoder", *CASES["linear-hedgehog"])
    tokens = MODELS["decoder"][1]
    reports: list = []
    with torch.no_grad():
        got = torch.compile(model, backend=_backend("linear", {"feature_map": "favor"}, reports))(tokens)
        torch.testing.assert_close(got, model(tokens))
    skipped = [s for r in reports for s in r.skipped]
    assert len(skipped) == 2 and not any(r.rewritten for r in reports)
    assert all("other options" in s.reason and "HedgehogFeatureMap" in s.reason for s in skipped)


def test_a_replaced_state_is_used_without_resetting_dynamo():
    """The compiled code is guarded on the state object: swapping it in recompiles."""
    kind, options = CASES["linear-hedgehog"]
    model = _converted("decoder", kind, options)
    tokens = MODELS["decoder"][1]
    compiled = torch.compile(model, backend=_backend(kind, options, []))
    with torch.no_grad():
        first = compiled(tokens)
        attention = model.layers[0].attention
        doubled = copy.deepcopy(attention.attnrewrite_linear)
        doubled.q_map.weight.mul_(2)
        attention.attnrewrite_linear = doubled
        second = compiled(tokens)
        torch.testing.assert_close(second, torch.compile(copy.deepcopy(model), backend=_backend(kind, options, []))(
            tokens))
    assert (first - second).abs().max() > 1e-4


def test_a_layer_compiled_on_its_own_finds_its_state():
    """The attention computed in the compiled module's own forward: the owner is the frame's ``self``."""
    kind, options = CASES["hashed-learned"]
    model = _converted("decoder", kind, options)
    attention = model.layers[1].attention
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(3))
    reports: list = []
    with torch.no_grad():
        got = torch.compile(attention, backend=_backend(kind, options, reports))(x)
        wrapped = torch.compile(nn.Sequential(attention), backend=_backend(kind, options, []))(x)  # path "0"
        assert (got - attention(x)).abs().max() > 1e-3
    _assert_all_rewritten(reports, sites=1)
    # (the owner's pre-hook, run before the compiled forward, is a frame of its own: a graph without sites)
    assert [s.module for r in reports for s in r.sites] == [""]
    torch.testing.assert_close(got, wrapped)


def test_tensors_loaded_with_assign_are_used_by_aot_autograd():
    """AOTAutograd lifts a state's tensors as constants: new tensor objects on the same state recompile."""
    kind, options = CASES["linear-hedgehog"]
    model = _converted("decoder", kind, options)
    tokens = MODELS["decoder"][1]
    doubled = {name: 2 * t if is_state_name(name) else t for name, t in model.state_dict().items()}
    compile_options = {"to": kind, "compiler": "aot_eager", **options}
    compiled = torch.compile(model, backend=functools.partial(attnrewrite_backend, options=compile_options))
    with torch.no_grad():
        first = compiled(tokens)
        model.load_state_dict(doubled, assign=True)
        second = compiled(tokens)
        torch._dynamo.reset()
        fresh = torch.compile(model, backend=functools.partial(attnrewrite_backend, options=compile_options))(tokens)
    assert (first - second).abs().max() > 1e-3
    torch.testing.assert_close(second, fresh)


def test_fsdp2_trains_under_aot_autograd_without_recompiling(process_group):
    """FSDP2 swaps sharded and unsharded parameters around every forward: the guards on the state's
    tensors must hold across steps (the unsharded tensors are the same objects each time)."""
    kind, options = CASES["summary-learned"]
    model = _fsdp2(_converted("decoder", kind, options), "decoder", kind, options)
    tokens = MODELS["decoder"][1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reports: list = []
    backend = functools.partial(attnrewrite_backend, options={"to": kind, "compiler": "aot_eager", **options},
                                _report_sink=reports.append)
    compiled = torch.compile(model, backend=backend)
    before = _states(model)
    outputs = []
    for _ in range(3):
        out = compiled(tokens)
        outputs.append(out.detach())
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(reports) == 1, f"compiled {len(reports)} times"
    _assert_all_rewritten(reports)
    after = _states(model)
    assert all(not torch.equal(before[name], after[name]) for name in before)
    assert (outputs[2] - outputs[1]).abs().max() > 0  # the steps reach the compiled code


_GLOBAL_MODEL: nn.Module | None = None


def _step(tokens):
    return _GLOBAL_MODEL(tokens)


def test_a_function_around_a_global_model_finds_its_states():
    """A compiled training step that calls a model held in a global: the paths start at G['...']."""
    global _GLOBAL_MODEL
    kind, options = CASES["linear-hedgehog"]
    _GLOBAL_MODEL = _converted("decoder", kind, options)
    tokens = MODELS["decoder"][1]
    reports: list = []
    try:
        with torch.no_grad():
            got = torch.compile(_step, backend=_backend(kind, options, reports))(tokens)
            want = torch.compile(copy.deepcopy(_GLOBAL_MODEL), backend=_backend(kind, options, []))(tokens)
    finally:
        _GLOBAL_MODEL = None
    _assert_all_rewritten(reports)
    assert {s.module for r in reports for s in r.rewritten} == {"layers.0.attention", "layers.1.attention"}
    torch.testing.assert_close(got, want)


def _hand_written(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    """``model`` with causal linear attention written out, each layer with its own feature maps:
    out_i = Σ_{j≤i} φq(q_i)·φk(k_j) v_j / (Σ_{j≤i} φq(q_i)·φk(k_j) + 1e-6), φ from the layer's state."""
    x = model.embed(tokens)
    for block in model.layers:
        attention, h = block.attention, block.norm(x)
        B, L, D = h.shape
        q, k, v = attention.qkv(h).view(B, L, 3, attention.heads, D // attention.heads).permute(2, 0, 3, 1, 4)
        fq, fk = attention.attnrewrite_linear(q, k)
        w = (fq @ fk.transpose(-2, -1)).tril()
        y = (w / (w.sum(-1, keepdim=True) + 1e-6)) @ v
        x = x + attention.out(y.transpose(1, 2).reshape(B, L, D))
        x = x + block.mlp(x)
    return model.head(x)


@pytest.mark.parametrize("case", ["linear-hedgehog", "linear-favor"])
def test_twelve_layers_compiled_one_by_one_share_code_and_run_their_own_states(case):
    """The states are graph inputs: 12 identical layers compiled one by one (``layer.compile()``, as
    FSDP2 per layer is used) share compiled code — Dynamo's recompile limit (8) is never reached — and
    every layer runs the kind with its own state: forward and state gradients equal a hand-written
    model, and ``verify`` finds no softmax anywhere."""
    kind, options = CASES[case]
    torch.manual_seed(0)
    tokens = MODELS["decoder"][1]
    model = _convert(Decoder(layers=12), kind, options, tokens)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every layer's state different, as after training
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if is_state_name(name):
                t.add_(0.3 * torch.randn(t.shape, generator=generator))
    oracle = copy.deepcopy(model)
    reports: list = []
    backend = functools.partial(attnrewrite_backend, options={"to": kind, "compiler": "aot_eager", **options},
                                _report_sink=reports.append)
    for layer in model.layers:
        layer.compile(backend=backend)
    got, want = model(tokens), _hand_written(oracle, tokens)
    assert 1 <= len(reports) <= 2, f"{len(reports)} compiles for 12 identical layers"  # (+1: input grad mode)
    _assert_all_rewritten(reports, sites=len(reports))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert (want - oracle(tokens)).abs().max() > 1e-3, "the kind must differ from softmax (oracle run as is)"
    got.square().mean().backward()
    want.square().mean().backward()
    trained = {n: p.grad for n, p in model.named_parameters() if is_state_name(n)}
    expected = {n: p.grad for n, p in oracle.named_parameters() if is_state_name(n)}
    assert trained.keys() == expected.keys()
    for name in trained:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-3, atol=1e-6, msg=name)
    attnrewrite.verify(model, tokens)  # every layer's attention ran as linear, none as softmax


def test_owners_compiled_one_by_one_warn_before_dynamo_gives_up():
    """An owner compiled on its own runs its pre-hook as a frame of its own, so its states are not graph
    inputs: each owner gets its own compiled code, and past Dynamo's recompile limit the next ones would
    run uncompiled — softmax — so the pass says so."""
    import warnings

    kind, options = CASES["linear-hedgehog"]
    model = _converted("decoder", kind, options)
    backend = _backend(kind, options, [])
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", attnrewrite.RewriteWarning)
        with torch.no_grad():
            x = torch.randn(2, T, 32)
            torch.compile(model.layers[0].attention, backend=backend)(x)
            assert not [w for w in caught if "recompile_limit" in str(w.message)]
            torch.compile(model.layers[1].attention, backend=backend)(x)
    said = [str(w.message) for w in caught if "recompile_limit" in str(w.message)]
    assert len(said) == 1 and "forward" in said[0] and "2th time" in said[0], said
    assert "uncompiled, with their original attention" in said[0]


def test_ddp_graph_split_into_buckets_finds_the_states(process_group, monkeypatch):
    """Dynamo's DDPOptimizer cuts the graph at DDP's gradient buckets and hands each piece to the
    backend: each piece's sites still reach their owners through the frame's module paths."""
    monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 2000)  # DDPOptimizer's first bucket, kept small
    kind, options = CASES["hashed-learned"]
    model = _converted("decoder", kind, options)
    tokens = MODELS["decoder"][1]
    want = torch.compile(model, backend=_backend(kind, options, []))(tokens).detach()
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model), bucket_cap_mb=0.005)
    reports: list = []
    got = torch.compile(ddp, backend=_backend(kind, options, reports))(tokens)
    assert len(reports) > 2  # the graph really was split
    _assert_all_rewritten(reports)
    torch.testing.assert_close(got, want)
    got.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ddp.named_parameters() if is_state_name(n))
