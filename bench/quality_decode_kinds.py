"""How close the summary and hashed kinds stay to exact attention, without any training.

Two models, on the shipped text (docstrings of the standard library, validation split):

- the pretrained MiniLM (all-MiniLM-L6-v2, bidirectional; sequences of 256 word pieces): q, k, v of every
  layer are captured from the exact model, and each kind's output on them is compared with exact
  attention's (cosine similarity per query vector, mean over queries, heads and layers).  MiniLM is
  bidirectional, so the kinds run with ``is_causal=False`` (the rewriter itself leaves such sites alone:
  these kinds are for causal models); "whole model" is the cosine similarity of the sentence embeddings
  when every layer's attention is replaced by the kind;
- a byte-level Llama trained by ``examples/train_lm.py`` on 256-byte windows (causal): the same attention
  cosine on captured q, k, v, and the validation loss of the whole model rewritten to the kind by the
  pass (``torch.compile(..., backend="attnrewrite", options={"to": kind, ...})``) against the exact model.

Rows marked "sliding window" are controls with about the same number of keys per query and no
summaries / no code-selected keys (hashed with ``top_k=0``), to show what the summaries and the codes add.

    PYTHONPATH=. python examples/train_lm.py --threads 1 --block-size 256 --save bench/out/llama-char-256.pt
    PYTHONPATH=. python bench/quality_decode_kinds.py --threads 1     # trains the checkpoint first if missing
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnrewrite import ops
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.targets import llama as llama_target
from attnrewrite.targets.data import text_batch, text_corpus

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "bench" / "out" / "llama-char-256.pt"

# (kind, options, label): the settings measured on each model
MINILM_SETTINGS = [
    ("summary", dict(chunk_size=4, window_chunks=4), "C=4, W=4 (±16-20 tokens in full)"),
    ("summary", dict(chunk_size=8, window_chunks=4), "C=8, W=4 (±32-40 tokens in full)"),
    ("summary", dict(chunk_size=8, window_chunks=8), "C=8, W=8 (±64-72 tokens in full)"),
    ("hashed", dict(top_k=16, window=0, sinks=1), "top_k=16, sinks=1"),
    ("hashed", dict(top_k=32, window=0, sinks=1), "top_k=32, sinks=1"),
    ("hashed", dict(top_k=64, window=0, sinks=1), "top_k=64, sinks=1"),
]
LLAMA_SETTINGS = [
    ("summary", dict(chunk_size=4, window_chunks=8), "C=4, W=8 (33-36 recent bytes)"),
    ("summary", dict(chunk_size=8, window_chunks=4), "C=8, W=4 (33-40 recent bytes)"),
    ("summary", dict(chunk_size=8, window_chunks=8), "C=8, W=8 (65-72 recent bytes)"),
    ("summary", dict(chunk_size=16, window_chunks=2), "C=16, W=2 (33-48 recent bytes)"),
    ("hashed", dict(top_k=0, window=36, sinks=0), "sliding window 36 (control)"),
    ("hashed", dict(top_k=16, window=16, sinks=4), "top_k=16, window=16, sinks=4 (36 keys)"),
    ("hashed", dict(top_k=32, window=16, sinks=4), "top_k=32, window=16, sinks=4 (52 keys)"),
    ("hashed", dict(top_k=64, window=16, sinks=4), "top_k=64, window=16, sinks=4 (84 keys)"),
    ("hashed", dict(top_k=0, window=84, sinks=0), "sliding window 84 (control)"),
]


def kind_attention(kind: str, options: dict, q, k, v, key_valid=None, causal=True):
    """The kind's op on [B, H, T, D] inputs (``key_valid`` bool [B, T] or None)."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    op = ops.summary_attention if kind == "summary" else ops.hashed_attention
    return op(q, k, v, mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1], **options)


def exact_attention(q, k, v, key_valid=None, causal=True):
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return ops.softmax_attention(q, k, v, mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def row_cosine(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query's output vector: [B, H, T]."""
    return F.cosine_similarity(got.double(), want.double(), dim=-1)


# --------------------------------------------------------------------------- MiniLM


def minilm_sequences(tokenizer, count: int, length: int) -> torch.Tensor:
    """[count, length] ids: consecutive pieces of the validation text, each [CLS] … [SEP] (no padding)."""
    text = text_corpus().val.numpy().tobytes().decode("utf-8", errors="replace")
    ids = tokenizer(text[: 40 * count * length], add_special_tokens=False)["input_ids"]
    body = length - 2
    rows = [[tokenizer.cls_token_id, *ids[i * body:(i + 1) * body], tokenizer.sep_token_id] for i in range(count)]
    return torch.tensor(rows)


def capture_bert(model, ids):
    """q, k, v [B, H, T, D] of every layer of the exact model on ``ids``."""
    captured = []

    def hook(module, args):
        x = args[0]
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, module.n_heads, module.head_dim).transpose(1, 2)  # noqa: E731
        captured.append((split(module.query(x)), split(module.key(x)), split(module.value(x))))

    handles = [layer.attention.register_forward_pre_hook(hook) for layer in model.layers]
    with torch.no_grad():
        model(ids, torch.ones_like(ids))
    for handle in handles:
        handle.remove()
    return captured


def bert_with_kind(model, kind, options):
    """Context manager-free: patch every SelfAttention of ``model`` to run the kind (bidirectional)."""
    from attnrewrite.targets.bert import SelfAttention

    def forward(module, x, mask_bias):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, module.n_heads, module.head_dim).transpose(1, 2)  # noqa: E731
        valid = (mask_bias > -1e4).reshape(B, T)
        out = kind_attention(kind, options, split(module.query(x)), split(module.key(x)), split(module.value(x)),
                             valid, causal=False)
        return module.out(out.transpose(1, 2).reshape(B, T, C))

    for layer in model.layers:
        assert isinstance(layer.attention, SelfAttention)
        layer.attention.forward = functools.partial(forward, layer.attention)
    return model


def run_minilm(count: int, length: int) -> list[dict]:
    from attnrewrite.targets.bert import load_minilm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_minilm()
    ids = minilm_sequences(tokenizer, count, length)
    captured = capture_bert(model, ids)
    with torch.no_grad():
        exact_embedding = model.embed(ids, normalize=True)
    rows = []
    for kind, options, label in MINILM_SETTINGS:
        cosines = [row_cosine(kind_attention(kind, options, q, k, v, causal=False),
                              exact_attention(q, k, v, causal=False)) for q, k, v in captured]
        patched, _ = load_minilm()
        with torch.no_grad():
            embedding = bert_with_kind(patched, kind, options).embed(ids, normalize=True)
        rows.append(dict(model="MiniLM", kind=kind, setting=label, attention_cosine=float(torch.stack(cosines).mean()),
                         attention_cosine_p05=float(torch.quantile(torch.stack(cosines).flatten()[:1_000_000], 0.05)),
                         embedding_cosine=float((embedding * exact_embedding).sum(-1).mean())))
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- Llama


def load_trained_llama(path: Path, threads: int | None):
    if not path.exists():
        print(f"no checkpoint at {path}: training it with examples/train_lm.py (a long run)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--block-size", "256", "--save", str(path)] + (["--threads", str(threads)] if threads else [])
        _train_lm().main(argv)
    model, info = _train_lm().load_checkpoint(str(path))
    return model, info


@functools.lru_cache(maxsize=1)
def _train_lm():
    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "examples" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validation_windows(batches: int, batch_size: int, block: int):
    val = text_corpus().val
    generator = torch.Generator().manual_seed(1234)
    return [text_batch(val, batch_size, block, generator) for _ in range(batches)]


def capture_llama(model, tokens):
    captured = []

    def hook(module, args):
        x, cos, sin = args[0], args[1], args[2]
        B, T, _ = x.shape
        def heads(t, n):
            return t.view(B, T, n, module.head_dim).transpose(1, 2)

        q = llama_target.apply_rope(heads(module.q_proj(x), module.n_heads), cos, sin)
        k = llama_target.apply_rope(heads(module.k_proj(x), module.n_kv_heads), cos, sin)
        v = heads(module.v_proj(x), module.n_kv_heads)
        captured.append((q, k, v))

    handles = [layer.attention.register_forward_pre_hook(hook) for layer in model.layers]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return captured


def validation_loss(model, windows) -> float:
    with torch.no_grad():
        return sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in windows) / len(windows)


def rewritten(model, kind, options):
    torch._dynamo.reset()
    backend = functools.partial(attnrewrite_backend, options=dict(to=kind, compiler="eager", strict=True, **options))
    return torch.compile(model, backend=backend, dynamic=False)


def run_llama(path: Path, batches: int, batch_size: int, threads: int | None) -> list[dict]:
    model, info = load_trained_llama(path, threads)
    block = info.get("block_size", 256)
    windows = validation_windows(batches, batch_size, block)
    captured = capture_llama(model, windows[0][0])
    exact_loss = validation_loss(model, windows)
    print(f"llama: {path.name}, trained {info.get('steps')} steps on {block}-byte windows; exact validation loss "
          f"{exact_loss:.4f} nats/byte over {batches} x {batch_size} windows", flush=True)
    rows = [dict(model="Llama (bytes)", kind="softmax", setting="exact", attention_cosine=1.0, val_loss=exact_loss,
                 delta_loss=0.0)]
    for kind, options, label in LLAMA_SETTINGS:
        cosines = torch.stack([row_cosine(kind_attention(kind, options, q, k, v), exact_attention(q, k, v))
                               for q, k, v in captured])
        loss = validation_loss(rewritten(model, kind, options), windows)
        rows.append(dict(model="Llama (bytes)", kind=kind, setting=label, attention_cosine=float(cosines.mean()),
                         attention_cosine_p05=float(torch.quantile(cosines.flatten()[:1_000_000], 0.05)),
                         val_loss=loss, delta_loss=loss - exact_loss))
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--minilm-sequences", type=int, default=16)
    parser.add_argument("--minilm-length", type=int, default=256)
    parser.add_argument("--val-batches", type=int, default=10)
    parser.add_argument("--val-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [] if args.skip_minilm else run_minilm(args.minilm_sequences, args.minilm_length)
    rows += run_llama(args.checkpoint, args.val_batches, args.val_batch_size, args.threads)
    print("\n| model | kind | setting | attention cosine (mean) | 5th percentile | whole model |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        whole = (f"embedding cosine {row['embedding_cosine']:.4f}" if "embedding_cosine" in row
                 else f"val loss {row['val_loss']:.4f} ({row['delta_loss']:+.4f})")
        p05 = f"{row['attention_cosine_p05']:.4f}" if "attention_cosine_p05" in row else "—"
        print(f"| {row['model']} | {row['kind']} | {row['setting']} | {row['attention_cosine']:.4f} | {p05} "
              f"| {whole} |")
    print(f"quality_decode_kinds: {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
