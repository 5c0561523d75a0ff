"""Context parallelism on the CPU: per-rank peak memory and time of one causal attention layer, or of a model.

For each kind and T, one forward+backward of causal attention (B=1, 8 heads, D=64, fp32, 1 torch
thread per process) in one process (the plain op on the whole sequence) and in W processes (gloo on
loopback, each holding T/W tokens, inside ``attnrewrite.distributed.context_parallel``).  Per rank:
the growth of the peak resident set over the rank's baseline once its inputs exist (large
allocations served by mmap, so the peak follows the live tensors), and the wall time and the CPU time
(``time.process_time``: the rank process's user + system time, all its threads, gloo's included; waiting
for another rank costs wall time, not CPU time) of the call, after a warm-up at T=256.  The table shows the
largest rank's peak and the slowest rank's times, the ranks per core (above 1 the ranks share cores, so
their wall time is no speed measurement: a 2-core machine over-subscribed by 4 ranks) and the 1-minute load
average, the larger of before and after the row (other jobs share the cores too).

``--model``: a training step (forward, cross-entropy, backward) of the llama target shaped like issue 14's
model (4 layers, width 256, 8 query / 4 key-value heads of 32, float32, byte vocabulary) on one sequence of T
random tokens, each layer's attention the kind's op (as ``examples/train_lm.py --context-parallel`` runs it:
the whole sequence in one process, or the manager sharding tokens, targets and positions over W).  What a
rank holds then is mostly the layers' activations, which sharding divides by W.

    python bench/context_parallel_cpu.py [--lengths 8192,16384] [--worlds 1,2] [--kinds softmax,sigmoid,...]
    python bench/context_parallel_cpu.py --model [--layers 4] ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS, DIM = 8, 64
KINDS = ("softmax", "sigmoid", "linear", "summary", "hashed", "sliding_window")


def _attention(kind: str):
    import torch.nn.functional as F

    from attnrewrite import ops

    return {
        "softmax": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sigmoid": lambda q, k, v: ops.sigmoid_attention(q, k, v, is_causal=True),
        "linear": lambda q, k, v: ops.linear_attention(q, k, v, is_causal=True),
        "summary": lambda q, k, v: ops.summary_attention(q, k, v, is_causal=True),
        "hashed": lambda q, k, v: ops.hashed_attention(q, k, v, is_causal=True),
        "sliding_window": lambda q, k, v: ops.sliding_window_attention(q, k, v, is_causal=True),
    }[kind]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _one_call(kind: str, local: int, rank: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak MB over the baseline) of forward+backward on ``local`` tokens of this rank."""
    import torch

    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, HEADS, local, DIM, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(1, HEADS, local, DIM, generator=g)
    base = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start, start_cpu = time.perf_counter(), time.process_time()
    _attention(kind)(q, k, v).backward(grad)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return seconds, cpu_seconds, (_status_kb("VmHWM:") - base) / 1024


def _model_step(kind: str, layers: int, length: int, mesh) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak MB over the baseline) of one training step of the llama target on
    ``length`` tokens: the whole sequence (``mesh`` None) or this rank's shard of it."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "examples"))
    from train_lm import kind_options, use_op_attention

    from attnrewrite.distributed import context_parallel
    from bench.decode_cpu import model_config

    torch.manual_seed(0)
    from attnrewrite.targets.llama import Llama

    config = model_config(length)
    config.n_layers = layers
    model = Llama(config)
    use_op_attention(model, kind, kind_options(argparse.Namespace(attention=kind, feature_map="elu", window=256,
                                                                  sinks=4, block_size=length, option=[])))
    # the op attention is causal by itself and, given positions, the model reads neither its [S_max, S_max]
    # causal-mask buffer (1 GB at 32k, made before the baseline) nor builds a [T/W, T/W] one
    model.causal_mask = torch.ones(0, 0, dtype=torch.bool)
    tokens = torch.randint(0, config.vocab_size, (1, length + 1), generator=torch.Generator().manual_seed(1))
    x, y, positions = tokens[:, :-1].clone(), tokens[:, 1:].clone(), torch.arange(length)
    base = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start, start_cpu = time.perf_counter(), time.process_time()
    if mesh is None:
        F.cross_entropy(model(x, positions=positions).flatten(0, 1), y.flatten()).backward()
    else:
        with context_parallel(mesh, buffers=[x, y, positions], buffer_seq_dims=[1, 1, 0]):
            F.cross_entropy(model(x, positions=positions).flatten(0, 1), y.flatten()).backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return seconds, cpu_seconds, (_status_kb("VmHWM:") - base) / 1024


def _rank_main(rank: int, world: int, port: int, kind: str, length: int, out: str, layers: int = 0) -> None:
    import torch

    torch.set_num_threads(1)
    if layers and world == 1:
        _model_step(kind, layers, 256, None)
        seconds, cpu_seconds, peak = _model_step(kind, layers, length, None)
    elif world == 1:
        _one_call(kind, 256, rank)
        seconds, cpu_seconds, peak = _one_call(kind, length, rank)
    elif layers:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=3600))
        mesh = init_device_mesh("cpu", (world,))
        _model_step(kind, layers, 256, mesh)
        dist.barrier()
        seconds, cpu_seconds, peak = _model_step(kind, layers, length, mesh)
        dist.destroy_process_group()
    else:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from attnrewrite.distributed import context_parallel

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
        mesh = init_device_mesh("cpu", (world,))
        with context_parallel(mesh):
            _one_call(kind, 256 // world, rank)
            dist.barrier()
            seconds, cpu_seconds, peak = _one_call(kind, length // world, rank)
        dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak}))


def measure(kind: str, length: int, world: int, layers: int = 0) -> dict:
    """The slowest rank's wall and CPU time and the largest rank's peak memory, each rank a fresh process
    (``layers``: the model's training step, else one attention call)."""
    import torch.multiprocessing as mp

    from attnrewrite.testing.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world, free_port(), kind, length, out, layers), nprocs=world, join=True,
                           start_method="spawn")
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    return {"seconds": max(r["seconds"] for r in ranks), "cpu_seconds": max(r["cpu_seconds"] for r in ranks),
            "peak_mb": max(r["peak_mb"] for r in ranks), "per_rank": ranks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--model", action="store_true", help="a training step of the llama target, not one call")
    parser.add_argument("--layers", type=int, default=4, help="the model's layers (with --model)")
    args = parser.parse_args(argv)
    # glibc reads this at start-up: the spawned ranks inherit it (see bench/long_context_cpu.py)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    what = (f"llama target ({args.layers} layers, width 256, 8/4 heads of 32) training step" if args.model else
            f"B=1 H={HEADS} D={DIM} causal attention fwd+bwd")
    print(f"# context_parallel_cpu: commit {commit.strip()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores, {what}, fp32, 1 thread/rank")
    cores = os.cpu_count()
    print("| kind | T | ranks | time s (slowest rank) | peak MB (largest rank) | peak vs 1 rank "
          "| CPU s (slowest rank) | ranks/cores | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for kind in args.kinds.split(","):
        for length in (int(t) for t in args.lengths.split(",")):
            single = None
            for world in (int(w) for w in args.worlds.split(",")):
                load = os.getloadavg()[0]
                row = measure(kind, length, world, args.layers if args.model else 0)
                load = max(load, os.getloadavg()[0])
                single = row["peak_mb"] if world == 1 else single
                ratio = f"{row['peak_mb'] / single:.2f}" if single else "-"
                shared = f"{world}/{cores}" + (" (over-subscribed)" if world > cores else "")
                print(f"| {kind} | {length} | {world} | {row['seconds']:.3g} | {row['peak_mb']:.0f} | {ratio} "
                      f"| {row['cpu_seconds']:.3g} | {shared} | {load:.1f} |", flush=True)
                rows.append({"kind": kind, "T": length, "world": world, "load": load, "cores": cores, **row})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
