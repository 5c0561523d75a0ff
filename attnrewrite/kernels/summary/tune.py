"""The workloads ``python -m attnrewrite tune --kind summary`` times the summary kernels on
(the search spaces are in :mod:`attnrewrite.kernels.summary.spaces`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from attnrewrite.kernels import tuning
from attnrewrite.kernels.triton_scaffold import seeded_bf16
from attnrewrite.kernels.summary.spaces import HEAD_CLASSES, KERNELS, SPACES, space_name

# The target setting: chunks of 8 tokens, a window of 128 chunks (1024 tokens).
CHUNK, WINDOW = 8, 128


def workloads(quick: bool = False) -> Iterable[tuning.Workload]:
    """Shapes worth a table entry on a GPU: D 64/128/256, T 4k/16k/32k, causal, bf16, chunk 8,
    window 128 chunks, batch x heads sized to fill the chip."""
    heads = (128,) if quick else HEAD_CLASSES
    lengths = (8192,) if quick else (4096, 16384, 32768)
    for head in heads:
        for length in lengths:
            for kernel in KERNELS:
                yield _workload(kernel, head, length, causal=True)


def _workload(kernel: str, head: int, length: int, causal: bool, device="cuda", batch: int | None = None,
              heads: int = 16, chunk_size: int = CHUNK, window_chunks: int = WINDOW) -> tuning.Workload:
    """One kernel at one shape in bf16; by default batch x heads x T holds 256k rows."""
    space = SPACES[space_name(kernel, head, head)]
    shape = {"D": head, "DV": head, "T": length, "window": min(length, (window_chunks + 1) * chunk_size),
             "chunk": chunk_size, "causal": int(causal), "dtype": "16bit"}
    batch = batch or max(1, (1 << 18) // length // heads)
    inputs = {}

    def make_bench(config):
        from .chunked import chunk_summaries
        from .triton_bwd import summary_bwd
        from .triton_fwd import summary_fwd

        if not inputs:  # allocated on first use, once per workload
            rnd = seeded_bf16(device)
            q, k, v = rnd(batch, heads, length, head), rnd(batch, heads, length, head), rnd(batch, heads, length, head)
            k_sum, v_sum, exists = chunk_summaries(k, v, None, chunk_size)
            inputs.update(q=q, k=k, v=v, k_sum=k_sum.contiguous(), v_sum=v_sum.contiguous(), exists=exists,
                          do=rnd(batch, heads, length, head),
                          lse=torch.zeros(batch, heads, length, device=device),
                          delta=torch.zeros(batch, heads, length, device=device))
        x = inputs
        common = (x["q"], x["k"], x["v"], x["k_sum"], x["v_sum"], x["exists"], None)
        scale = head ** -0.5
        if kernel == "fwd":
            return lambda: summary_fwd(*common, scale, causal, chunk_size, window_chunks, config)
        which = ("dq",) if kernel == "bwd_dq" else ("dkdv", "dkdv_summary")
        return lambda: summary_bwd(*common, x["do"], x["lse"], x["delta"], scale, causal, chunk_size, window_chunks,
                                   config, config, kernels=which)

    return tuning.Workload(space=space, shape=shape, make_bench=make_bench)
