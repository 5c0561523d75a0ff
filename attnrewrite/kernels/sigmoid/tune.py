"""The workloads ``python -m attnrewrite tune --kind sigmoid`` times the sigmoid kernels on
(the search spaces are in :mod:`attnrewrite.kernels.sigmoid.spaces`)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from attnrewrite.kernels import tuning
from attnrewrite.kernels.sigmoid.spaces import HEAD_CLASSES, KERNELS, SPACES, space_name


def workloads(quick: bool = False) -> Iterable[tuning.Workload]:
    """Shapes worth a table entry on a GPU: D 64/128/256, T 1k/4k/16k, causal and not, bf16,
    batch x heads sized to fill the chip; plus decode (Tq = 1) against a 4k cache."""
    heads = (128,) if quick else HEAD_CLASSES
    lengths = (4096,) if quick else (1024, 4096, 16384)
    for head in heads:
        for length in lengths:
            for causal in (0, 1):
                for kernel in KERNELS:
                    yield _workload(kernel, head, length, length, causal)
    if not quick:
        for head in (64, 128):
            yield _workload("fwd", head, 1, 4096, 0)


def _workload(kernel: str, head: int, len_q: int, len_k: int, causal: int, device="cuda",
              batch: int | None = None, heads: int = 16) -> tuning.Workload:
    """One kernel at one shape in bf16; by default batch x heads x T holds 128k rows (fills a GPU)."""
    space = SPACES[space_name(kernel, head, head)]
    shape = {"D": head, "DV": head, "Tq": len_q, "Tk": len_k, "causal": causal, "mask": 0, "dtype": "16bit"}
    batch = batch or max(1, (1 << 17) // max(len_q, len_k, 1) // heads)
    inputs = {}

    def make_bench(config):
        from .triton_bwd import sigmoid_bwd
        from .triton_fwd import sigmoid_fwd

        if not inputs:  # allocated on first use, once per workload
            gen = torch.Generator(device=device).manual_seed(0)

            def rnd(*s):
                return torch.randn(*s, device=device, generator=gen).to(torch.bfloat16)
            inputs.update(q=rnd(batch, heads, len_q, head), k=rnd(batch, heads, len_k, head),
                          v=rnd(batch, heads, len_k, head), do=rnd(batch, heads, len_q, head),
                          bias=torch.full((batch, heads), -math.log(len_k), device=device))
        x = inputs
        scale = head ** -0.5
        if kernel == "fwd":
            return lambda: sigmoid_fwd(x["q"], x["k"], x["v"], None, x["bias"], None, None, None, scale, causal,
                                       config)
        which = ("dq",) if kernel == "bwd_dq" else ("dkdv",)
        return lambda: sigmoid_bwd(x["q"], x["k"], x["v"], x["do"], None, x["bias"], None, None, None, scale,
                                   causal, False, config, config, kernels=which)

    return tuning.Workload(space=space, shape=shape, make_bench=make_bench)
