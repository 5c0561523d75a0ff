"""GPU check of the hashed-attention kernels (part of bench/gpu_check.py).

correctness: the Triton path (``impl="triton"``) in bf16 and fp16 — causal GQA, key padding, an
additive bias, learned hashes (the projections' straight-through gradients too), a decode step over a
HashedCache's stores — against float64: the torch path run on the
inputs rounded to the dtype and then widened (so both see the same codes), which is the reference's
semantics at these sizes (reference.py itself is too slow beyond toy shapes).  The selected sets must
equal the torch path's exactly (row "selection"); outputs and gradients are bounded by
2 × plain torch's error at the same dtype + a rounding band (:mod:`attnrewrite.testing.numerics`).

timings (bf16, B = 1, 32 query / 8 key-value heads, D = 128, bits 64, top_k 256, window 64,
sinks 4): a decode step at 32k / 64k / 128k context — our kernels (codes, split selection,
gathered attention) against SDPA over the whole cache, eager and in a CUDA graph — and, unless
--quick, causal prefill forward and forward+backward at T = 8k, 16k, 32k and 64k against SDPA (flash),
the range issue 16 asks the summary and hashed families to cover.
The issue's target (decode at 64k ≥ 4 × SDPA decode) is read off the rows.  The kernels run with
their search-space defaults: no tuning table has been measured.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnrewrite.kernels import tuning
from attnrewrite.testing.numerics import error_budget, max_error, rounding_band

NAME = "hashed"
OPTIONS = dict(bits=64, top_k=64, window=32, sinks=4)
CORRECT_SIZE = dict(batch=2, heads_q=8, heads_kv=2, length=1024, dim=128)
DECODE_CONTEXT = 4096
TIMING = dict(batch=1, heads_q=32, heads_kv=8, dim=128, bits=64, top_k=256, window=64, sinks=4)
DECODE_LENGTHS = (32768, 65536, 131072)
PREFILL_LENGTHS = (8192, 16384, 32768, 65536)
DTYPES = (torch.bfloat16, torch.float16)


def _bench(fn, graph: bool = False) -> float:
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


# --------------------------------------------------------------------------- correctness


def _masks(name, batch, length, device):
    g = torch.Generator().manual_seed(11)
    if name == "padding":
        keep = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        keep[-1, ..., : length // 5] = False
        return keep.to(device)
    if name == "bias":
        keep = torch.rand(batch, 1, length, length, generator=g) > 0.1
        return (0.5 * torch.randn(batch, 1, length, length, generator=g)).masked_fill(~keep, float("-inf")).to(device)
    return None


def _prefill_rows(device, dtype, mask_name) -> list[dict]:
    from attnrewrite import ops
    from attnrewrite.kernels.hashed import sparse
    from attnrewrite.kernels.hashed.codes import random_hyperplanes, signs
    from attnrewrite.kernels.hashed.triton_codes import pack_codes
    from attnrewrite.kernels.hashed.triton_ops import mask_views
    from attnrewrite.kernels.hashed.triton_select import select_keys

    s = CORRECT_SIZE
    g = torch.Generator().manual_seed(3)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    q, k, v = (make(s["batch"], s["heads_q"], s["length"], s["dim"]), make(s["batch"], s["heads_kv"], s["length"], s["dim"]),
               make(s["batch"], s["heads_kv"], s["length"], s["dim"]))
    mask = _masks(mask_name, s["batch"], s["length"], device)
    case = f"causal GQA {s['heads_q']}/{s['heads_kv']} T={s['length']} D={s['dim']} mask={mask_name}"
    kw = dict(is_causal=True, enable_gqa=True, **OPTIONS)
    rows = []

    # the selection: kernel against the torch path, as sets
    plane = random_hyperplanes(s["dim"], OPTIONS["bits"], 0, device)
    keep, _ = mask_views(mask)
    got = select_keys(pack_codes(q, plane), pack_codes(k, plane), keep, True, OPTIONS["top_k"], OPTIONS["window"],
                      OPTIONS["sinks"]).long()
    keep_rows, _ = sparse.mask_parts(mask, slice(0, s["length"]), s["length"], s["length"])
    visible = sparse.visible_keys(keep_rows, slice(0, s["length"]), s["length"], 0, device)
    want = sparse.select(signs(q, plane), signs(k, plane), visible, OPTIONS["bits"], OPTIONS["top_k"],
                         OPTIONS["window"], OPTIONS["sinks"])
    same = torch.equal(got.sort(-1).values, want.sort(-1).values)
    rows.append({"case": case + " selection", "dtype": str(dtype).removeprefix("torch."), "worst": "sets",
                 "max_err": 0.0 if same else float("inf"), "bound": 0.0, "ok": same})

    # outputs and gradients by name
    upstream = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g).to(device, torch.float64)

    def run(impl, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(cast)
        out = ops.hashed_attention(*leaves, m, impl=impl, **kw)
        grads = torch.autograd.grad((out.double() * upstream).sum(), leaves)
        return dict(zip(("out", "dq", "dk", "dv"), (out.detach(),) + grads))

    name, err, bound = _worst(run, dtype, s["length"])
    rows.append({"case": case, "dtype": str(dtype).removeprefix("torch."), "worst": name, "max_err": err,
                 "bound": bound, "ok": err <= bound})
    return rows


def _worst(run, dtype, length: int) -> tuple[str, float, float]:
    """(name, error, bound) of the worst output or gradient, relative to its bound, of the kernels
    (``run("triton", dtype)``) against the float64 torch path, by the numerics rule (the bound from the torch
    path in ``dtype``)."""
    exact, plain, ours = run("torch", torch.float64), run("torch", dtype), run("triton", dtype)
    scored = []
    for name, expected in exact.items():
        bound = error_budget(plain[name], expected, dtype, band=rounding_band(dtype, expected, length=length))
        err = max_error(ours[name], expected)
        scored.append((err / bound if bound > 0 and math.isfinite(err) else float("inf"), name, err, bound))
    _, name, err, bound = max(scored)
    return name, err, bound


def _learned_row(device, dtype) -> dict:
    """hash="learned" (per-head projections, float32 parameters): output, dq, dk, dv and the two projections'
    straight-through gradients of the kernels against the torch path in float64, by the same rule."""
    from attnrewrite import ops
    from attnrewrite.kernels.hashed.codes import random_hyperplanes

    s = CORRECT_SIZE
    g = torch.Generator().manual_seed(13)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    q, k, v = (make(s["batch"], s["heads_q"], s["length"], s["dim"]), make(s["batch"], s["heads_kv"], s["length"], s["dim"]),
               make(s["batch"], s["heads_kv"], s["length"], s["dim"]))
    plane = random_hyperplanes(s["dim"], OPTIONS["bits"], 0).float()
    projections = [(plane + 0.3 * torch.randn(heads, s["dim"], OPTIONS["bits"], generator=g)).to(device)
                   for heads in (s["heads_q"], s["heads_kv"])]
    upstream = torch.randn(q.shape, generator=g).to(device, torch.float64)

    def run(impl, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        planes = [p.detach().clone().requires_grad_() for p in projections]
        out = ops.hashed_attention(*leaves, is_causal=True, enable_gqa=True, hash="learned", projections=tuple(planes),
                                   impl=impl, **OPTIONS)
        grads = torch.autograd.grad((out.double() * upstream).sum(), leaves + planes)
        return dict(zip(("out", "dq", "dk", "dv", "d_q_projection", "d_k_projection"), (out.detach(),) + grads))

    name, err, bound = _worst(run, dtype, s["length"])
    return {"case": f"causal GQA T={s['length']} hash=learned", "dtype": str(dtype).removeprefix("torch."),
            "worst": name, "max_err": err, "bound": bound, "ok": err <= bound}


def _decode_row(device, dtype) -> dict:
    from attnrewrite import ops
    from attnrewrite.decode.hashed import HashedLayer
    from attnrewrite.kernels.hashed.triton_decode import hashed_decode

    s = CORRECT_SIZE
    g = torch.Generator().manual_seed(5)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    q = make(s["batch"], s["heads_q"], 1, s["dim"])
    k, v = make(s["batch"], s["heads_kv"], DECODE_CONTEXT, s["dim"]), make(s["batch"], s["heads_kv"], DECODE_CONTEXT, s["dim"])
    valid = torch.ones(s["batch"], DECODE_CONTEXT, dtype=torch.bool, device=device)
    valid[-1, :100] = False
    layer = HashedLayer(**OPTIONS)
    layer.append(k, v, valid)
    n = layer.length
    with torch.no_grad():
        got = hashed_decode(q, layer.key_store[:, :, :n], layer.value_store[:, :, :n], layer.code_store[:, :, :n],
                            layer.proj_q, s["dim"] ** -0.5, OPTIONS["top_k"], OPTIONS["window"], OPTIONS["sinks"], valid)
        kw = dict(is_causal=False, enable_gqa=True, impl="torch", **OPTIONS)
        mask = valid[:, None, None, :]
        exact = ops.hashed_attention(q.double(), k.double(), v.double(), mask, **kw)
        plain = ops.hashed_attention(q, k, v, mask, **kw)
    bound = error_budget(plain, exact, dtype)
    err = max_error(got, exact)
    return {"case": f"decode over HashedCache T={DECODE_CONTEXT}, padding", "dtype": str(dtype).removeprefix("torch."),
            "worst": "out", "max_err": err, "bound": bound, "ok": err <= bound}


def correctness(device) -> list[dict]:
    rows = []
    with tuning.autotune_disabled():
        for dtype in DTYPES:
            for mask_name in ("none", "padding", "bias"):
                rows += _prefill_rows(device, dtype, mask_name)
                print(rows[-1], flush=True)
            rows.append(_learned_row(device, dtype))
            print(rows[-1], flush=True)
            rows.append(_decode_row(device, dtype))
            print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- timings


def _decode_timing(device, context: int) -> list[dict]:
    from attnrewrite.kernels.hashed.codes import random_hyperplanes
    from attnrewrite.kernels.hashed.triton_codes import pack_codes
    from attnrewrite.kernels.hashed.triton_decode import hashed_decode

    t = TIMING
    dtype = torch.bfloat16
    q = torch.randn(t["batch"], t["heads_q"], 1, t["dim"], device=device, dtype=dtype)
    keys, values = (torch.randn(t["batch"], t["heads_kv"], context, t["dim"], device=device, dtype=dtype)
                    for _ in range(2))
    plane = random_hyperplanes(t["dim"], t["bits"], 0, device)
    codes = pack_codes(keys, plane)
    scale = t["dim"] ** -0.5
    ours = lambda: hashed_decode(q, keys, values, codes, plane, scale, t["top_k"], t["window"], t["sinks"])  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)  # noqa: E731
    rows = []
    with torch.no_grad():
        for graph in (False, True):
            row = {"case": "decode step" + (" (CUDA graph)" if graph else " (eager)"), "T": context}
            try:
                row["ours_ms"], row["sdpa_ms"] = _bench(ours, graph), _bench(sdpa, graph)
                row["x_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
            except Exception as exc:  # noqa: BLE001 — record and go on
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            rows.append(row)
            print(row, flush=True)
    return rows


def _prefill_timing(device, length: int) -> list[dict]:
    from attnrewrite import ops

    t = TIMING
    q = torch.randn(t["batch"], t["heads_q"], length, t["dim"], device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(t["batch"], t["heads_kv"], length, t["dim"], device=device, dtype=torch.bfloat16)
            for _ in range(2))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    opts = {n: t[n] for n in ("bits", "top_k", "window", "sinks")}
    impls = {"ours": lambda: ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, impl="triton", **opts),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    rows = []
    for pass_name in ("fwd", "fwd+bwd"):
        row = {"case": f"causal prefill {pass_name}", "T": length}
        for name, fn in impls.items():
            try:
                if pass_name == "fwd":
                    with torch.no_grad():
                        row[f"{name}_ms"] = _bench(fn)
                else:
                    grad = torch.randn_like(q)
                    row[f"{name}_ms"] = _bench(lambda fn=fn, grad=grad: fn().backward(grad))
            except Exception as exc:  # noqa: BLE001
                row.setdefault("error", f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            for x in leaves:
                x.grad = None
        if row.get("ours_ms") and row.get("sdpa_ms"):
            row["x_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def timings(device, quick: bool) -> list[dict]:
    rows = []
    with tuning.autotune_disabled():
        for context in ((65536,) if quick else DECODE_LENGTHS):
            rows += _decode_timing(device, context)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not quick:
            for length in PREFILL_LENGTHS:
                rows += _prefill_timing(device, length)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    got = next((r.get("x_vs_sdpa") for r in rows if r["case"] == "decode step (eager)" and r["T"] == 65536), None)
    rows.append({"case": "target: decode step T=65536 vs SDPA decode (eager)", "T": 65536,
                 "speedup": float("nan") if got is None else got, "target": 4.0,
                 "met": None if got is None else got >= 4.0})
    return rows
