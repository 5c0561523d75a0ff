"""The workloads ``python -m attnrewrite tune --kind sliding_window`` times the sliding-window kernels on
(the search spaces are in :mod:`attnrewrite.kernels.sliding_window.spaces`)."""

from __future__ import annotations

from typing import Iterable


from attnrewrite.kernels import tuning
from attnrewrite.kernels.triton_scaffold import seeded_bf16
from attnrewrite.kernels.sliding_window.spaces import HEAD_CLASSES, KERNELS, SPACES, space_name


def workloads(quick: bool = False) -> Iterable[tuning.Workload]:
    """Shapes worth a table entry on a GPU: D 64/128/256, T 4k/16k/64k, windows 256/1024/4096, causal,
    bf16, batch x heads sized to fill the chip."""
    heads = (128,) if quick else HEAD_CLASSES
    lengths = (16384,) if quick else (4096, 16384, 65536)
    windows = (1024,) if quick else (256, 1024, 4096)
    for head in heads:
        for length in lengths:
            for window in windows:
                for kernel in KERNELS:
                    yield _workload(kernel, head, length, window)


def _workload(kernel: str, head: int, length: int, window: int, causal: bool = True, device="cuda",
              heads: int = 16) -> tuning.Workload:
    """One kernel at one shape in bf16; batch x heads x T holds 128k rows (fills a GPU)."""
    space = SPACES[space_name(kernel, head, head)]
    shape = {"D": head, "DV": head, "Tq": length, "Tk": length, "window": window, "sinks": 0,
             "causal": int(causal), "mask": 0, "dtype": "16bit"}
    batch = max(1, (1 << 17) // length // heads)
    inputs = {}

    def make_bench(config):
        from .triton_bwd import sliding_window_bwd
        from .triton_fwd import sliding_window_fwd

        if not inputs:  # allocated on first use, once per workload
            rnd = seeded_bf16(device)
            inputs.update(q=rnd(batch, heads, length, head), k=rnd(batch, heads, length, head),
                          v=rnd(batch, heads, length, head), do=rnd(batch, heads, length, head))
        x = inputs
        scale = head ** -0.5
        if kernel == "fwd":
            return lambda: sliding_window_fwd(x["q"], x["k"], x["v"], None, None, scale, causal, window, 0, config)
        if "out" not in x:
            x["out"], x["lse"] = sliding_window_fwd(x["q"], x["k"], x["v"], None, None, scale, causal, window, 0,
                                                    SPACES[space_name("fwd", head, head)].default)
        which = ("dq",) if kernel == "bwd_dq" else ("dkdv",)
        return lambda: sliding_window_bwd(x["q"], x["k"], x["v"], x["out"], x["lse"], x["do"], None, None, scale,
                                          causal, window, 0, config, config, kernels=which)

    return tuning.Workload(space=space, shape=shape, make_bench=make_bench)
