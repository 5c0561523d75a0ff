"""Compile every linear-attention Triton kernel for an H100 (sm_90) without a GPU, and report its resources.

Runs the real launchers on CPU tensors with each kernel replaced by a recorder, then compiles
each recorded launch the way Triton's launcher would (same specialisation of pointers and
integers) for ``GPUTarget("cuda", 90, 32)`` and prints registers, spilled bytes (local memory)
and shared memory from the cubin, plus whether the matmuls became Hopper ``wgmma``.

    python bench/linear_sm90_compile.py [--quick]

This catches what the interpreter cannot (code that does not compile for the GPU, register
spills) before a GPU is lent.  Do not set TRITON_INTERPRET: the kernels must be real JIT functions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this script compiles the kernels for the GPU")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from attnrewrite.kernels.linear import bidirectional, chunk_bwd, chunk_fwd, fused_recurrent  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = {
    chunk_fwd: ("chunk_state_kernel", "chunk_fwd_kernel"),
    chunk_bwd: ("bwd_gamma_kernel", "chunk_bwd_dq_kernel", "chunk_bwd_dk_kernel", "chunk_bwd_dv_kernel"),
    bidirectional: ("bidir_fwd_kernel", "bidir_bwd_dq_kernel", "bidir_bwd_dk_kernel", "bidir_bwd_dv_kernel"),
    fused_recurrent: ("recurrent_fwd_kernel",),
}


class Recorder:
    """Stands in for a JIT kernel: remembers each launch's arguments instead of running it."""

    def __init__(self, jit_fn, calls):
        self.jit_fn, self.calls = jit_fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.jit_fn, grid, args, kwargs))


def compile_call(jit_fn, args, kwargs):
    backend = make_backend(TARGET)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def resources(compiled) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for token in text.split():
        if ":" in token and token.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"):
            name, value = token.split(":")
            usage[name] = int(value)
    ptx = compiled.asm["ptx"]
    usage["smem"] = compiled.metadata.shared
    usage["wgmma"] = "wgmma.mma_async" in ptx
    usage["mma"] = "mma.sync" in ptx
    return usage


def scenarios(quick: bool):
    """(label, dtype, D, causal, options): every kernel and every constexpr branch is reached by some."""
    dims = (128,) if quick else (64, 128)
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
    plain = dict(feature=0, varlen=False, masked=True, group=2)
    for d in dims:
        for dtype in dtypes:
            for causal in (True, False):
                yield f"d{d}-{str(dtype)[6:]}-{'causal' if causal else 'bidir'}", dtype, d, causal, plain
    if not quick:
        for causal in (True, False):
            kind = "causal" if causal else "bidir"
            yield f"d128-relu-varlen-{kind}", torch.bfloat16, 128, causal, dict(plain, feature=1, varlen=True, masked=False)
            yield f"d80-identity-mha-{kind}", torch.bfloat16, 80, causal, dict(plain, feature=2, masked=False, group=1)


def record_all(dtype, d, causal, options, configs=None):
    b, hkv, t = 2, 4, 512
    hq = hkv * options["group"]
    batch = 1 if options["varlen"] else b
    q = torch.randn(batch, hq, t, d, dtype=dtype)
    k = torch.randn(batch, hkv, t, d, dtype=dtype)
    v = torch.randn(batch, hkv, t, d, dtype=dtype)
    cu = torch.tensor([0, 100, 512], dtype=torch.int32) if options["varlen"] else None
    n = 2
    key_mask = torch.ones(b, t, dtype=torch.int8) if options["masked"] else None
    kw = dict(feature_map_id=options["feature"], scale=1.0, configs=configs, key_mask=key_mask, cu_seqlens=cu)
    if causal:
        out, inv_den, fs, fz, ss, sz = chunk_fwd.chunk_linear_attn_fwd(q, k, v, eps=1e-6, num_splits=2,
                                                                      initial_S=torch.zeros(n, hkv, d, d),
                                                                      initial_z=torch.zeros(n, hkv, d), **kw)
        out = torch.randn_like(q)  # the recorded forward wrote nothing
        chunk_bwd.chunk_linear_attn_bwd(torch.randn_like(out), q, k, v, out, inv_den, ss, sz, has_start=True,
                                        d_final_S=torch.zeros(n, hkv, d, d), **kw)
    else:
        out, inv_den, S, z = bidirectional.bidirectional_linear_attn_fwd(q, k, v, eps=1e-6, num_splits=2, **kw)
        out = torch.randn_like(q)
        bidirectional.bidirectional_linear_attn_bwd(torch.randn_like(out), q, k, v, out, inv_den, S, z, num_splits=2,
                                                    **kw)
        fused_recurrent.fused_recurrent_linear_attn(q[:, :, :1], k[:, :, :1], v[:, :, :1], torch.zeros(batch, hkv, d, d),
                                                    torch.zeros(batch, hkv, d), feature_map_id=options["feature"],
                                                    scale=1.0, eps=1e-6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--config", default="", help="force a config on every kernel, e.g. BLOCK_T=128,BLOCK_V=64,"
                        "BLOCK_K=64,num_warps=8,num_stages=2")
    args = parser.parse_args(argv)
    configs = None
    if args.config:
        forced = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.config.split(",")}
        from attnrewrite.kernels.linear.tune import SPACES
        configs = {name: {a: forced[a] for a in space.axes if a in forced} | {a: space.default[a] for a in space.axes
                                                                               if a not in forced}
                   for name, space in SPACES.items()}
    calls = []
    saved = {}
    for module, names in KERNELS.items():
        for name in names:
            saved[(module, name)] = getattr(module, name)
            setattr(module, name, Recorder(saved[(module, name)], calls))
    failures = 0
    try:
        rows = []
        for label, dtype, d, causal, options in scenarios(args.quick):
            calls.clear()
            record_all(dtype, d, causal, options, configs)
            for jit_fn, _, a, kw in calls:
                name = jit_fn.fn.__name__
                try:
                    usage = resources(compile_call(jit_fn, a, kw))
                    flag = "SPILLS" if usage.get("LOCAL", 0) or usage.get("STACK", 0) else ""
                    rows.append(f"{label:22s} {name:24s} warps={kw.get('num_warps')} stages={kw.get('num_stages')} "
                                f"REG={usage.get('REG')} STACK={usage.get('STACK')} LOCAL={usage.get('LOCAL')} smem={usage['smem']} "
                                f"wgmma={usage['wgmma']} {flag}")
                except Exception as exc:  # noqa: BLE001 — report every kernel that fails, not just the first
                    failures += 1
                    rows.append(f"{label:22s} {name:24s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                print(rows[-1], flush=True)
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)
    print(f"triton {triton.__version__}: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
