"""Train the Llama reference model on a byte-level corpus of Python's standard-library docstrings.

Runs on the CPU; the default run takes a few minutes on 2 cores and reports the validation loss
(nats per byte), bits per byte and perplexity, then samples a continuation with the KV cache.

    python examples/train_lm.py               # full run
    python examples/train_lm.py --smoke       # a few steps, seconds (CI)

``--attention sigmoid`` or ``--attention linear`` trains the same model with its attention
rewritten by attnrewrite (``strict``: the run stops if any site could not be rewritten).

    python examples/train_lm.py --attention sigmoid
    python examples/train_lm.py --attention linear     # elu+1 features (--feature-map relu ...)
    python examples/train_lm.py --attention sliding_window --window 64   # the last 64 bytes (+ --sinks)

``--context-parallel N`` shards each training sequence over N processes (context parallelism, gloo on the
CPU): launch it with ``torchrun``; every rank draws the same batch, keeps its load-balanced shard of the
sequence (RoPE at the tokens' global positions) and its attention goes round the ring
(:mod:`attnrewrite.distributed`); the loss curve is one process's.

    torchrun --nproc-per-node 2 examples/train_lm.py --smoke --context-parallel 2
    torchrun --nproc-per-node 2 examples/train_lm.py --context-parallel 2 --attention sigmoid
    torchrun --nproc-per-node 2 examples/train_lm.py --context-parallel 2 --attention sigmoid --option learned=true

Kinds with learned per-site states (``--option learned=true``, ``summary=learned``, ``hash=learned``,
``--feature-map``'s hedgehog through ``--option feature_map=hedgehog``) are converted first in both runs; under
``--context-parallel`` each layer calls :func:`attnrewrite.converted_attention` with its state.

``--save PATH`` writes the trained model (config and weights) for later use, e.g. by
``bench/quality_decode_kinds.py``; :func:`load_checkpoint` reads it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attnrewrite import kinds
from attnrewrite.targets.data import text_batch, text_corpus
from attnrewrite.targets.llama import CONFIGS, Attention, Llama, LlamaConfig, apply_rope

ATTENTION_KINDS = tuple(kinds.names())  # every registered kind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="char", choices=sorted(CONFIGS), help="Llama config (default: char)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (default: 400)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128, help="bytes per training window")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay to 10%%)")
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    parser.add_argument("--eval-batches", type=int, default=40, help="validation windows / batch size")
    parser.add_argument("--attention", default="softmax", choices=ATTENTION_KINDS,
                        help="attention kind: softmax (the model as written) or a kind it is rewritten to")
    parser.add_argument("--feature-map", default="elu", choices=("elu", "relu"),
                        help="feature map of --attention linear (default: elu)")
    parser.add_argument("--window", type=int, default=64, help="keys per query of --attention sliding_window")
    parser.add_argument("--sinks", type=int, default=0, help="first tokens every query also sees (sliding_window)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="another option of the kind (repeatable), e.g. --option summary=learned --option "
                             "chunk_size=16; kinds with per-site parameters are converted first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (seconds)")
    parser.add_argument("--save", default=None, metavar="PATH",
                        help="write the trained model here (torch.save of its config and weights)")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                        help="shard each sequence over N processes (launch with torchrun --nproc-per-node N; "
                             "gloo on the CPU); --block-size must be divisible by 2N")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the result (with the per-step training losses) here as JSON")
    return parser


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: Llama, data: torch.Tensor, batches: int, batch_size: int, block_size: int) -> float:
    """Mean next-byte cross-entropy (nats) over fixed windows of ``data`` (same windows every call)."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        x, y = text_batch(data, batch_size, block_size, generator)
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train()
    return total / batches


@torch.no_grad()
def generate_without_cache(model: Llama, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float,
                           top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Sample by running the whole sequence each step (no KV cache): [B, T0] -> [B, T0 + new]."""
    tokens = prompt
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.config.max_seq_len:])[:, -1] / temperature
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens


def save_checkpoint(model: Llama, path: str, **info) -> None:
    """Write ``model``'s config and weights (the base model's names, without attnrewrite states) to ``path``."""
    weights = {name: t for name, t in model.state_dict().items() if "attnrewrite_" not in name}
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": weights, **info}, path)


def load_checkpoint(path: str) -> tuple[Llama, dict]:
    """(model in eval mode, the checkpoint's other entries) from a file written by ``--save``."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = Llama(LlamaConfig(**checkpoint.pop("config")))
    model.load_state_dict(checkpoint.pop("state_dict"))
    return model.eval(), checkpoint


class ContextParallelAttention(Attention):
    """The Llama attention, calling the attention op of ``kind`` instead of its hand-written softmax.

    Inside :func:`attnrewrite.distributed.context_parallel` the op computes this rank's rows of causal
    attention over the whole sequence.  A compiled rewrite cannot run there, so under
    ``--context-parallel`` each layer's attention becomes this class (same weights, same names) and
    calls the op the rewrite would have put in its place: SDPA for softmax, else the kind's op with the
    run's options, through :func:`attnrewrite.converted_attention` (a converted model's learned states,
    attached to this module, reach the op as the rewrite passes them).  Decoding with the KV cache (``input_pos``) keeps the hand-written path.
    """

    kind: str = "softmax"
    options: dict = {}
    #: causal by itself (``is_causal=True`` on the global positions): the model need not build its [T, T]
    #: mask for a whole sequence given by ``positions`` (decoding with the cache still reads it)
    reads_mask: bool = False

    def forward(self, x, cos, sin, mask, input_pos=None):
        if input_pos is not None:
            return super().forward(x, cos, sin, mask, input_pos)
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        common = dict(is_causal=True, scale=self.head_dim ** -0.5, enable_gqa=True)
        if self.kind == "softmax":
            out = F.scaled_dot_product_attention(q, k, v, **common)
        else:  # the op the rewrite emits, with this layer's per-site states when the model was converted
            import attnrewrite

            out = attnrewrite.converted_attention(self, q, k, v, self.kind, **common, **self.options)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def use_op_attention(model: Llama, kind: str, options: dict) -> None:
    """Make every layer's attention a :class:`ContextParallelAttention` of ``kind`` (in place, same weights)."""
    cls = type(f"ContextParallelAttention_{kind}", (ContextParallelAttention,), {"kind": kind, "options": options})
    for layer in model.layers:
        layer.attention.__class__ = cls


def setup_context_parallel(args: argparse.Namespace):
    """(mesh, rank) of the ``--context-parallel`` run, or a clear error when launched without torchrun."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.context_parallel:
        raise SystemExit(f"train_lm: --context-parallel {args.context_parallel} needs {args.context_parallel} "
                         f"processes (WORLD_SIZE is {world}): launch with "
                         f"torchrun --nproc-per-node {args.context_parallel} examples/train_lm.py ...")
    if args.block_size % (2 * world):
        raise SystemExit(f"train_lm: --block-size {args.block_size} is not divisible by 2 x --context-parallel = "
                         f"{2 * world} (the load-balanced layout cuts each sequence into {2 * world} equal chunks)")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return init_device_mesh("cpu", (world,)), dist.get_rank()


def kind_options(args: argparse.Namespace) -> dict:
    """The options of ``--attention`` (its flags and ``--option NAME=VALUE``)."""
    if args.attention == "linear":
        options = {"feature_map": args.feature_map}
    elif args.attention == "sliding_window":
        options = {"window": args.window, "sinks": args.sinks}
    elif args.attention == "sigmoid":  # b = -log(n) at the training length, one number for every query (as
        # measured in bench/RESULTS.md); bias="auto" would give each causal query its own b = -log(i + 1)
        options = {"bias": -math.log(args.block_size)}
    else:
        options = {}
    for pair in args.option:
        name, _, value = pair.partition("=")
        options[name] = int(value) if value.lstrip("-").isdigit() else {"true": True, "false": False}.get(
            value.lower(), value)
    return options


def context_parallel_step(model: Llama, mesh, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one batch with the sequence sharded over ``mesh``; returns the whole
    batch's mean loss and leaves the whole batch's gradients in every rank's parameters."""
    import torch.distributed as dist

    from attnrewrite.distributed import context_parallel

    # the manager shards its buffers in place: x and y are views of one batch, give it copies
    x, y, positions = x.contiguous().clone(), y.contiguous().clone(), torch.arange(x.shape[1])
    with context_parallel(mesh, buffers=[x, y, positions], buffer_seq_dims=[1, 1, 0]):
        logits = model(x, positions=positions)   # x, y, positions: this rank's shard, in place
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / (y.numel() * mesh.size())
        loss.backward()
    for p in model.parameters():  # each rank holds its tokens' share of every gradient
        if p.grad is not None:
            dist.all_reduce(p.grad, group=mesh.get_group())
    loss = loss.detach()
    dist.all_reduce(loss, group=mesh.get_group())
    return loss


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.context_parallel < 1:
        build_parser().error("--context-parallel must be at least 1")
    # Past its recompile limit Dynamo would silently run the original code — softmax, not the kind
    # the model is trained with: make that an error for this run (and only for this run).
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=args.attention != "softmax"):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    if args.smoke:
        args.config, args.steps, args.batch_size, args.block_size = "tiny", 6, 4, 32
        args.warmup, args.eval_batches = 2, 2
    mesh, rank = setup_context_parallel(args) if args.context_parallel > 1 else (None, 0)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, started_cpu = time.perf_counter(), time.process_time()

    corpus = text_corpus()
    config: LlamaConfig = LlamaConfig.from_name(args.config)
    if args.block_size > config.max_seq_len:
        build_parser().error(f"--block-size {args.block_size} exceeds the config's max_seq_len {config.max_seq_len}")
    model = Llama(config)
    if args.attention != "softmax":
        import attnrewrite

        options = kind_options(args)
        if args.option and kinds.get(args.attention).make_state is not None:  # maybe per-site parameters
            example = text_batch(corpus.train, 2, args.block_size, torch.Generator().manual_seed(args.seed))[0]
            attnrewrite.convert(model, args.attention, (example,), **options)
        if mesh is None:
            attnrewrite.rewrite(model, to=args.attention, compiler="eager", strict=True, **options)
    if mesh is not None:  # the ops called eagerly, the converted states with them (a compiled graph cannot
        # run inside the context-parallel manager)
        use_op_attention(model, args.attention, options if args.attention != "softmax" else {})
    n_params = sum(p.numel() for p in model.parameters())
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"corpus: {corpus.source}: {len(corpus.train):,} train / {len(corpus.val):,} validation bytes")
    say(f"model: llama/{args.config}, {n_params:,} parameters, attention={args.attention}"
        + (f", context parallel over {args.context_parallel} processes" if mesh is not None else ""))

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    initial_val = evaluate(model, corpus.val, args.eval_batches, args.batch_size, args.block_size)
    progress = tqdm(range(args.steps), desc="train_lm", unit="step", disable=rank != 0)
    losses = []
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        x, y = text_batch(corpus.train, args.batch_size, args.block_size, generator)
        optimizer.zero_grad(set_to_none=True)
        if mesh is None:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
        else:
            loss = context_parallel_step(model, mesh, x, y)
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - started

    val_loss = evaluate(model, corpus.val, args.eval_batches, args.batch_size, args.block_size)
    if args.save and rank == 0:
        save_checkpoint(model, args.save, attention=args.attention, block_size=args.block_size, steps=args.steps,
                        seed=args.seed, val_loss=val_loss)
        say(f"saved {args.save}")
    model.eval()
    prompt = corpus.encode("Return the ")[None]
    # the cached decode holds at most max_seq_len tokens (the tiny config's 128 is less than prompt + 120)
    new_tokens = min(16 if args.smoke else 120, config.max_seq_len - prompt.shape[1])
    if args.attention == "softmax":
        sample = model.generate(prompt, max_new_tokens=new_tokens, temperature=0.8, top_k=40,
                                generator=torch.Generator().manual_seed(args.seed))
    else:  # stay in the trained kind: the cached decode path is a different graph
        sample = generate_without_cache(model, prompt, new_tokens, temperature=0.8, top_k=40,
                                        generator=torch.Generator().manual_seed(args.seed))
    say("sample:", repr(corpus.decode(sample[0])))

    result = {
        "config": args.config, "attention": args.attention, "steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.block_size,
        "initial_val_loss": initial_val, "val_loss": val_loss, "val_bits_per_byte": val_loss / math.log(2),
        "val_perplexity": math.exp(val_loss), "train_loss": loss.item(),
        "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - started_cpu,
        "train_s": train_seconds, "train_losses": losses, "context_parallel": args.context_parallel,
        # the learned per-site states of a converted model, after training (flattened; {} when there are none)
        "learned_states": {name: p.detach().flatten().tolist() for name, p in model.named_parameters()
                           if "attnrewrite_" in name},
    }
    kind = f"{args.attention}(window={args.window}, sinks={args.sinks})" if args.attention == "sliding_window" \
        else args.attention
    say(f"train_lm: llama/{args.config} attention={kind} steps={args.steps} "
          f"val_loss={val_loss:.4f} nats/byte ({result['val_bits_per_byte']:.3f} bits/byte) "
          f"val_ppl={result['val_perplexity']:.3f} (untrained {math.exp(initial_val):.1f}) "
          f"wall={result['wall_s']:.0f}s cpu={result['cpu_s']:.0f}s")
    if args.json and rank == 0:
        import json

        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if mesh is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
