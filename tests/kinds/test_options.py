"""Options are checked when they are given, at every entry point, model with attention or not.

A bad value must raise at once — ValueError (or TypeError for a wrong type) naming the option, the
value and what is accepted — never turn into a "pass failed" warning with the model left as softmax.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import attnrewrite

BAD = [  # (kind, option, value, error, words the message must hold)
    ("linear", "feature_map", "bogus", ValueError, "'elu'"),
    ("linear", "feature_map", 3, TypeError, "one of"),
    ("linear", "eps", -1, ValueError, "> 0"),
    ("linear", "eps", float("nan"), ValueError, "finite"),
    ("linear", "use_scale", "no", TypeError, "True or False"),
    ("linear", "features", 0, ValueError, ">= 1"),
    ("linear", "seed", 1.5, TypeError, "int"),
    ("linear", "key_gate", 1, TypeError, "True or False"),
    ("linear", "gate_normaliser", "yes", TypeError, "True or False"),
    ("linear", "feature_bias", 0, TypeError, "True or False"),
    ("sigmoid", "bias", "nope", ValueError, "'auto'"),
    ("sigmoid", "bias", True, TypeError, "'auto' or a finite number"),
    ("sigmoid", "bias", float("inf"), ValueError, "finite"),
    ("summary", "chunk_size", "8", TypeError, "int >= 1"),
    ("summary", "chunk_size", 0, ValueError, "int >= 1"),
    ("summary", "window_chunks", -2, ValueError, ">= 0"),
    ("summary", "summary", "max", ValueError, "'mean'"),
    ("hashed", "top_k", -1, ValueError, ">= 0"),
    ("hashed", "bits", 7, ValueError, "multiple of 8"),
    ("hashed", "bits", 0, ValueError, ">= 8"),
    ("hashed", "hash", "lsh", ValueError, "'random'"),
    ("hashed", "sinks", None, TypeError, "int"),
]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):  # [B, T, 16]
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x).relu()


def _entry_points():
    """Each way a user hands options to attnrewrite, as ``fn(model_class, to, **options)``; each must
    raise before running the model."""

    def decorate_instance(cls, to, **options):
        attnrewrite.rewrite(cls(), to=to, **options)

    def decorate_class(cls, to, **options):
        attnrewrite.rewrite(to=to, **options)(type("Decorated", (cls,), {}))

    def explain(cls, to, **options):
        attnrewrite.explain(cls(), torch.randn(2, 5, 16), to=to, options=options)

    def convert(cls, to, **options):
        attnrewrite.convert(cls(), to=to, example_inputs=(torch.randn(2, 5, 16),), **options)

    return {"rewrite(model)": decorate_instance, "@rewrite class": decorate_class, "explain": explain,
            "convert": convert}


@pytest.mark.parametrize("kind,option,value,error,words", BAD, ids=lambda x: repr(x)[:20])
@pytest.mark.parametrize("entry", list(_entry_points()))
@pytest.mark.parametrize("cls", [Attention, NoAttention])
def test_a_bad_value_raises_when_given(kind, option, value, error, words, entry, cls, monkeypatch):
    ran = []
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: ran.append(1) or nn.Module.__call__(self, *a, **k))
    with pytest.raises(error) as caught:
        _entry_points()[entry](cls, kind, **{option: value})
    message = str(caught.value)
    assert repr(option) in message and repr(value) in message and words in message, message
    assert not ran, "the model ran before the options were checked"


@pytest.mark.parametrize("cls", [Attention, NoAttention])
def test_torch_compile_checks_options_on_the_first_graph(cls):
    """torch.compile takes no hook at wrap time: the backend checks before any rewriting, on the
    first graph, so even a model without attention reports the bad option (not a warning)."""
    compiled = torch.compile(cls(), backend="attnrewrite", options={"to": "linear", "feature_map": "bogus"})
    with pytest.raises(Exception, match="option 'feature_map' of kind 'linear' must be one of"):
        compiled(torch.randn(2, 5, 16))


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['chunks'\] for kind 'summary'.*'chunk_size'"):
        attnrewrite.rewrite(Attention(), to="summary", chunks=4)


def test_good_values_pass_and_reach_the_kind():
    """Accepted spellings (ints for floats, None where optional) are not rejected."""
    from attnrewrite.rewriter.options import RewriteOptions

    parsed = RewriteOptions.parse({"to": "linear", "eps": 1, "features": None, "use_scale": True})
    assert parsed.kind_options["eps"] == 1 and parsed.kind_options["use_scale"] is True
    parsed = RewriteOptions.parse({"to": "sigmoid", "bias": -3})
    assert parsed.kind_options == {"bias": -3, "learned": False, "impl": "auto"}
    model = attnrewrite.rewrite(Attention(), to="hashed", bits=16, top_k=1, compiler="eager")
    assert torch.isfinite(model(torch.randn(2, 5, 16))).all()


def test_duplicate_kind_names_are_refused():
    from attnrewrite.kinds import registry

    softmax = attnrewrite.kinds.get("softmax")
    registry.register(softmax)  # the same kind again: a re-import, accepted
    clone = registry.Kind(name="softmax", emit=softmax.emit, supports=softmax.supports)
    with pytest.raises(ValueError, match="named 'softmax' is registered already"):
        registry.register(clone)
    assert attnrewrite.kinds.get("softmax") is softmax


def test_the_backend_checks_with_the_same_rules():
    from attnrewrite.rewriter.backend import attnrewrite_backend

    gm = torch.fx.symbolic_trace(NoAttention())
    with pytest.raises(TypeError, match="option 'chunk_size' of kind 'summary'"):
        attnrewrite_backend(gm, [torch.randn(2, 5, 16)], options={"to": "summary", "chunk_size": 2.0})
