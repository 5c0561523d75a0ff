"""The roofline of a whole model's attention on the CPU: FLOPs counted, this machine's sgemm rate measured.

``bench/model_speed_cpu.py --baselines floor,roofline`` uses this to print, beside its measured rows, the
lowest time the model could take with a given attention on this machine: the *floor* (the same model with
its attention replaced by "return the values", compiled by inductor, measured in the same run) plus the
attention's matrix-product FLOPs divided by the best one-thread sgemm rate measured here at the attention's
own shapes.  ``inductor / that`` is the highest "× inductor" any kernel of that attention could reach.

What is counted (multiply and add = 2 FLOPs; matrix products only — the softmax's exp, the row max and
sums, the masks and the normaliser are left out, so the bound is generous: a real kernel is slower):

- **exact** (the ``softmax`` rewrite; ``sigmoid`` does the same products): per query head and layer the
  products q·kᵀ and p·v over the (query, key) pairs that attention keeps — all T² bidirectional, the
  T(T+1)/2 on and below the diagonal causal — 2·D FLOPs per pair each, D the head width.  Grouped kv
  heads do not change it (every query head makes its own scores).  A training step adds the backward's
  four products of the same sizes (dP = dO·vᵀ like q·kᵀ; dV = Pᵀ·dO, dQ = dS·k, dK = dSᵀ·q like p·v) and
  no recomputation of q·kᵀ (which a flash backward does): 3× the forward.
- **linear** (causal or not, recurrent form, feature width F, the default elu map: F = D): per token and
  layer the state update φ(k)·vᵀ once per kv head and the read-out φ(q)·S once per query head, 2·F·D FLOPs
  each; a training step 3× the forward (the backward: two products per side).
- **the rest of the model** (its projections, MLP and head; what the floor runs), for the Llama of
  ``model_speed_cpu.py``: per token 2·(hidden·(q + k + v + o widths) + 3·hidden·mlp) per layer plus
  2·hidden·vocab for the head; a training step 3× — to say how close the measured floor is to its own
  roofline.

    PYTHONPATH=. python bench/roofline.py --lengths 1024,4096
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

FORMS = ("exact", "linear")
# which measured products bound which attention kind's time
KIND_FORM = {"softmax": "exact", "sigmoid": "exact", "linear": "linear"}
TRAIN_FACTOR = 3  # forward + backward products / forward products (see the module docstring)


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one model's attention at one length."""

    length: int
    q_heads: int
    kv_heads: int
    head_dim: int
    layers: int
    batch: int = 1
    causal: bool = True

    def __post_init__(self):
        for name in ("length", "q_heads", "kv_heads", "head_dim", "layers", "batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"AttentionShape.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")


def kept_pairs(length: int, causal: bool) -> int:
    """(query, key) pairs one head's attention keeps: T² bidirectional, T(T+1)/2 causal (with the diagonal)."""
    return length * (length + 1) // 2 if causal else length * length


def attention_flops(shape: AttentionShape, form: str, mode: str = "infer", features: int | None = None) -> dict:
    """Matrix-product FLOPs of the model's attention, split by the product's shape class:
    ``{"qk": ..., "pv": ...}`` for exact attention (q·kᵀ-like: inner dim D; p·v-like: output width D),
    ``{"state": ...}`` for linear attention.  ``mode``: ``infer`` (forward) or ``train`` (forward + backward)."""
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    sites = shape.batch * shape.layers
    if form == "exact":
        one = sites * shape.q_heads * 2 * shape.head_dim * kept_pairs(shape.length, shape.causal)
        # forward: one q·kᵀ, one p·v; backward: dP = dO·vᵀ (qk-like), dV, dQ, dK (pv-like)
        return {"qk": one, "pv": one} if mode == "infer" else {"qk": 2 * one, "pv": 4 * one}
    if form == "linear":
        width = shape.head_dim if features is None else features
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"features must be a positive int or None, got {features!r}")
        one = sites * shape.length * 2 * width * shape.head_dim * (shape.q_heads + shape.kv_heads)
        return {"state": one * (TRAIN_FACTOR if mode == "train" else 1)}
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def llama_rest_flops(length: int, hidden: int, q_heads: int, kv_heads: int, head_dim: int, mlp: int, vocab: int,
                     layers: int, batch: int = 1, mode: str = "infer") -> int:
    """Matrix-product FLOPs of an HF Llama without its attention: q/k/v/o projections, the gated MLP, the head."""
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    projections = hidden * head_dim * (2 * q_heads + 2 * kv_heads)  # q and o: q_heads·D wide; k and v: kv_heads·D
    per_token = layers * 2 * (projections + 3 * hidden * mlp) + 2 * hidden * vocab
    return batch * length * per_token * (TRAIN_FACTOR if mode == "train" else 1)


def sgemm_rate(m: int, k: int, n: int, batch: int = 1, clock: Callable[[], float] = time.process_time,
               trials: int = 5, min_seconds: float = 0.05) -> float:
    """Best FLOP/s of ``[batch, m, k] @ [batch, k, n]`` in float32 on the current torch threads: ``trials``
    timings of as many calls as fill ``min_seconds``, into a preallocated output (no allocation timed)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(batch, m, k, generator=generator)
    b = torch.randn(batch, k, n, generator=generator)
    out = torch.empty(batch, m, n)
    product = (lambda: torch.mm(a[0], b[0], out=out[0])) if batch == 1 else (lambda: torch.bmm(a, b, out=out))
    product()
    start, calls = clock(), 0
    while calls < 3 or clock() - start < min_seconds:
        product()
        calls += 1
    per_trial = max(1, int(calls * min_seconds / max(clock() - start, 1e-9)))
    best = float("inf")
    for _ in range(trials):
        start = clock()
        for _ in range(per_trial):
            product()
        best = min(best, (clock() - start) / per_trial)
    return 2 * batch * m * k * n / max(best, 1e-12)


def attention_products(length: int, head_dim: int) -> dict:
    """The products to time per shape class: the whole head (T×D by D×T, T×T by T×D) and tiles like the CPU
    flash kernel's (q blocks of 64–256 rows against key blocks of 512), batched so that no Python call
    overhead is timed per tile.  Each entry: (label, m, k, n, batch)."""
    tiles = sorted({min(rows, length) for rows in (64, 256)})
    keys = min(512, length)
    batch = max(1, min(64, length // max(tiles)))
    qk = [(f"q·kᵀ {length}×{head_dim}·{head_dim}×{length}", length, head_dim, length, 1)]
    pv = [(f"p·v {length}×{length}·{length}×{head_dim}", length, length, head_dim, 1)]
    for rows in tiles:
        qk.append((f"q·kᵀ tiles {batch}×[{rows}×{head_dim}·{head_dim}×{keys}]", rows, head_dim, keys, batch))
        pv.append((f"p·v tiles {batch}×[{rows}×{keys}·{keys}×{head_dim}]", rows, keys, head_dim, batch))
    return {"qk": qk, "pv": pv}


def measure_rates(length: int, head_dim: int, rest_shapes: list[tuple[str, int, int, int]] = (),
                  clock: Callable[[], float] = time.process_time, trials: int = 5) -> dict:
    """``{"qk": [(label, FLOP/s)], "pv": [...], "rest": [...]}`` at this length's shapes; see sgemm_rate."""
    rates = {cls: [(label, sgemm_rate(m, k, n, batch, clock, trials)) for label, m, k, n, batch in products]
             for cls, products in attention_products(length, head_dim).items()}
    rates["rest"] = [(label, sgemm_rate(m, k, n, 1, clock, trials)) for label, m, k, n in rest_shapes]
    return rates


def llama_rest_shapes(length: int, hidden: int, q_heads: int, kv_heads: int, head_dim: int, mlp: int,
                      vocab: int) -> list[tuple[str, int, int, int]]:
    """The Llama's projection products at T tokens: (label, m, k, n)."""
    shapes = {("q, o", hidden, q_heads * head_dim), ("k, v", hidden, kv_heads * head_dim),
              ("gate, up", hidden, mlp), ("down", mlp, hidden), ("head", hidden, vocab)}
    return [(f"{name} {length}×{k}·{k}×{n}", length, k, n) for name, k, n in sorted(shapes)]


def attention_seconds(flops: dict, rates: dict) -> float:
    """The least time the counted products take at the best rate measured for each shape class (linear's
    ``state`` products at the best attention rate of any class)."""
    best = {cls: max(rate for _, rate in rates[cls]) for cls in ("qk", "pv") if rates.get(cls)}
    if not best:
        raise ValueError("no attention rates measured")
    total = 0.0
    for cls, count in flops.items():
        rate = best[cls] if cls in best else max(best.values())
        total += count / rate
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    llama = dict(hidden=256, q_heads=8, kv_heads=4, head_dim=32, mlp=688, vocab=1024)
    for length in (int(x) for x in args.lengths.split(",")):
        shape = AttentionShape(length, llama["q_heads"], llama["kv_heads"], llama["head_dim"], layers=4)
        rates = measure_rates(length, shape.head_dim, llama_rest_shapes(length, **llama), trials=args.trials)
        print(f"T = {length}, {args.threads} thread(s): sgemm GFLOP/s (best of {args.trials})")
        for cls in ("qk", "pv", "rest"):
            for label, rate in rates[cls]:
                print(f"  {label}: {rate / 1e9:.1f}")
        for mode in ("infer", "train"):
            rest = llama_rest_flops(length, layers=4, mode=mode, **llama)
            for form in FORMS:
                flops = attention_flops(shape, form, mode)
                print(f"  {mode} {form}: {sum(flops.values()) / 1e9:.3f} GFLOP, "
                      f"≥ {attention_seconds(flops, rates):.3f} s; the rest of the model {rest / 1e9:.2f} GFLOP")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
