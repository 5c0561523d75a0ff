"""``python -m attnrewrite distill``: distil a shipped model into another attention kind and say how close it got.

- ``--model minilm``: the pretrained all-MiniLM-L6-v2; data: ``--corpus`` (default ``english``: half
  everyday-English grammar sentences, a quarter docstring sentences, a quarter word sentences; the
  same :func:`~attnrewrite.targets.sentences.distillation_sentences` as ``bench/distill_quality.py``); measured on the 100 held-out sentences of :mod:`attnrewrite.targets.sentences` (mean
  and min cosine of the sentence embeddings to the original model's), before and after.
- ``--checkpoint PATH``: a llama written by ``examples/train_lm.py --save``; data: byte windows of
  the docstring corpus's train split (KL to the original's logits); measured as validation loss
  (nats per byte) of the original, the rewritten model before and after.
"""

from __future__ import annotations

import argparse
import ast
import functools
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from attnrewrite.distill import TRAINABLE_OPTIONS, distill
from attnrewrite.rewriter.backend import attnrewrite_backend


def parse_options(pairs: list[str], to: str) -> dict[str, Any]:
    """``["feature_map=hedgehog", "top_k=32"]`` → a dict (values read as Python literals, else strings);
    none given: the options that give ``to`` learned per-site parameters."""
    if not pairs:
        hint = TRAINABLE_OPTIONS.get(to)
        pairs = [hint.replace("'", "")] if hint else []
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--option takes NAME=VALUE; got {pair!r}")
        try:
            options[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[name] = value
    return options


def check_arguments(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """Refuse, before any model is loaded, an unknown kind, an option the kind does not take (or a bad
    value), ``--transfer-loss weights`` for a kind without weights, and ``--corpus`` with a llama checkpoint (whose data is byte windows of the docstrings)."""
    from attnrewrite.rewriter.options import RewriteOptions

    from attnrewrite import kinds

    try:
        RewriteOptions.parse({"to": args.to, "compiler": "eager", **options})
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"attnrewrite distill: {exc}") from None
    if args.transfer_loss == "weights" and not callable(kinds.get(args.to).weights):
        raise SystemExit(f"attnrewrite distill: --transfer-loss weights needs attention weights, and kind "
                         f"{args.to!r} cannot compute them")
    if getattr(args, "corpus", None) is not None and not args.model:
        raise SystemExit("attnrewrite distill: --corpus chooses MiniLM's sentences (--model minilm); a --checkpoint "
                         "distils on byte windows of the docstring corpus")


def _compiled(model, to: str | None, options: dict[str, Any]):
    if to is None:
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend=functools.partial(
        attnrewrite_backend, options={"to": to, "compiler": "eager", **options}))


def _minilm(args, options) -> tuple[Any, list, Any]:
    from attnrewrite.demo import load_minilm, mean_pool
    from attnrewrite.targets.sentences import HELDOUT_SENTENCES, distillation_sentences

    tokenizer, model = load_minilm()
    model.eval()
    size = args.batch_size
    sentences = distillation_sentences(args.corpus or "english", size * args.batches, tokenizer.get_vocab())
    data = [dict(tokenizer(sentences[i:i + size], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")) for i in range(0, len(sentences), size)]
    held = dict(tokenizer(list(HELDOUT_SENTENCES), padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference = mean_pool(model(**held).last_hidden_state, held["attention_mask"])

    def measure(candidate, to):
        with torch.no_grad():
            got = mean_pool(_compiled(candidate, to, options)(**held).last_hidden_state, held["attention_mask"])
        torch._dynamo.reset()
        cos = F.cosine_similarity(got, reference, dim=-1)
        return f"held-out sentence embeddings: mean cosine {cos.mean():.4f}, min {cos.min():.4f}"

    return model, data, measure


def _llama(args, options) -> tuple[Any, list, Any]:
    from attnrewrite.targets.data import text_batch, text_corpus
    from attnrewrite.targets.llama import Llama, LlamaConfig

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model = Llama(LlamaConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    corpus = text_corpus()
    generator = torch.Generator().manual_seed(args.seed)
    data = [(text_batch(corpus.train, args.batch_size, args.block_size, generator)[0],) for _ in range(args.batches)]
    val_generator = torch.Generator().manual_seed(args.seed + 1)
    val = [text_batch(corpus.val, args.batch_size, args.block_size, val_generator) for _ in range(8)]

    def measure(candidate, to):
        run = _compiled(candidate, to, options)
        with torch.no_grad():
            loss = sum(F.cross_entropy(run(x).flatten(0, 1), y.flatten()).item() for x, y in val) / len(val)
        torch._dynamo.reset()
        return f"validation loss {loss:.4f} nats/byte ({loss / math.log(2):.3f} bits/byte)"

    return model, data, measure


def run_distill(args: argparse.Namespace) -> int:
    import copy

    import attnrewrite

    if args.threads:
        torch.set_num_threads(args.threads)
    options = parse_options(args.option, args.to)
    check_arguments(args, options)
    model, data, measure = (_minilm if args.model else _llama)(args, options)
    print(f"distil {'MiniLM' if args.model else args.checkpoint} → {args.to} {options}, stage {args.stage}, "
          f"{len(data)} batches of {args.batch_size}")
    print(f"  original:                {measure(model, None)}")
    before = attnrewrite.convert(copy.deepcopy(model), args.to, data[0],
                                 **options)
    print(f"  rewritten, not distilled: {measure(before, args.to)}")
    steps = {"transfer": args.transfer_steps, "finetune": args.finetune_steps}
    start = time.perf_counter()
    distilled = distill(model, args.to, data, steps=steps, lr=args.lr, stage=args.stage,
                        distill_seed=args.seed, save_to=args.save_to, loss="kl" if args.checkpoint else "auto",
                        rank=args.rank, adapt=args.adapt, schedule=args.schedule, match=args.match,
                        transfer_loss=args.transfer_loss, kind_options=options)
    seconds = time.perf_counter() - start
    print(f"  distilled ({seconds:.0f} s):    {measure(distilled, args.to)}")
    if args.out:
        torch.save({"to": args.to, "options": options, "state_dict": distilled.state_dict()}, args.out)
        print(f"saved {args.out} (convert a fresh model with these options, then load_state_dict)")
    return 0
