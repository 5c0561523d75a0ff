"""One causal GQA attention call on the CPU: the sigmoid kind's torch path against SDPA (issue 14).

q [1, 8, T, 32], k/v [1, 4, T, 32], float32, 1 torch thread; forward and forward+backward of
``attnrewrite.ops.sigmoid_attention`` (``sigmoid``: with its compiled loop, ``sigmoid-aten``: with
``ATTNREWRITE_NATIVE=0``, the ATen ops only) and of ``F.scaled_dot_product_attention`` (causal, GQA),
timed in turn per repeat (process CPU time, so a loaded machine's waiting is not counted); median;
ratios = SDPA's time / sigmoid's (higher is faster).

    PYTHONPATH=. python bench/sigmoid_ops_cpu.py --lengths 1024,4096 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnrewrite import ops  # noqa: E402

HEADS_Q, HEADS_KV, DIM = 8, 4, 32


@contextlib.contextmanager
def _native(enabled: bool):
    """Switch the sigmoid torch path's compiled loop on or off (``ATTNREWRITE_NATIVE``) for a forward and backward."""
    previous = os.environ.get("ATTNREWRITE_NATIVE")
    os.environ["ATTNREWRITE_NATIVE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["ATTNREWRITE_NATIVE"]
        else:
            os.environ["ATTNREWRITE_NATIVE"] = previous


def _calls():
    """name -> (call, whether the compiled loop is on)."""
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    sigmoid = lambda q, k, v: ops.sigmoid_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    return {"sdpa": (sdpa, True), "sigmoid": (sigmoid, True), "sigmoid-aten": (sigmoid, False)}


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls = _calls()
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, 1 thread; CPU ms, median of "
          f"{args.repeats}; x SDPA = SDPA's time / the variant's")
    for length in (int(t) for t in args.lengths.split(",")):
        g = torch.Generator().manual_seed(zlib.crc32(f"sigmoid_ops_cpu/{length}".encode()))
        q = torch.randn(1, HEADS_Q, length, DIM, generator=g, requires_grad=True)
        k = torch.randn(1, HEADS_KV, length, DIM, generator=g, requires_grad=True)
        v = torch.randn(1, HEADS_KV, length, DIM, generator=g, requires_grad=True)
        grad = torch.randn(1, HEADS_Q, length, DIM, generator=g)
        times = {(name, mode): [] for name in calls for mode in ("fwd", "fwd+bwd")}
        for name, (call, native) in calls.items():  # warm-up
            with _native(native):
                call(q, k, v).backward(grad)
        for _ in range(args.repeats):
            for name, (call, native) in calls.items():
                with _native(native), torch.no_grad():
                    times[name, "fwd"].append(_cpu(lambda: call(q, k, v)))
                with _native(native):
                    times[name, "fwd+bwd"].append(_cpu(lambda: call(q, k, v).backward(grad)))
        for mode in ("fwd", "fwd+bwd"):
            base = statistics.median(times["sdpa", mode])
            row = []
            for name in calls:
                t = statistics.median(times[name, mode])
                row.append(f"{name} {t * 1e3:8.1f} ms {base / t:5.2f}x")
            print(f"T={length:5d} {mode:8s} " + " | ".join(row))


if __name__ == "__main__":
    main()
