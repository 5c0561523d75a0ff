"""GPU check of the summary kernels: correctness in bf16/fp16, then speed against SDPA flash.

Correctness: the Triton path (``impl="triton"``) on causal and bidirectional calls, GQA, key padding
(a hole, right padding covering whole chunks), mean and learned summaries, D = 64/128 and an odd head
dim, packed sequences (``cu_seqlens``), against the torch path in float64 (itself equal to ``reference.py`` to 1e-13 in float64, tested
on the CPU; ``reference.py`` loops over queries in Python, too slow at these lengths); every output
and gradient (q, k, v, the pooling queries) is a row with bound = 2 x the torch path's error at the
same precision + two ulps (the rule of ``attnrewrite.testing.numerics``).

Timings (bf16, causal, chunk 8, window 128 chunks = 1024 tokens, D = 128, 16 heads): forward and
forward+backward medians (triton.testing.do_bench) for T = 8k, 16k, 32k, 64k (--quick: 8k, 32k),
against SDPA's flash backend on the same q, k, v (full causal attention).  The issue's target:
forward+backward >= 4x SDPA at T = 32k.  Then the decode kernel: time per token at a context of
32k, 64k, 128k (--quick: 128k) over the summary cache's slice against SDPA decode over the full
cache (target: >= 5x at 128k); its correctness (bf16, fp16) against SDPA over the same slice.
Rows that would start after the time budget are skipped.
"""

from __future__ import annotations

import math
import time
import traceback

import torch

from attnrewrite.kernels import tuning
from attnrewrite.testing.numerics import error_budget, max_error

NAME = "summary"
CORRECTNESS_BUDGET_S = 60.0
FAMILY_BUDGET_S = 150.0
_T0: list[float] = []


def _elapsed() -> float:
    if not _T0:
        _T0.append(time.perf_counter())
    return time.perf_counter() - _T0[0]


CASES = [  # (name, dtype, (batch, heads_q, heads_kv, T, D, Dv), options)
    ("causal mean d64", torch.bfloat16, (2, 4, 4, 700, 64, 64), dict(chunk_size=8, window_chunks=16)),
    ("causal learned gqa 8/2 + padding d128", torch.bfloat16, (2, 8, 2, 900, 128, 128),
     dict(chunk_size=8, window_chunks=16, learned=True, padding=True)),
    ("bidirectional mean + padding d128", torch.float16, (2, 4, 2, 600, 128, 128),
     dict(chunk_size=4, window_chunks=8, is_causal=False, padding=True)),
    ("causal learned, odd dims D=80 Dv=96", torch.float16, (1, 4, 4, 500, 80, 96),
     dict(chunk_size=16, window_chunks=4, learned=True)),
    ("causal, window 0, chunk 32 d128", torch.bfloat16, (1, 4, 4, 1000, 128, 128), dict(chunk_size=32, window_chunks=0)),
    ("packed 300+517+183 (cu_seqlens), learned gqa 8/2 d128", torch.bfloat16, (1, 8, 2, 1000, 128, 128),
     dict(chunk_size=8, window_chunks=16, learned=True, packed=(300, 517, 183))),
]


def _case_inputs(device, gen, batch, heads_q, heads_kv, length, dim, dim_v, options):
    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    options = dict(options)
    tensors = dict(q=rnd(batch, heads_q, length, dim), k=rnd(batch, heads_kv, length, dim),
                   v=rnd(batch, heads_kv, length, dim_v), grad=rnd(batch, heads_q, length, dim_v))
    if options.pop("learned", False):
        tensors["summary_query"] = rnd(heads_kv, dim)
        options["summary"] = "learned"
    if options.pop("padding", False):
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        valid[-1, 5:9] = False
        valid[-1, -(length // 5):] = False
        options["attn_mask"] = valid[:, None, None]
    packed = options.pop("packed", None)
    if packed is not None:  # sequences back to back in the one batch row
        starts = [0]
        for n in packed:
            starts.append(starts[-1] + n)
        options["cu_seqlens"] = torch.tensor(starts, dtype=torch.int32, device=device)
    options["enable_gqa"] = heads_q != heads_kv
    return tensors, options


def _run(impl: str, tensors: dict, options: dict, dtype: torch.dtype) -> dict:
    from attnrewrite import ops

    names = [n for n in ("q", "k", "v", "summary_query") if n in tensors]
    leaves = {n: tensors[n].detach().to(dtype).requires_grad_() for n in names}
    extra = {"summary_query": leaves["summary_query"]} if "summary_query" in leaves else {}
    out = ops.summary_attention(leaves["q"], leaves["k"], leaves["v"], impl=impl, **extra, **options)
    out.backward(tensors["grad"].to(dtype))
    return {"out": out.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}


def correctness(device) -> list[dict]:
    _elapsed()
    rows: list[dict] = []
    gen = torch.Generator(device=device).manual_seed(0)
    with tuning.autotune_disabled():
        for name, dtype, sizes, options in CASES:
            if _elapsed() > CORRECTNESS_BUDGET_S:
                rows.append({"case": name, "dtype": str(dtype), "note": "skipped: time budget"})
                continue
            try:
                tensors, kwargs = _case_inputs(device, gen, *sizes, options)
                exact = _run("torch", tensors, kwargs, torch.float64)
                plain = _run("torch", tensors, kwargs, dtype)
                got = _run("triton", tensors, kwargs, dtype)
                for out_name, ref in exact.items():
                    err, plain_err = max_error(got[out_name], ref), max_error(plain[out_name], ref)
                    bound = error_budget(plain[out_name], ref, dtype)
                    rows.append({"case": name, "dtype": str(dtype).replace("torch.", ""), "output": out_name,
                                 "max_err": err, "torch_path_err": plain_err, "bound": bound,
                                 "ok": bool(math.isfinite(err) and err <= bound)})
            except Exception as exc:  # noqa: BLE001 — one failing case is a row, not an abort
                traceback.print_exc()
                rows.append({"case": name, "dtype": str(dtype), "ok": False,
                             "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
        rows += _decode_correctness(device, gen)
    return rows


def _store_slice(batch, heads, entries, dim, device, gen, dtype):
    """[B, H, entries, D] as SummaryCache.step returns it: a view of a larger store (capacity stride)."""
    store = torch.randn(batch, heads, entries + 64, dim, device=device, generator=gen)
    return store.to(dtype)[:, :, :entries]


def _decode_correctness(device, gen) -> list[dict]:
    """The decode kernel on a store slice with padding flags (GQA 8/2, D = 128) against SDPA over the
    same slice: float64 exact, plain = SDPA at the same dtype."""
    from attnrewrite.kernels.summary.triton_decode import summary_decode

    name = "decode over a store slice, gqa 8/2, padding flags d128"
    rows = []
    try:
        q = torch.randn(2, 8, 1, 128, device=device, generator=gen)
        keys = _store_slice(2, 2, DECODE_CORRECTNESS_ENTRIES, 128, device, gen, torch.float32)
        values = _store_slice(2, 2, DECODE_CORRECTNESS_ENTRIES, 128, device, gen, torch.float32)
        visible = torch.rand(2, DECODE_CORRECTNESS_ENTRIES, device=device, generator=gen) > 0.1
        mask = visible[:, None, None]

        def sdpa(dtype):
            return torch.nn.functional.scaled_dot_product_attention(
                q.to(dtype), keys.to(dtype), values.to(dtype), mask, enable_gqa=True)
        exact = sdpa(torch.float64)
        for dtype in DECODE_DTYPES:
            got = summary_decode(q.to(dtype), keys.to(dtype), values.to(dtype), visible)
            err, bound = max_error(got, exact), error_budget(sdpa(dtype), exact, dtype)
            rows.append({"case": name, "dtype": str(dtype).replace("torch.", ""), "output": "out", "max_err": err,
                         "torch_path_err": max_error(sdpa(dtype), exact), "bound": bound,
                         "ok": bool(math.isfinite(err) and err <= bound)})
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        rows.append({"case": name, "ok": False, "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows


LENGTHS = {"quick": (8192, 32768), "full": (8192, 16384, 32768, 65536)}
DECODE_CONTEXTS = {"quick": (131072,), "full": (32768, 65536, 131072)}
DECODE_CORRECTNESS_ENTRIES = 3000
DECODE_DTYPES = (torch.bfloat16, torch.float16)
DIM, HEADS, CHUNK, WINDOW = 128, 16, 8, 128
DECODE_BATCH = 4
TIMING_DTYPE = torch.bfloat16


def _bench(fn, grad_to_none=None) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none, return_mode="median"))


def timings(device, quick: bool) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnrewrite import ops

    _elapsed()
    rows: list[dict] = []
    with tuning.autotune_disabled():
        for length in LENGTHS["quick" if quick else "full"]:
            label = f"d{DIM} T={length} causal C={CHUNK} W={WINDOW}"
            if _elapsed() > FAMILY_BUDGET_S:
                rows.append({"case": label, "note": "skipped: time budget"})
                continue
            try:
                gen = torch.Generator(device=device).manual_seed(1)
                q, k, v, do = (torch.randn(1, HEADS, length, DIM, device=device, generator=gen).to(TIMING_DTYPE)
                               for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_()
                ours = lambda: ops.summary_attention(q, k, v, chunk_size=CHUNK, window_chunks=WINDOW,  # noqa: E731
                                                     impl="triton")
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                    t_sdpa = (_bench(sdpa), _bench(lambda: sdpa().backward(do), [q, k, v]))
                t_ours = (_bench(ours), _bench(lambda: ours().backward(do), [q, k, v]))
                rows.append({"case": label, "B,H": f"1,{HEADS}", "fwd_ms": t_ours[0], "fwdbwd_ms": t_ours[1],
                             "sdpa_fwd_ms": t_sdpa[0], "sdpa_fwdbwd_ms": t_sdpa[1],
                             "fwd_x_sdpa": t_sdpa[0] / t_ours[0], "fwdbwd_x_sdpa": t_sdpa[1] / t_ours[1]})
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"case": label, "ok": False, "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
        rows += _decode_timings(device, quick)
    return rows


def _decode_timings(device, quick: bool) -> list[dict]:
    """Time per token of one decode step at a context of T tokens: the kernel over the summary cache's
    slice (T/C − W summaries + W·C + 1 window entries, in place) against SDPA decode over the full
    T-token cache (flash backend, the same batch and heads).  The issue's target: >= 5x at 128k."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnrewrite.kernels.summary.triton_decode import summary_decode

    rows = []
    for context in DECODE_CONTEXTS["quick" if quick else "full"]:
        label = f"decode d{DIM} context={context} C={CHUNK} W={WINDOW}"
        if _elapsed() > FAMILY_BUDGET_S:
            rows.append({"case": label, "note": "skipped: time budget"})
            continue
        try:
            gen = torch.Generator(device=device).manual_seed(2)
            entries = max(0, context // CHUNK - WINDOW) + min(context, WINDOW * CHUNK + 1)
            q = torch.randn(DECODE_BATCH, HEADS, 1, DIM, device=device, generator=gen).to(TIMING_DTYPE)
            keys, values = (_store_slice(DECODE_BATCH, HEADS, entries, DIM, device, gen, TIMING_DTYPE)
                            for _ in range(2))
            full_k, full_v = (torch.randn(DECODE_BATCH, HEADS, context, DIM, device=device, generator=gen)
                              .to(TIMING_DTYPE) for _ in range(2))
            ours = _bench(lambda: summary_decode(q, keys, values))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v))
            rows.append({"case": label, "B,H": f"{DECODE_BATCH},{HEADS}", "entries": entries, "decode_ms": ours,
                         "sdpa_decode_ms": sdpa, "decode_x_sdpa": sdpa / ours})
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"case": label, "ok": False, "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows
