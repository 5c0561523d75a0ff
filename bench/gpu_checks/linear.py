"""GPU check of the linear-attention kernels (part of bench/gpu_check.py).

correctness: every Triton kernel in bf16 and fp16 on the GPU — causal chunked forward/backward
(plain, GQA with initial/final state, split into segments, packed varlen), bidirectional forward/
backward (key padding, Tq != Tk), recurrent decode after a prefill — against the fp64 quadratic
oracle; bound 2 × plain torch in the same dtype (quadratic form, with autograd) + a rounding band
(eps(dtype) + eps(fp32)·√T)·max|ref|.

timings: causal forward and forward+backward at T = 1k … 32k, D = 64 and 128, bf16, batch 2 ×
16 heads, against torch SDPA softmax (causal) and, when the ``fla`` package (PyPI ``fla-core``)
imports, fla's ``chunk_linear_attn`` — once on pre-mapped inputs (its kernels alone) and once with
the elu+1 feature map applied in torch as fla's own layers do (the same function we compute).
fla autotunes on first use; its search spaces are pruned to num_warps 4/8, 2 stages and blocks
of 64 so that the check fits its few minutes.  Then a decode step (one token, state carried)
against SDPA over a KV cache of the same length, eager and in a CUDA graph; then probes of a few
alternative launch configurations and segment counts at T = 8192, D = 128.

Our kernels run with their search-space defaults (inside tuning.autotune_disabled()): no
tuning table has been measured yet.
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.nn.functional as F

from attnrewrite.kernels import tuning
from attnrewrite.testing.numerics import error_budget, rounding_band

NAME = "linear"
TIMING_BATCH, TIMING_HEADS = 2, 16
PROBE_T, PROBE_D = 8192, 128


# --------------------------------------------------------------------------- correctness


def _oracle(q, k, v, causal, scale, key_mask, state, compute_dtype):
    from attnrewrite.kernels.linear.reference import naive_quadratic_linear_attn

    return naive_quadratic_linear_attn(q, k, v, causal=causal, scale=scale, key_mask=key_mask,
                                       initial_state=state, compute_dtype=compute_dtype)


def _run(fn, q, k, v, state, dtype, upstream):
    """fn(q, k, v, state) -> (out, S, z) on inputs cast to dtype; returns outputs and gradients by name."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    st = None
    if state is not None:
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        st = tuple(t.detach().to(sd).requires_grad_() for t in state)
        leaves += list(st)
    out, S, z = fn(*leaves[:3], st)
    loss = sum((x.double() * u).sum() for x, u in zip((out, S, z), upstream))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    named = {"out": out.detach(), "S": S.detach(), "z": z.detach()}
    named.update({n: g for n, g in zip(("dq", "dk", "dv", "dS0", "dz0"), grads) if g is not None})
    return named


def _check(case, dtype, candidate, q, k, v, *, causal, scale=1.0, key_mask=None, state=None, oracle=None,
           names=None):
    """One row: the worst output/gradient (of ``names``, default all) of ``candidate`` relative to its bound."""
    oracle = oracle or (lambda q_, k_, v_, st, cd: _oracle(q_, k_, v_, causal, scale, key_mask, st, cd))
    ref_out, ref_S, ref_z = oracle(q.double(), k.double(), v.double(),
                                   None if state is None else tuple(t.double() for t in state), torch.float64)
    upstream = (torch.randn_like(ref_out), torch.randn_like(ref_S), torch.randn_like(ref_z))
    ref = _run(lambda *a: oracle(*a[:3], a[3], torch.float64), q, k, v, state, torch.float64, upstream)
    def plain_in(pdtype):
        return _run(lambda *a: oracle(*a[:3], None if a[3] is None else tuple(t.to(pdtype) for t in a[3]), pdtype),
                    q, k, v, state, pdtype, upstream)

    plain, baseline = plain_in(dtype), str(dtype).replace("torch.", "")
    if not all(torch.isfinite(x).all() for x in plain.values()):
        # fp16 plain torch overflows at long T (the normaliser grows like T·D): fall back to bf16's error
        plain, baseline = plain_in(torch.bfloat16), "bfloat16 (plain fp16 overflowed)"
    got = _run(candidate, q, k, v, state, dtype, upstream)
    worst = None
    for name, expected in ref.items():
        if names is not None and name not in names:
            continue
        # the rule of attnrewrite.testing.numerics, with the band of an fp32 running sum over T terms
        bound = error_budget(plain[name], expected, dtype, band=rounding_band(dtype, expected, length=k.shape[2]))
        actual = got[name].double()
        err = (actual - expected).abs().max().item() if torch.isfinite(actual).all() else float("inf")
        if worst is None or err / bound > worst[1] / worst[2]:
            worst = (name, err, bound)
    name, err, bound = worst
    return {"case": case, "dtype": str(dtype).replace("torch.", ""), "worst": name, "max_err": err, "bound": bound,
            "ok": err <= bound, "baseline": baseline}


def _api(causal, scale=1.0, **kw):
    from attnrewrite.kernels.linear import linear_attention_dispatch

    def candidate(q, k, v, st):
        out, final = linear_attention_dispatch(q, k, v, is_causal=causal, scale=scale, enable_gqa=True, initial_state=st,
                                      output_final_state=True, impl="triton", **kw)
        return out, final.S, final.z

    return candidate


def _cases(device):
    from attnrewrite.kernels.linear.op import ops_for

    dev = dict(device=device)
    rnd = lambda *s: torch.randn(*s, **dev)  # noqa: E731
    state = lambda n, h, dk, dv: (rnd(n, h, dk, dv) * 4, torch.rand(n, h, dk, **dev) * 8 + 1)  # noqa: E731
    T = 1000 if device.type == "cuda" else 100

    def causal_gqa(d):
        q, k, v = rnd(2, 4, T, d), rnd(2, 2, T, d), rnd(2, 2, T, d)
        return dict(candidate=_api(True, scale=0.5), q=q, k=k, v=v, causal=True, scale=0.5, state=state(2, 2, d, d))

    def causal_relu_d64():
        q, k, v = rnd(2, 2, T, 64), rnd(2, 2, T, 64), rnd(2, 2, T, 64)
        return dict(candidate=_api(True, feature_map="relu"), q=q, k=k, v=v, causal=True,
                    oracle=lambda q_, k_, v_, st, cd: _relu_oracle(q_, k_, v_, True, cd))

    def causal_split():  # shapes like causal_gqa's, so its compiled kernels are reused
        q, k, v = rnd(1, 4, 2 * T, 128), rnd(1, 2, 2 * T, 128), rnd(1, 2, 2 * T, 128)
        fwd = ops_for(device)[0]

        def candidate(q_, k_, v_, st):
            out, _, S, z, _, _ = fwd(q_, k_, v_, None, None, st[0], st[1], True, "elu", 1.0, 1e-6, 5)
            return out, S, z
        return dict(candidate=candidate, q=q, k=k, v=v, causal=True, state=state(1, 2, 128, 128))

    def causal_varlen():
        lengths = [300, 0, T, 77] if device.type == "cuda" else [30, 0, 50, 7]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        n = sum(lengths)
        q, k, v = rnd(1, 2, n, 128), rnd(1, 2, n, 128), rnd(1, 2, n, 64)
        bounds = cu.tolist()

        def oracle(q_, k_, v_, st, cd):
            parts = [_oracle(q_[:, :, a:b], k_[:, :, a:b], v_[:, :, a:b], True, 1.0, None, (st[0][i:i + 1], st[1][i:i + 1]), cd)
                     for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
            return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        return dict(candidate=_api(True, cu_seqlens=cu), q=q, k=k, v=v, causal=True, oracle=oracle,
                    state=state(len(lengths), 2, 128, 64))

    def bidir_padding(d):
        q, k, v = rnd(2, 4, T, d), rnd(2, 2, T, d), rnd(2, 2, T, d)
        lens = torch.tensor([T, T // 3], device=device)
        keep = torch.arange(T, device=device)[None] < lens[:, None]
        return dict(candidate=_api(False, kv_lens=lens), q=q, k=k, v=v, causal=False, key_mask=keep,
                    state=state(2, 2, d, d))

    def bidir_cross():
        q, k, v = rnd(2, 2, T // 3, 128), rnd(2, 2, T, 128), rnd(2, 2, T, 128)
        return dict(candidate=_api(False), q=q, k=k, v=v, causal=False)

    def decode():
        q, k, v = rnd(2, 4, T, 128), rnd(2, 2, T, 128), rnd(2, 2, T, 128)
        t0 = T - (40 if device.type == "cuda" else 5)

        def candidate(q_, k_, v_, st):
            from attnrewrite.kernels.linear import linear_attention_dispatch, linear_attention_decode

            _, state_ = linear_attention_dispatch(q_[:, :, :t0], k_[:, :, :t0], v_[:, :, :t0], is_causal=True, enable_gqa=True,
                                         output_final_state=True, impl="triton")
            outs = []
            with torch.no_grad():  # the decode kernel itself (with gradients decode takes the chunked op)
                for t in range(t0, q_.shape[2]):
                    out, state_ = linear_attention_decode(q_[:, :, t:t + 1], k_[:, :, t:t + 1], v_[:, :, t:t + 1],
                                                          state_, impl="triton")
                    outs.append(out)
            prefix = linear_attention_dispatch(q_[:, :, :t0], k_[:, :, :t0], v_[:, :, :t0], is_causal=True, enable_gqa=True,
                                      impl="triton")
            # decoded rows carry no gradient: the row compares outputs and state only
            return torch.cat([prefix, torch.cat(outs, 2)], 2), state_.S, state_.z
        return dict(candidate=candidate, q=q, k=k, v=v, causal=True, names=("out", "S", "z"))

    def compiled():
        q, k, v = rnd(2, 4, T, 128), rnd(2, 2, T, 128), rnd(2, 2, T, 128)
        fn = torch.compile(_api(True, scale=0.5), backend="inductor" if device.type == "cuda" else "aot_eager")
        return dict(candidate=fn, q=q, k=k, v=v, causal=True, scale=0.5, state=state(2, 2, 128, 128))

    # fp16 differs from bf16 only in the matmul operand type (tf32), so it runs on a subset
    both, bf16 = (torch.bfloat16, torch.float16), (torch.bfloat16,)
    yield "causal GQA 4/2 D128 + state", causal_gqa, (128,), both
    yield "causal relu D64", causal_relu_d64, (), bf16
    yield "causal 5 segments D128", causal_split, (), bf16
    yield "causal varlen [300,0,1000,77] Dk128 Dv64", causal_varlen, (), bf16
    yield "bidirectional padding GQA D128 + state", bidir_padding, (128,), both
    yield "bidirectional padding GQA D64 + state", bidir_padding, (64,), bf16
    yield "bidirectional Tq=T/3 D128", bidir_cross, (), bf16
    yield "decode 40 steps after prefill D128", decode, (), both
    yield "torch.compile (inductor) causal GQA D128 + state", compiled, (), bf16


def _relu_oracle(q, k, v, causal, compute_dtype):
    from attnrewrite.kernels.linear.reference import naive_quadratic_linear_attn

    return naive_quadratic_linear_attn(q, k, v, causal=causal, feature_map="relu", compute_dtype=compute_dtype)


def correctness(device) -> list[dict]:
    rows = []
    with tuning.autotune_disabled():
        for case, make, args, dtypes in _cases(device):
            if device.type != "cuda":  # a CPU dry run under the interpreter: its bf16 matmul is wrong
                dtypes = (torch.float16,)
            for dtype in dtypes:
                try:
                    torch.manual_seed(len(rows))
                    spec = make(*args)
                    rows.append(_check(case, dtype, spec.pop("candidate"), spec.pop("q"), spec.pop("k"),
                                       spec.pop("v"), **spec))
                except Exception as exc:  # noqa: BLE001 — a failing case records a row and the check goes on
                    traceback.print_exc(file=sys.stderr)
                    rows.append({"case": case, "dtype": str(dtype).replace("torch.", ""), "worst": "",
                                 "max_err": float("nan"), "bound": float("nan"), "ok": False,
                                 "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"})
                print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- timings


def _bench(fn, graph: bool = False, grad_to_none=None) -> float:
    """Median ms of ``fn`` (gradients of ``grad_to_none`` reset before each run, so no accumulation is timed)."""
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, grad_to_none=grad_to_none, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median"))


def _fla():
    """fla's chunk_linear_attn with autotuning pruned, or None when fla does not import."""
    try:
        import fla.ops.linear_attn as fla_linear
    except Exception as exc:  # noqa: BLE001 — fla is optional; say why it is missing
        print(f"fla unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    from triton.runtime.autotuner import Autotuner

    pruned = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for obj in list(vars(module).values()):
            for _ in range(4):  # autotuners sit under heuristics wrappers: follow .fn
                if isinstance(obj, Autotuner) and len(obj.configs) > 2:
                    obj.configs = _prune(obj.configs)
                    pruned += 1
                obj = getattr(obj, "fn", None)
                if obj is None:
                    break
    print(f"fla: pruned the search space of {pruned} autotuned kernels", file=sys.stderr)
    return fla_linear.chunk_linear_attn


def _prune(configs):
    """At most two points per fla kernel (4 and 8 warps, 2 stages, blocks of 64 where offered):
    fla's full spaces (up to 48 points per kernel, re-tuned per head dim) take several minutes to
    compile, more than this whole check may take."""
    keep = [c for c in configs if c.num_warps in (4, 8) and c.num_stages == 2]
    for key in {k for c in configs for k in c.kwargs}:
        values = {c.kwargs.get(key) for c in keep}
        if 64 in values:
            keep = [c for c in keep if c.kwargs.get(key) == 64]
    return keep[:2] or configs[:1]


def _timing_rows(device, T, d, fla_fn, passes):
    from attnrewrite.kernels.linear import linear_attention_dispatch

    b, h = TIMING_BATCH, TIMING_HEADS
    q, k, v, do = (torch.randn(b, h, T, d, device=device, dtype=torch.bfloat16) for _ in range(4))
    q_t, k_t, v_t, do_t = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))  # fla's [B, T, H, D]
    leaves = [x.requires_grad_() for x in (q, k, v, q_t, k_t, v_t)]
    impls = {
        "ours": lambda: linear_attention_dispatch(q, k, v, is_causal=True, impl="triton"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    if fla_fn is not None:
        impls["fla"] = lambda: fla_fn(q_t, k_t, v_t, scale=1.0, normalize=True)[0]
        impls["fla+phi"] = lambda: fla_fn(F.elu(q_t) + 1, F.elu(k_t) + 1, v_t, scale=1.0, normalize=True)[0]
    rows = []
    for pass_name in passes:
        row = {"case": f"causal {pass_name}", "T": T, "D": d}
        for name, fn in impls.items():
            grad = do_t if name.startswith("fla") else do
            try:
                if pass_name == "fwd":
                    with torch.no_grad():
                        ms = _bench(fn)
                else:
                    ms = _bench(lambda: fn().backward(grad), grad_to_none=leaves)
                row[f"{name}_ms"] = ms
            except Exception as exc:  # noqa: BLE001 — record and go on
                row[f"{name}_ms"] = float("nan")
                row.setdefault("error", f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            for x in leaves:
                x.grad = None
        for other in ("sdpa", "fla", "fla+phi"):
            if f"{other}_ms" in row and row.get("ours_ms"):
                row[f"x_vs_{other}"] = row[f"{other}_ms"] / row["ours_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def _decode_rows(device, T, d):
    from attnrewrite.kernels.linear import LinearState, linear_attention_decode

    b, h = TIMING_BATCH, TIMING_HEADS
    q, k, v = (torch.randn(b, h, 1, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    cache_k, cache_v = (torch.randn(b, h, T, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    state = LinearState(torch.randn(b, h, d, d, device=device), torch.rand(b, h, d, device=device) * T)
    ours = lambda: linear_attention_decode(q, k, v, state, impl="triton")  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, cache_k, cache_v)  # noqa: E731
    rows = []
    with torch.no_grad():
        for graph in (False, True):
            row = {"case": "decode step" + (" (CUDA graph)" if graph else " (eager)"), "T": T, "D": d}
            try:
                row["ours_ms"], row["sdpa_ms"] = _bench(ours, graph), _bench(sdpa, graph)
                row["x_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            rows.append(row)
            print(row, flush=True)
    return rows


def _probe_rows(device):
    """Alternative launch configurations of each causal kernel, and segment counts, at T = 8192, D = 128:
    how far the untuned defaults are from the best nearby point (a tuning table would close the gap)."""
    from attnrewrite.kernels.linear import linear_attention_dispatch
    from attnrewrite.kernels.linear.op import ops_for
    from attnrewrite.kernels.linear.tune import SPACES

    b, h, T, d = TIMING_BATCH, TIMING_HEADS, PROBE_T, PROBE_D
    q, k, v, do = (torch.randn(b, h, T, d, device=device, dtype=torch.bfloat16) for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    rows = []
    fwd = ops_for(device)[0]
    for splits in (1, 2, 4, 8, 16):  # many segments ≈ fla's chunk-parallel scheme; one = fully sequential
        def run():
            out = fwd(q, k, v, None, None, None, None, True, "elu", 1.0, 1e-6, splits)[0]
            out.backward(do)
        row = {"case": f"probe num_splits={splits}", "T": T, "D": d}
        try:
            row["ours_ms"] = _bench(run, grad_to_none=leaves)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        rows.append(row)
        print(row, flush=True)
        for x in leaves:
            x.grad = None

    alternatives = [{"BLOCK_T": 32, "num_warps": 8, "num_stages": 2, "block": 64},
                    {"BLOCK_T": 64, "num_warps": 4, "num_stages": 2, "block": 32}]
    original = tuning.choose
    for kernel in ("chunk_fwd", "chunk_bwd_dq", "chunk_bwd_dk", "chunk_bwd_dv"):
        space = SPACES[kernel]
        block_axis = next(a for a in space.axes if a.startswith("BLOCK_") and a != "BLOCK_T")
        for alt in [None] + alternatives:
            config = dict(space.default) if alt is None else {
                "BLOCK_T": alt["BLOCK_T"], "num_warps": alt["num_warps"], "num_stages": alt["num_stages"],
                block_axis: alt["block"]}

            def choose(kind, sp, shape, device=None, make_bench=None, _k=kernel, _c=config):
                return dict(_c) if sp.kernel == _k else original(kind, sp, shape, device, make_bench)

            row = {"case": f"probe {kernel} {'default ' if alt is None else ''}{config}", "T": T, "D": d}
            tuning.choose = choose
            try:
                row["ours_ms"] = _bench(lambda: linear_attention_dispatch(q, k, v, is_causal=True, impl="triton").backward(do),
                                        grad_to_none=leaves)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            finally:
                tuning.choose = original
            for x in leaves:
                x.grad = None
            rows.append(row)
            print(row, flush=True)
    return rows


def timings(device, quick: bool) -> list[dict]:
    rows = []
    with tuning.autotune_disabled():
        fla_fn = _fla()
        lengths = (8192,) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
        dims = (128,) if quick else (128, 64)  # the target (D = 128) first
        for d in dims:
            for T in lengths:
                rows += _timing_rows(device, T, d, fla_fn, ("fwd", "fwd+bwd"))
                torch.cuda.empty_cache()
        for T in ((32768,) if quick else (8192, 32768)):
            rows += _decode_rows(device, T, 128)
        if not quick:
            rows += _probe_rows(device)
    return rows + _targets(rows)


def _targets(rows) -> list[dict]:
    """The issue's targets (H100, bf16, D = 128), read off the rows above; "met" is not "ok": a
    missed target is a finding, not a failed check."""
    def find(case, T, key):
        return next((r.get(key) for r in rows if r["case"] == case and r["T"] == T and r.get("D") == 128), None)

    wanted = [("fwd+bwd T=8192 vs fla chunk_linear_attn (+elu in torch)", find("causal fwd+bwd", 8192, "x_vs_fla+phi"), 1.1),
              ("fwd+bwd T=8192 vs fla kernels alone", find("causal fwd+bwd", 8192, "x_vs_fla"), 1.1),
              ("fwd+bwd T=8192 vs SDPA softmax", find("causal fwd+bwd", 8192, "x_vs_sdpa"), 4.0),
              ("decode step T=32768 vs SDPA decode (eager)", find("decode step (eager)", 32768, "x_vs_sdpa"), 10.0),
              ("decode step T=32768 vs SDPA decode (CUDA graph)", find("decode step (CUDA graph)", 32768, "x_vs_sdpa"), 10.0)]
    return [{"case": f"target: {name}", "T": "", "D": 128, "speedup": got if got is not None else float("nan"),
             "target": want, "met": None if got is None else got >= want} for name, got, want in wanted]
