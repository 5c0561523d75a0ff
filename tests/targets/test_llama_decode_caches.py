"""The llama target decodes with the summary and hashed caches: generate() runs, and every step's logits
equal those of the model rewritten to the kind on the whole sequence (prefill, one token at a time, mixed);
learned states come from convert; the static cache is unchanged."""

import functools

import pytest
import torch

import attnrewrite
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.targets.llama import Llama

OPTIONS = {"summary": dict(chunk_size=4, window_chunks=1), "hashed": dict(bits=16, top_k=3, window=3, sinks=1)}
CACHES = {"summary": attnrewrite.SummaryCache, "hashed": attnrewrite.HashedCache}
T = 30
TOKENS = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(0))


def _rewritten_logits(model, to, options):
    torch._dynamo.reset()
    backend = functools.partial(attnrewrite_backend, options=dict(to=to, compiler="eager", strict=True, **options))
    with torch.no_grad():
        return torch.compile(model, backend=backend)(TOKENS)


def _cached_logits(model, cache, steps):
    model.setup_cache(2, T, cache=cache)
    out, start = [], 0
    with torch.no_grad():
        for count in steps:
            out.append(model(TOKENS[:, start:start + count], torch.arange(start, start + count)))
            start += count
    return torch.cat(out, 1)


@pytest.mark.parametrize("kind", ["summary", "hashed"])
@pytest.mark.parametrize("learned", [False, True])
def test_cached_decoding_equals_the_rewritten_model(kind, learned):
    torch.manual_seed(0)
    model = Llama.from_name("tiny").double().eval()
    options = dict(OPTIONS[kind])
    if learned:
        options[{"summary": "summary", "hashed": "hash"}[kind]] = "learned"
        model = attnrewrite.convert(model, kind, (TOKENS,), **options)
        with torch.no_grad():  # move the states away from their initial values
            for name, p in model.named_parameters():
                if "attnrewrite" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    want = _rewritten_logits(model, kind, options)
    # The target takes its softmax in float32 even when its weights are float64; the op computes in
    # float64.  That rounding, measured on the exact kind, bounds the difference of the two paths.
    rounding = (_rewritten_logits(model, "softmax", {}) - model(TOKENS)).abs().max()
    exact = model(TOKENS)
    assert (want - exact).abs().max() > 1e-3  # the kind really differs from exact attention
    for steps in ([1] * T, [T], [7, 1, 1, 12, 1, 8]):
        got = _cached_logits(model, CACHES[kind](**options), steps)
        assert (got - want).abs().max() <= 2 * rounding + 1e-12, (steps, (got - want).abs().max(), rounding)


@pytest.mark.parametrize("kind", ["summary", "hashed"])
def test_generate_with_each_cache(kind):
    torch.manual_seed(0)
    model = Llama.from_name("tiny").eval()
    cache = CACHES[kind](**OPTIONS[kind])
    out = model.generate(TOKENS[:, :9], max_new_tokens=20, cache=cache)
    assert out.shape == (2, 29) and torch.equal(out[:, :9], TOKENS[:, :9])
    assert all(layer.get_seq_length() == 28 for layer in cache.layers)  # the last token is never fed back
    # greedy decoding is deterministic and restarts from a fresh cache each call
    assert torch.equal(model.generate(TOKENS[:, :9], max_new_tokens=20, cache=cache), out)
    if kind == "summary":  # 5 summaries (chunks older than position 27's window) + 8 window tokens, not 28
        summaries = (28 - 1) // 4 - 1
        assert cache.layers[0].entries() == summaries + 28 - summaries * 4 == 13


def test_static_cache_still_the_default():
    from attnrewrite.targets.llama import KVCache

    model = Llama.from_name("tiny").eval()
    model.setup_cache(1, 16)
    assert all(isinstance(layer.attention.kv_cache, KVCache) for layer in model.layers)
