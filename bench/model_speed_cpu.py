"""Whole-model speed of each attention kind on the CPU: eager vs inductor alone vs attnrewrite (+ inductor).

Models (``--models``, each built from a config, random weights, no download):

- ``llama``: HF transformers ``LlamaForCausalLM``, 4 layers, hidden 256, 8 query / 4 kv heads (head dim
  32), MLP 688, ``attn_implementation="eager"``; one sequence of T tokens (``--lengths``, default 1024,4096).
- ``bert``: an HF ``BertModel`` encoder, 4 layers, hidden 256, 4 heads, eager attention; a batch of 4
  sequences padded to ``--bert-length`` (512) with 100 %, 75 %, 50 % and 25 % real tokens.
- ``vit``: the ViT target (``attnrewrite/targets/vit.py``), 4 layers, width 256, 8 heads, 8x8 patches of a
  ``--vit-image`` (256) pixel image: T = (256/8)² + 1 = 1025 tokens, batch 1.

Variants: ``eager`` (the model as written), ``inductor`` (``torch.compile(model)``), on request ``floor`` (an HF
model whose attention returns its values, compiled by inductor: no attention work, so ``inductor / floor`` is
the most "× inductor" any kind can reach on the machine), with ``floor`` on request ``roofline`` (not timed:
rows ``bound: floor + exact attention`` and ``bound: floor + linear attention``, the floor's median plus that
attention's matrix-product FLOPs at the best one-thread sgemm rate measured in the same run at the
attention's own shapes — the least time any kernel of that attention could give the model here, so the
highest "× inductor" it could reach; ``bench/roofline.py`` says what is counted; Llama only) and, for each
kind that applies to the model (``--kinds``; a kind applies unless the registry lists the model among its
``expected_skips``), ``torch.compile(model, backend="attnrewrite", options={"to": kind, "strict": True})`` —
the rewritten graph compiled by inductor, every site rewritten, the kind's default options.

Modes (``--modes``): ``infer`` (forward under ``torch.no_grad``) and ``train`` (forward, mean of the output,
backward; no optimizer step).  Every variant is compiled and run once first (that first call's time is
listed separately as ``first call``: compilation plus one run), then the variants are timed in turn, one
call each per repeat, so that machine noise hits them alike; the table gives the median.  ``--clock``
chooses the clock: ``cpu`` (default: the process's CPU time, which on a shared machine does not count the
time other processes hold the cores) or ``wall``.  Ratios are inductor's time / the variant's time and
the exact rewrite's (softmax) time / the variant's time: higher is faster.

Dense attention at long T needs O(T²) memory per head: ``eager`` and ``inductor`` are skipped in a mode
where their score matrices would exceed ``--dense-gib`` (default 6 GiB), and the table says so.

    python bench/model_speed_cpu.py --models llama --lengths 1024,4096 --kinds softmax,sigmoid,linear
    python bench/model_speed_cpu.py --models llama,bert,vit --lengths 1024,4096,8192 --plot speed.png
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINES = ("eager", "inductor", "floor", "roofline")
MODES = ("infer", "train")
# the registry's name of a model like each benchmarked one (for Kind.expected_skips)
REGISTRY_NAME = {"llama": "llama", "bert": "bert", "vit": "vit"}


@dataclass
class Workload:
    """One model at one length: the module, its inputs, and the sizes that bound dense attention memory."""

    model_name: str
    length: int
    module: Any
    inputs: dict
    batch: int
    heads: int
    layers: int
    sizes: dict | None = None  # the HF Llama's widths, for the roofline (bench/roofline.py)

    def dense_gib(self, mode: str) -> float:
        """GiB of float32 [B, H, T, T] matrices dense attention holds at once (train: every layer's, ~3 each)."""
        one = self.batch * self.heads * self.length ** 2 * 4 / 2 ** 30
        return one * (3 * self.layers if mode == "train" else 2)


def build_llama(length: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max(length, 2048),
                         attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    sizes = dict(hidden=config.hidden_size, q_heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                 head_dim=config.hidden_size // config.num_attention_heads, mlp=config.intermediate_size,
                 vocab=config.vocab_size)
    return Workload("llama", length, model, {"input_ids": ids}, 1, 8, 4, sizes)


def build_bert(length: int):
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=max(length, 512), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False).eval()
    batch = 4
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, :length * (batch - row) // batch] = 1  # 100 %, 75 %, 50 %, 25 % real tokens
    return Workload("bert", length, model, {"input_ids": ids, "attention_mask": mask}, batch, 4, 4)


def build_vit(image: int):
    import torch
    from attnrewrite.targets.vit import ViT, ViTConfig

    config = ViTConfig(image_size=image, patch_size=8, in_channels=3, n_classes=10, dim=256, n_layers=4, n_heads=8,
                       mlp_dim=1024, dropout=0.0)
    model = ViT(config).eval()
    images = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(0))
    return Workload("vit", config.n_patches + 1, model, {"images": images}, 1, 8, 4)


def kinds_for(model_name: str, wanted: list[str] | None) -> list[str]:
    """The kinds that apply to ``model_name`` (softmax first), restricted to ``wanted`` when given."""
    import attnrewrite

    names = [n for n in attnrewrite.kinds.names()
             if REGISTRY_NAME[model_name] not in attnrewrite.kinds.get(n).expected_skips]
    if wanted is not None:
        names = [n for n in names if n in wanted]
    return sorted(names, key=lambda n: (n != "softmax", n))


def loss_of(output) -> Any:
    """A scalar from a model's output (logits, last hidden state or a tensor)."""
    tensor = output if hasattr(output, "float") else (getattr(output, "logits", None)
                                                      if getattr(output, "logits", None) is not None
                                                      else output.last_hidden_state)
    return tensor.float().mean()


@dataclass
class Variant:
    name: str
    fn: Callable
    module: Any
    first_call: dict = field(default_factory=dict)  # mode -> seconds (compile + one run)
    times: dict = field(default_factory=lambda: {m: [] for m in MODES})
    skipped: dict = field(default_factory=dict)  # mode -> reason
    bound: dict = field(default_factory=dict)  # roofline rows only: mode -> seconds (floor + attention at sgemm rate)
    note: dict = field(default_factory=dict)  # --baselines roofline: mode -> what a bound counts, the floor's rate


def without_attention(module):
    """A copy of an HF model whose attention layers return their values unchanged (per query head), compiled
    by inductor: every other op of the model as it is, and no attention work at all — the time below which no
    attention kind can bring the model, so ``inductor / floor`` bounds every kind's "× inductor"."""
    import torch
    from transformers import AttentionInterface

    def values_only(module, query, key, value, attention_mask=None, **kwargs):
        groups = query.shape[1] // value.shape[1]
        out = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        return out[:, :, -query.shape[2]:].transpose(1, 2).contiguous(), None

    AttentionInterface.register("values_only", values_only)
    floor = copy.deepcopy(module)
    floor.set_attn_implementation("values_only")
    return torch.compile(floor), floor


def make_variants(work: Workload, kinds: list[str], baselines: list[str], compiler: str) -> list[Variant]:
    import torch

    variants = [Variant("eager", work.module, work.module),
                Variant("inductor", torch.compile(work.module), work.module)]
    if "floor" in baselines:
        if hasattr(work.module, "set_attn_implementation"):
            variants.append(Variant("floor", *without_attention(work.module)))
        else:
            print(f"  {work.model_name}: no floor row (not an HF model: its attention cannot be swapped out)",
                  file=sys.stderr)
    variants = [v for v in variants if v.name in baselines]
    for kind in kinds:
        # each kind compiles its own copy: the same weights, separate gradients
        module = copy.deepcopy(work.module)
        compiled = torch.compile(module, backend="attnrewrite",
                                 options={"to": kind, "strict": True, "compiler": compiler})
        variants.append(Variant(kind, compiled, module))
    return variants


def run_once(variant: Variant, inputs: dict, mode: str, clock: Callable[[], float]) -> float:
    import torch

    if mode == "infer":
        with torch.no_grad():
            start = clock()
            variant.fn(**inputs)
            return clock() - start
    variant.module.zero_grad(set_to_none=True)
    start = clock()
    loss_of(variant.fn(**inputs)).backward()
    return clock() - start


def bench_workload(work: Workload, kinds: list[str], modes: list[str], baselines: list[str], repeats: int,
                   clock: Callable[[], float], dense_gib: float, compiler: str) -> list[Variant]:
    variants = make_variants(work, kinds, baselines, compiler)
    for variant in variants:
        for mode in modes:
            if variant.name in ("eager", "inductor") and work.dense_gib(mode) > dense_gib:
                variant.skipped[mode] = f"dense scores ~{work.dense_gib(mode):.0f} GiB > --dense-gib {dense_gib:g}"
                continue
            try:
                variant.first_call[mode] = run_once(variant, work.inputs, mode, time.perf_counter)
            except Exception as error:  # noqa: BLE001 — a kind that fails is reported, not fatal to the run
                variant.skipped[mode] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            print(f"  {work.model_name} T={work.length} {variant.name} {mode}: first call "
                  f"{variant.first_call.get(mode, float('nan')):.1f} s {variant.skipped.get(mode, '')}",
                  file=sys.stderr, flush=True)
    for repeat in range(repeats):
        for variant in variants:
            for mode in modes:
                if mode not in variant.skipped:
                    variant.times[mode].append(run_once(variant, work.inputs, mode, clock))
        # progress, so that a run cut short still shows what it measured
        print(f"  repeat {repeat + 1}: " + ", ".join(f"{v.name} {m} {_fmt(v.times[m][-1])}" for v in variants
                                                     for m in modes if v.times[m]), file=sys.stderr, flush=True)
    return variants


def roofline(work: Workload, variants: list[Variant], modes: list[str], clock: Callable[[], float]) -> list[Variant]:
    """Rows of bounds (no timings): per attention form (exact, linear) the floor's median plus the form's
    matrix-product FLOPs at the best one-thread sgemm rate measured now at the attention's shapes — the
    least time any kernel of that form could give the model here (``bench/roofline.py`` says what is
    counted).  Also prints the rates and how close the floor itself is to its projections' roofline."""
    from bench import roofline as rl

    floor = next((v for v in variants if v.name == "floor"), None)
    if work.sizes is None or floor is None:
        why = "no floor row in this run" if floor is None else "its widths are not known here (the Llama only)"
        print(f"  {work.model_name}: no roofline rows ({why})", file=sys.stderr)
        return []
    sizes = work.sizes
    shape = rl.AttentionShape(work.length, sizes["q_heads"], sizes["kv_heads"], sizes["head_dim"], work.layers,
                              work.batch, causal=True)
    rates = rl.measure_rates(work.length, sizes["head_dim"], rl.llama_rest_shapes(work.length, **sizes), clock)
    print(f"  {work.model_name} T={work.length}: one-thread sgemm GFLOP/s, best of 5: " + "; ".join(
        f"{label} {rate / 1e9:.1f}" for cls in ("qk", "pv", "rest") for label, rate in rates[cls]),
        file=sys.stderr, flush=True)
    rows = []
    for form in rl.FORMS:
        row = Variant(f"bound: floor + {form} attention", None, None)
        for mode in modes:
            if not floor.times[mode]:
                continue
            flops = rl.attention_flops(shape, form, mode)
            seconds = rl.attention_seconds(flops, rates)
            row.bound[mode] = statistics.median(floor.times[mode]) + seconds
            total = sum(flops.values())
            row.note[mode] = (f"{total / 1e9:.3g} GFLOP of {form} attention ≥ {seconds * 1e3:.1f} ms at "
                              f"{total / seconds / 1e9:.0f} GFLOP/s")
        rows.append(row)
    best_rest = max(rate for _, rate in rates["rest"])
    for mode in modes:
        if floor.times[mode]:
            rest = rl.llama_rest_flops(work.length, layers=work.layers, batch=work.batch, mode=mode, **sizes)
            floor.note[mode] = (f"{rest / 1e9:.3g} GFLOP of projections, MLP and head: ≥ {_fmt(rest / best_rest)} "
                                f"at their best sgemm rate {best_rest / 1e9:.0f} GFLOP/s; measured "
                                f"{rest / statistics.median(floor.times[mode]) / 1e9:.0f} GFLOP/s")
    return rows


def table(work: Workload, variants: list[Variant], modes: list[str]) -> list[str]:
    """Markdown rows: per variant and mode the median, × inductor, × exact; first calls at the end; then the
    roofline rows' notes (what they count)."""
    medians = {(v.name, m): statistics.median(v.times[m]) for v in variants for m in modes if v.times[m]}
    medians.update({(v.name, m): t for v in variants for m, t in v.bound.items()})
    header = "| variant | " + " | ".join(f"{m} | × inductor | × exact" for m in modes) + " | first call (" + \
             ", ".join(modes) + ") |"
    lines = [f"**{work.model_name}**, T = {work.length}, batch {work.batch}", "", header,
             "|---|" + "---|---|---|" * len(modes) + "---|"]
    for v in variants:
        cells = []
        for m in modes:
            t = medians.get((v.name, m))
            if t is None:
                cells += [f"skipped ({v.skipped.get(m, '')})", "", ""]
                continue
            ind, exact = medians.get(("inductor", m)), medians.get(("softmax", m))
            cells += [_fmt(t), f"{ind / t:.2f}×" if ind else "", f"{exact / t:.2f}×" if exact else ""]
        first = ", ".join(f"{v.first_call[m]:.1f} s" if m in v.first_call else "–" for m in modes)
        lines.append(f"| {v.name} | " + " | ".join(cells) + f" | {first} |")
    notes = [f"- {v.name}, {m}: {v.note[m]}" for v in variants for m in modes if m in v.note]
    return lines + ([""] + notes if notes else [])


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def plot(path: str, results: list[dict], modes: list[str]) -> None:
    """Time vs T per variant, one panel per model and mode (models with a single length get points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(len(models), len(modes), figsize=(6 * len(modes), 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            points = [r for r in results if r["model"] == model and r["mode"] == mode and r["median_s"] is not None]
            for name in dict.fromkeys(r["variant"] for r in points):
                series = sorted((r["length"], r["median_s"]) for r in points if r["variant"] == name)
                ax.plot([t for t, _ in series], [s for _, s in series], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (tokens)")
            ax.set_ylabel("seconds (median)")
            ax.set_title(f"{model}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    import os

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = "?"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"commit {commit or '?'}, torch {torch.__version__}, {cpu}, {os.cpu_count()} CPU(s), "
            f"{torch.get_num_threads()} torch thread(s)")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama", help="comma-separated: llama, bert, vit (default: llama)")
    parser.add_argument("--lengths", default="1024,4096", help="Llama sequence lengths T (default: 1024,4096)")
    parser.add_argument("--bert-length", type=int, default=512)
    parser.add_argument("--vit-image", type=int, default=256, help="ViT image side in pixels (8x8 patches)")
    parser.add_argument("--kinds", default=None, help="comma-separated kinds (default: every kind that applies)")
    parser.add_argument("--baselines", default="eager,inductor",
                        help="comma-separated subset of eager,inductor,floor,roofline (floor: HF models with "
                             "attention replaced by 'return the values', compiled by inductor: the bound on every "
                             "kind; roofline, with floor: the floor plus exact / linear attention's FLOPs at this "
                             "machine's sgemm rate, the bound on any kernel of each)")
    parser.add_argument("--modes", default="infer,train", help="comma-separated subset of infer,train")
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="what compiles the rewritten graphs (default inductor; eager for a quick check)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--dense-gib", type=float, default=6.0, help="skip eager/inductor above this many GiB")
    parser.add_argument("--plot", default=None, help="write a PNG of time vs T per variant (matplotlib)")
    parser.add_argument("--json", default=None, help="write the raw results as JSON")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        parser.error(f"--modes takes {MODES}, got {args.modes!r}")
    baselines = [b for b in args.baselines.split(",") if b]
    if any(b not in BASELINES for b in baselines):
        parser.error(f"--baselines takes {BASELINES}, got {args.baselines!r}")
    if "roofline" in baselines and "floor" not in baselines:
        parser.error("--baselines roofline needs floor too: the bound is the floor's time plus the attention's")
    wanted = args.kinds.split(",") if args.kinds else None
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    builders: list[Callable[[], Workload]] = []
    for name in args.models.split(","):
        if name == "llama":
            builders += [lambda t=t: build_llama(t) for t in (int(x) for x in args.lengths.split(","))]
        elif name == "bert":
            builders.append(lambda: build_bert(args.bert_length))
        elif name == "vit":
            builders.append(lambda: build_vit(args.vit_image))
        else:
            parser.error(f"unknown model {name!r} (llama, bert, vit)")

    print(f"{machine()}; clock: {args.clock}; median of {args.repeats}; ratios: higher is faster")
    results = []
    # every variant recompiles the same forward code objects: allow it, static shapes per length, and fail
    # rather than silently time an uncompiled model past the limit
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096,
                                    fail_on_recompile_limit_hit=True, automatic_dynamic_shapes=False):
        for build in builders:
            torch.manual_seed(0)
            work = build()
            kinds = kinds_for(work.model_name, wanted)
            variants = bench_workload(work, kinds, modes, baselines, args.repeats, clock, args.dense_gib,
                                      args.compiler)
            if "roofline" in baselines:
                variants += roofline(work, variants, modes, clock)
            print("\n".join(table(work, variants, modes)) + "\n", flush=True)
            for v in variants:
                for m in modes:
                    results.append({"model": work.model_name, "length": work.length, "variant": v.name, "mode": m,
                                    "median_s": statistics.median(v.times[m]) if v.times[m] else v.bound.get(m),
                                    "note": v.note.get(m),
                                    "times_s": v.times[m], "first_call_s": v.first_call.get(m),
                                    "skipped": v.skipped.get(m)})
            torch._dynamo.reset()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "clock": args.clock, "results": results},
                                              indent=1))
    if args.plot:
        plot(args.plot, results, modes)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
