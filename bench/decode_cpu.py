"""Decode on the CPU with exact attention, the summary kind and the hashed kind: step time and KV-cache bytes.

One attention layer of a Llama-3-8B-sized model (32 query heads, 8 key/value heads, head width 128,
float32, batch 1) holds a context of 4k, 16k and 64k random tokens in each cache; a decode step writes
one new token into the cache and attends to what the cache returns, with the same grouped-query decode
attention for all three (:func:`decode_attention`: the query heads of a group form the rows of one
matrix product against their key/value head, so no key is copied; ``F.scaled_dot_product_attention``
with ``enable_gqa`` repeats K and V on the CPU, which would slow the exact baseline down by that copy):

- exact: the static cache of the llama target, attention over all L keys;
- summary: ``attnrewrite.SummaryCache`` layer (chunk_size 8, window_chunks 128), attention over the
  L/8 − 128 summaries and the ≤ 1032 window tokens (chunk folding every 8 steps included);
- hashed: ``attnrewrite.HashedCache`` layer (bits 64, top_k 256, window 64, sinks 4): XOR/popcount of
  the query codes against L packed key codes, top-k, then attention over 324 gathered keys.

Steps of the three kinds are interleaved (one of each, repeated) so that load on a shared machine hits
them alike; the table gives medians and the ratios to exact attention.

``--prompt N --new M`` measures a whole model instead (issue 14's decoding benchmark): the llama target
shaped like issue 14's model (4 layers, width 256, 8 query / 4 key-value heads of 32, float32, batch 1)
reads an N-token prompt through its cache in prefill steps of ``--prefill-chunk`` tokens, then generates
M tokens greedily, one decode step (a whole forward of one token) per token, with the static exact KV
cache of the target (attending to the positions written so far: :class:`PrefixKVCache`),
``attnrewrite.SummaryCache()`` and ``attnrewrite.HashedCache()`` (default options,
the kinds' defaults as above).  The three models share their weights, each keeps its own cache and
tokens, and their steps are interleaved; the table gives the median time per generated token, the
prefill time and the cache bytes after the last token, each with its ratio to the exact cache.

    PYTHONPATH=. python bench/decode_cpu.py                  # 4k, 16k, 64k (about a minute)
    PYTHONPATH=. python bench/decode_cpu.py --contexts 4096 --steps 10
    PYTHONPATH=. python bench/decode_cpu.py --prompt 16384 --new 256     # the whole model (a few minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch

from attnrewrite.decode.hashed import HashedLayer
from attnrewrite.decode.summary import SummaryLayer
from attnrewrite.targets.llama import KVCache

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
SUMMARY = dict(chunk_size=8, window_chunks=128)
HASHED = dict(bits=64, top_k=256, window=64, sinks=4)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v at one query position: q [B, Hq, 1, D], keys/values [B, Hkv, L, D] → [B, Hq, 1, D]."""
    batch, heads_q, _, dim = q.shape
    heads_kv = keys.shape[1]
    rows = q.reshape(batch, heads_kv, heads_q // heads_kv, dim)                   # [B, Hkv, g, D]
    probs = torch.softmax((rows @ keys.transpose(-1, -2)) * dim ** -0.5, dim=-1)  # [B, Hkv, g, L]
    return (probs @ values).reshape(batch, heads_q, 1, values.shape[-1])


class Exact:
    name = "exact"

    def __init__(self, context: int, capacity: int, k, v):
        self.cache = KVCache(1, HEADS_KV, capacity, HEAD_DIM, torch.float32)
        self.cache.update(torch.arange(context), k, v)
        self.length = context

    def step(self, q, k, v):
        self.cache.update(torch.tensor([self.length]), k, v)
        self.length += 1
        keys, values = self.cache.k_cache[:, :, :self.length], self.cache.v_cache[:, :, :self.length]
        return decode_attention(q, keys, values)

    def nbytes(self) -> int:
        return self.cache.k_cache.nbytes + self.cache.v_cache.nbytes


class Summary:
    name = "summary"

    def __init__(self, context: int, capacity: int, k, v):
        self.layer = SummaryLayer(**SUMMARY, max_seq_len=capacity)
        self.layer.prepare(1, HEADS_Q, HEADS_KV, HEAD_DIM, torch.float32, "cpu")
        self.layer.append(k, v)

    def step(self, q, k, v):
        keys, values, _ = self.layer.step(k, v)
        return decode_attention(q, keys, values)

    def nbytes(self) -> int:
        return self.layer.nbytes()


class Hashed:
    name = "hashed"

    def __init__(self, context: int, capacity: int, k, v):
        self.layer = HashedLayer(**HASHED, max_seq_len=capacity)
        self.layer.prepare(1, HEADS_Q, HEADS_KV, HEAD_DIM, torch.float32, "cpu")
        self.layer.append(k, v)

    def step(self, q, k, v):
        keys, values, _ = self.layer.step(q, k, v)
        return decode_attention(q, keys, values)

    def nbytes(self) -> int:
        return self.layer.nbytes()


def run_context(context: int, steps: int, warmup: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(1, HEADS_KV, context, HEAD_DIM, generator=generator)
    v = torch.randn(1, HEADS_KV, context, HEAD_DIM, generator=generator)
    capacity = context + warmup + steps
    kinds = [Exact(context, capacity, k, v), Summary(context, capacity, k, v), Hashed(context, capacity, k, v)]
    del k, v
    times = {kind.name: [] for kind in kinds}
    for step in range(warmup + steps):
        q = torch.randn(1, HEADS_Q, 1, HEAD_DIM, generator=generator)
        k_new = torch.randn(1, HEADS_KV, 1, HEAD_DIM, generator=generator)
        v_new = torch.randn(1, HEADS_KV, 1, HEAD_DIM, generator=generator)
        for kind in kinds:
            start = time.perf_counter()
            out = kind.step(q, k_new, v_new)
            elapsed = time.perf_counter() - start
            assert out.shape == (1, HEADS_Q, 1, HEAD_DIM) and torch.isfinite(out).all()
            if step >= warmup:
                times[kind.name].append(elapsed)
    exact_ms = statistics.median(times["exact"]) * 1e3
    exact_bytes = kinds[0].nbytes()
    rows = []
    for kind in kinds:
        ms = statistics.median(times[kind.name]) * 1e3
        rows.append(dict(context=context, kind=kind.name, step_ms=ms, speedup=exact_ms / ms, cache_bytes=kind.nbytes(),
                         smaller=exact_bytes / kind.nbytes()))
    return rows


def model_config(length: int):
    """The llama target shaped like issue 14's model, for sequences of ``length`` positions."""
    from attnrewrite.targets.llama import LlamaConfig

    return LlamaConfig(vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=length)


class PrefixKVCache(KVCache):
    """The llama target's static KV cache, attending to the positions written so far only (the target's
    own returns all S_max positions under a mask; the result is the same, the masked tail costs time)."""

    def attend(self, input_pos, q, k, v, mask):
        keys, values = self.update(input_pos, k, v)
        length = int(input_pos[-1]) + 1
        return keys[:, :, :length], values[:, :, :length], mask[..., :length]


def cache_bytes(model, cache) -> int:
    """Bytes held by the model's KV cache: the static cache's buffers, or the kind cache's stores."""
    if cache is None:
        return sum(layer.attention.kv_cache.k_cache.nbytes + layer.attention.kv_cache.v_cache.nbytes
                   for layer in model.layers)
    return cache.nbytes()


@torch.no_grad()
def run_model(prompt_len: int, new: int, prefill_chunk: int, seed: int) -> list[dict]:
    """Prefill ``prompt_len`` random tokens and generate ``new`` greedily with each cache (module docstring)."""
    from attnrewrite import HashedCache, SummaryCache
    from attnrewrite.targets.llama import Llama

    total = prompt_len + new
    torch.manual_seed(seed)
    base = Llama(model_config(total)).eval()
    prompt = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    runs = {"exact": None, "summary": SummaryCache(), "hashed": HashedCache()}
    models, prefill_s, tokens, steps = {}, {}, {}, {name: [] for name in runs}
    for name, cache in runs.items():
        model = copy.deepcopy(base)
        model.setup_cache(1, total, cache=cache)
        if cache is None:
            for layer in model.layers:
                layer.attention.kv_cache = PrefixKVCache(1, base.config.n_kv_heads, total, base.config.head_dim,
                                                         torch.float32)
        start = time.perf_counter()
        for i0 in range(0, prompt_len, prefill_chunk):
            i1 = min(prompt_len, i0 + prefill_chunk)
            logits = model(prompt[:, i0:i1], torch.arange(i0, i1))
        prefill_s[name] = time.perf_counter() - start
        tokens[name] = logits[:, -1:].argmax(-1)
        models[name] = model
    for position in range(prompt_len, total - 1):
        for name, model in models.items():
            start = time.perf_counter()
            logits = model(tokens[name], torch.tensor([position]))
            steps[name].append(time.perf_counter() - start)
            assert torch.isfinite(logits).all()
            tokens[name] = logits[:, -1:].argmax(-1)
    exact_ms = statistics.median(steps["exact"]) * 1e3
    exact_bytes = cache_bytes(models["exact"], None)
    rows = []
    for name, model in models.items():
        ms = statistics.median(steps[name]) * 1e3
        nbytes = cache_bytes(model, runs[name])
        rows.append(dict(prompt=prompt_len, new=new, kind=name, token_ms=ms, speedup=exact_ms / ms,
                         prefill_s=prefill_s[name], cache_bytes=nbytes, smaller=exact_bytes / nbytes))
    return rows


def main_model(args) -> list[dict]:
    config = model_config(args.prompt + args.new)
    print(f"decode_cpu (model): {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); llama target {config.n_layers} layers, width {config.dim}, "
          f"{config.n_heads}q/{config.n_kv_heads}kv heads x {config.head_dim}, float32, batch 1; prompt {args.prompt} "
          f"(prefill steps of {args.prefill_chunk}), {args.new} new tokens, greedy; SummaryCache() and HashedCache() "
          f"with default options; median over the {args.new - 1} decode steps")
    rows = run_model(args.prompt, args.new, args.prefill_chunk, args.seed)
    print("| cache | ms per token | vs exact | prefill s | cache MiB | smaller |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['kind']} | {row['token_ms']:.2f} | {row['speedup']:.2f}x | {row['prefill_s']:.1f} | "
              f"{row['cache_bytes'] / 2**20:.2f} | {row['smaller']:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per kind and context")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--prompt", type=int, default=None,
                        help="whole-model mode: prompt tokens (with --new; module docstring)")
    parser.add_argument("--new", type=int, default=256, help="whole-model mode: tokens generated")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="whole-model mode: tokens per prefill step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.prompt is not None:
        rows = main_model(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return rows
    print(f"decode_cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); layer {HEADS_Q}q/{HEADS_KV}kv heads x {HEAD_DIM}, float32, batch 1; "
          f"summary {SUMMARY}, hashed {HASHED}; median of {args.steps} steps")
    rows = []
    for context in args.contexts:
        rows += run_context(context, args.steps, args.warmup, args.seed)
    print(f"{'context':>8} {'kind':>8} {'step ms':>9} {'vs exact':>9} {'cache MiB':>10} {'smaller':>8}")
    for row in rows:
        print(f"{row['context']:>8} {row['kind']:>8} {row['step_ms']:>9.3f} {row['speedup']:>8.2f}x "
              f"{row['cache_bytes'] / 2**20:>10.1f} {row['smaller']:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
