"""GPU check of the sliding-window kernels: correctness in bf16/fp16, then speed against SDPA.

Correctness: the kernels (``ops.sliding_window_attention(impl="triton")``) on causal and symmetric
bands, with sinks, GQA, a bool key-padding mask, a float bias, decode-shaped Tq < Tk, D = 64/128/256 and
a padded D = 80, the torch path, and the triton_op under torch.compile (inductor) against eager; every
output and gradient (q, k, v) is a row against the float64 reference
(``reference.naive_sliding_window_attention``) with bound = 2 × plain torch's error at the same precision
+ two ulps (the rule of ``attnrewrite.testing.numerics``).

Timings (bf16, causal, D = 128): forward and forward+backward medians for T = 8k, 16k, 32k, 64k
(--quick: 8k, 32k) at windows 256, 1024 and 4096, against SDPA's flash backend on the full causal
sequence (what a model without the window would run) and, where it fits in memory (T ≤ 16k), SDPA's
efficient backend with the band as a bool mask (what the dense torch path runs).  Batch × T = 64k
tokens, 16 heads.  Rows that would start after the time budget are skipped.

Device command (timeout 420 s):  PYTHONUNBUFFERED=1 python bench/gpu_check.py --only sliding_window
"""

from __future__ import annotations

import math
import time
import traceback

import torch

from attnrewrite.kernels import tuning
from attnrewrite.testing.numerics import error_budget, max_error

NAME = "sliding_window"
CORRECTNESS_BUDGET_S = 90.0
FAMILY_BUDGET_S = 200.0
_T0: list[float] = []


def _elapsed() -> float:
    if not _T0:
        _T0.append(time.perf_counter())
    return time.perf_counter() - _T0[0]


def _reference(q, k, v, attn_mask=None, is_causal=True, window=256, sinks=0, **_):
    from attnrewrite.kernels.sliding_window.reference import naive_sliding_window_attention

    return naive_sliding_window_attention(q, k, v, attn_mask, is_causal, None, window, sinks)


def _run(fn, tensors: dict, kwargs: dict, dtype: torch.dtype) -> dict:
    """out and the gradients of q, k, v of fn(q, k, v, **kwargs), inputs cast to dtype."""
    leaves = {n: tensors[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v")}
    kwargs = dict(kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        kwargs["attn_mask"] = mask.to(dtype)
    out = fn(leaves["q"], leaves["k"], leaves["v"], **kwargs)
    out.backward(tensors["grad"].to(dtype))
    return {"out": out.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}


def _case_inputs(device, gen, batch, heads_q, heads_kv, len_q, len_k, dim, mask=None, **options):
    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    tensors = {"q": rnd(batch, heads_q, len_q, dim), "k": rnd(batch, heads_kv, len_k, dim),
               "v": rnd(batch, heads_kv, len_k, dim), "grad": rnd(batch, heads_q, len_q, dim)}
    kwargs = {"enable_gqa": heads_q != heads_kv, **options}
    if mask == "keypad":
        lens = torch.tensor([len_k - (len_k // 8) * (b + 1) for b in range(batch)], device=device)
        kwargs["attn_mask"] = (torch.arange(len_k, device=device) < lens.view(-1, 1)).view(batch, 1, 1, len_k)
    elif mask == "bias":
        kwargs["attn_mask"] = 0.5 * rnd(1, heads_q, len_q, len_k)
    return tensors, kwargs


CASES = [  # (name, dtype, sizes batch/heads_q/heads_kv/len_q/len_k/dim, options)
    ("causal w=128 d64", torch.bfloat16, (2, 4, 4, 700, 700, 64), {"window": 128}),
    ("causal w=256 sinks=4 d128", torch.bfloat16, (2, 4, 4, 1000, 1000, 128), {"window": 256, "sinks": 4}),
    ("causal w=100 sinks=1 gqa 8/2 d128, fp16", torch.float16, (2, 8, 2, 600, 600, 128),
     {"window": 100, "sinks": 1}),
    ("symmetric w=64 sinks=2 d64", torch.bfloat16, (2, 4, 4, 500, 500, 64), {"window": 64, "sinks": 2,
                                                                             "is_causal": False}),
    ("bool key padding w=200 d128", torch.bfloat16, (3, 4, 4, 640, 640, 128), {"window": 200, "mask": "keypad"}),
    ("float bias w=96 d64", torch.bfloat16, (1, 4, 4, 400, 400, 64), {"window": 96, "mask": "bias"}),
    ("decode-shaped Tq=64 vs 2048 w=512 sinks=4 d128", torch.bfloat16, (2, 8, 8, 64, 2048, 128),
     {"window": 512, "sinks": 4}),
    ("causal w=300 d256", torch.bfloat16, (1, 4, 4, 600, 600, 256), {"window": 300}),
    ("causal w=150 D=80 (padded head dim)", torch.bfloat16, (2, 4, 4, 500, 500, 80), {"window": 150}),
]


def _check_rows(name, dtype, fn, tensors, kwargs, label) -> list[dict]:
    exact = _run(_reference, {n: t.double() for n, t in tensors.items()}, kwargs, torch.float64)
    plain = _run(_reference, tensors, kwargs, dtype)
    got = _run(fn, tensors, kwargs, dtype)
    rows = []
    for out_name, ref in exact.items():
        err, plain_err = max_error(got[out_name], ref), max_error(plain[out_name], ref)
        bound = error_budget(plain[out_name], ref, dtype)
        rows.append({"case": f"{name} [{label}]", "dtype": str(dtype).replace("torch.", ""), "output": out_name,
                     "max_err": err, "plain_torch_err": plain_err, "bound": bound,
                     "ok": bool(math.isfinite(err) and err <= bound)})
    return rows


def correctness(device) -> list[dict]:
    from attnrewrite import ops

    _elapsed()
    rows: list[dict] = []
    gen = torch.Generator(device=device).manual_seed(0)
    triton_impl = lambda q, k, v, **kw: ops.sliding_window_attention(q, k, v, impl="triton", **kw)  # noqa: E731
    torch_impl = lambda q, k, v, **kw: ops.sliding_window_attention(q, k, v, impl="torch", **kw)  # noqa: E731
    plan = [(n, dt, s, o, triton_impl, "triton") for n, dt, s, o in CASES]
    plan.append(("causal w=256 sinks=4 d128", torch.bfloat16, (2, 4, 4, 1000, 1000, 128), {"window": 256, "sinks": 4},
                 torch_impl, "torch path"))
    with tuning.autotune_disabled():
        for name, dtype, sizes, options, fn, label in plan:
            if _elapsed() > CORRECTNESS_BUDGET_S:
                rows.append({"case": f"{name} [{label}]", "note": "skipped: time budget"})
                continue
            try:
                tensors, kwargs = _case_inputs(device, gen, *sizes, **dict(options))
                rows += _check_rows(name, dtype, fn, tensors, kwargs, label)
            except Exception as exc:  # noqa: BLE001 — one failing case is a row, not an abort
                traceback.print_exc()
                rows.append({"case": f"{name} [{label}]", "ok": False, "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
        rows += _compiled_rows(device, gen)
    return rows


def _compiled_rows(device, gen) -> list[dict]:
    """torch.compile (inductor, fullgraph) over the triton_op: the same results as eager, no graph break."""
    from attnrewrite import ops

    name = "torch.compile(inductor, fullgraph) fwd+bwd, causal w=64 sinks=2 d64"
    if _elapsed() > CORRECTNESS_BUDGET_S:
        return [{"case": name, "note": "skipped: time budget"}]
    try:
        tensors, kwargs = _case_inputs(device, gen, 2, 4, 2, 256, 256, 64, window=64, sinks=2)
        eager_fn = lambda q, k, v, **kw: ops.sliding_window_attention(q, k, v, impl="triton", **kw)  # noqa: E731
        compiled_fn = torch.compile(eager_fn, fullgraph=True, backend="inductor")
        eager = _run(eager_fn, tensors, kwargs, torch.bfloat16)
        compiled = _run(compiled_fn, tensors, kwargs, torch.bfloat16)
        rows = []
        for out_name in eager:
            err = (compiled[out_name].float() - eager[out_name].float()).abs().max().item()
            bound = 2 * torch.finfo(torch.bfloat16).eps * eager[out_name].abs().max().item()
            rows.append({"case": name, "dtype": "bfloat16", "output": out_name, "max_err": err, "bound": bound,
                         "ok": err <= bound, "note": "vs eager"})
        return rows
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return [{"case": name, "ok": False, "note": f"{type(exc).__name__}: {str(exc)[:200]}"}]


# --------------------------------------------------------------------------- timings

LENGTHS = {"quick": (8192, 32768), "full": (8192, 16384, 32768, 65536)}
WINDOWS = (256, 1024, 4096)
DIM, HEADS, TOKENS = 128, 16, 65536
DENSE_MASK_MAX_T = 16384  # SDPA with a [T, T] bool band mask: 256 MiB per (T = 16k), no further


def _bench(fn, grad_to_none=None) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median"))


def _band_flops(batch, heads, length, window, backward) -> float:
    """Useful flops: 4·D per visible (query, key) pair; backward = 2.5 × forward."""
    window = min(window, length)
    pairs = length * window - window * (window - 1) / 2      # rows i < window see i + 1 keys
    fwd = 4.0 * batch * heads * pairs * DIM
    return fwd * (3.5 if backward else 1.0)


def timings(device, quick: bool) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnrewrite import ops
    from attnrewrite.kernels.sliding_window.reference import window_visible

    _elapsed()
    rows: list[dict] = []
    with tuning.autotune_disabled():
        for length in LENGTHS["quick" if quick else "full"]:
            batch = max(1, TOKENS // length)
            try:
                gen = torch.Generator(device=device).manual_seed(1)
                q, k, v, do = (torch.randn(batch, HEADS, length, DIM, device=device, generator=gen)
                               .to(torch.bfloat16) for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_()
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    full = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                    t_full = (_bench(full), _bench(lambda: full().backward(do), [q, k, v]))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"case": f"T={length}", "ok": False, "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            for window in WINDOWS:
                label = f"d{DIM} T={length} window={window} causal"
                if _elapsed() > FAMILY_BUDGET_S:
                    rows.append({"case": label, "note": "skipped: time budget"})
                    continue
                try:
                    ours = lambda: ops.sliding_window_attention(q, k, v, window=window, impl="triton")  # noqa: E731
                    t_ours = (_bench(ours), _bench(lambda: ours().backward(do), [q, k, v]))
                    row = {"case": label, "B,H": f"{batch},{HEADS}", "fwd_ms": t_ours[0], "fwdbwd_ms": t_ours[1],
                           "fwd_TFLOPS": _band_flops(batch, HEADS, length, window, False) / t_ours[0] * 1e-9,
                           "fwdbwd_TFLOPS": _band_flops(batch, HEADS, length, window, True) / t_ours[1] * 1e-9,
                           "sdpa_full_causal_fwd_ms": t_full[0], "sdpa_full_causal_fwdbwd_ms": t_full[1],
                           "fwd_x_full": t_full[0] / t_ours[0], "fwdbwd_x_full": t_full[1] / t_ours[1]}
                    if length <= DENSE_MASK_MAX_T:
                        band = window_visible(length, length, window, 0, True).to(device)
                        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                            masked = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                                q, k, v, attn_mask=band)
                            t_masked = (_bench(masked), _bench(lambda: masked().backward(do), [q, k, v]))
                        row.update({"sdpa_band_mask_fwd_ms": t_masked[0], "sdpa_band_mask_fwdbwd_ms": t_masked[1],
                                    "fwd_x_band_mask": t_masked[0] / t_ours[0],
                                    "fwdbwd_x_band_mask": t_masked[1] / t_ours[1]})
                    rows.append(row)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append({"case": label, "ok": False, "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows
