"""The workloads ``python -m attnrewrite tune --kind hashed`` times the hashed kernels on (the search spaces
are in :mod:`attnrewrite.kernels.hashed.spaces`)."""

from __future__ import annotations

from typing import Iterable


from attnrewrite.kernels import tuning
from attnrewrite.kernels.triton_scaffold import seeded_bf16
from attnrewrite.kernels.hashed.spaces import KERNELS, SPACES

__all__ = ["KERNELS", "SPACES", "workloads"]

BITS, TOP_K, WINDOW, SINKS = 64, 256, 64, 4


def workloads(quick: bool = False) -> Iterable[tuning.Workload]:
    """Shapes worth a table entry on a GPU: bf16, 8 key-value heads with groups of 4 query heads (also 8
    and 1 unless quick), D = 128 (and 64), bits 64; prefill at T = 4k and 16k for the codes, the selection and
    the attention forward and backward; decode at 32k, 64k and 128k for the decode selection."""
    heads = (128,) if quick else (128, 64)
    groups = (4,) if quick else (4, 8, 1)
    prefill = (4096,) if quick else (4096, 16384)
    decode = (65536,) if quick else (32768, 65536, 131072)
    for head in heads:
        for group in groups:
            for length in prefill:
                for kernel in ("codes", "select", "fwd", "bwd"):
                    yield _workload(kernel, head, group, length, length)
            for length in decode:
                yield _workload("decode", head, group, 1, length)


def _workload(kernel: str, head: int, group: int, len_q: int, len_k: int, device="cuda") -> tuning.Workload:
    heads_kv = 8
    heads_q = heads_kv * group
    space = SPACES[kernel]
    shape = {"D": head, "DV": head, "G": group, "bits": BITS, "Tq": len_q, "Tk": len_k, "dtype": "bfloat16"}
    inputs = {}

    def make_bench(config):
        from .codes import random_hyperplanes
        from .triton_attn import attend_backward, attend_forward
        from .triton_codes import pack_codes
        from .triton_decode import decode_select
        from .triton_select import select_keys

        if not inputs:  # allocated on first use, once per workload
            rnd = seeded_bf16(device)
            plane = random_hyperplanes(head, BITS, 0, device)
            inputs.update(q=rnd(1, heads_q, len_q, head), k=rnd(1, heads_kv, len_k, head),
                          v=rnd(1, heads_kv, len_k, head), plane=plane)
            inputs["q_codes"], inputs["k_codes"] = pack_codes(inputs["q"], plane), pack_codes(inputs["k"], plane)
            if kernel in ("fwd", "bwd"):
                inputs["index"] = select_keys(inputs["q_codes"], inputs["k_codes"], None, True, TOP_K, WINDOW, SINKS)
                inputs["out"], inputs["lse"] = attend_forward(inputs["q"], inputs["k"], inputs["v"], inputs["index"],
                                                              None, head ** -0.5)
        x = inputs
        scale = head ** -0.5
        if kernel == "codes":
            return lambda: pack_codes(x["k"], x["plane"], config)
        if kernel == "select":
            return lambda: select_keys(x["q_codes"], x["k_codes"], None, True, TOP_K, WINDOW, SINKS, config)
        if kernel == "fwd":
            return lambda: attend_forward(x["q"], x["k"], x["v"], x["index"], None, scale, config)
        if kernel == "bwd":
            return lambda: attend_backward(x["q"], x["k"], x["v"], x["out"], x["out"], x["lse"], x["index"], None,
                                           scale, config)
        return lambda: decode_select(x["q_codes"], x["k_codes"], None, TOP_K, WINDOW, SINKS, config)

    return tuning.Workload(space=space, shape=shape, make_bench=make_bench)
