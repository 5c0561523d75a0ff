"""Pretrain the single-cell reference model (masked-gene objective) on scanpy's bundled PBMC cells,
then score how well its pooled cell embeddings separate the 10 annotated cell types.

Cells are split per cell type into pretraining cells (80%) and held-out cells (20%). The score is
the accuracy of a k-nearest-neighbour classifier (cosine distance) that labels each held-out
cell from the pretraining cells' embeddings, next to three references: always guessing the
most common type, the same encoder before pretraining, and k-NN on a 50-component PCA of the
expression itself. Needs the extra ``singlecell`` (scanpy, anndata).

    python examples/train_singlecell.py           # full run, a few minutes on 2 CPU cores
    python examples/train_singlecell.py --smoke   # seconds (CI)
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from attnrewrite.targets.data import pbmc68k_reduced, stratified_split
from attnrewrite.targets.singlecell import (
    CellEncoder, GeneTokenizer, SingleCellConfig, masked_gene_loss, pad_cells)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    parser.add_argument("--batch-size", type=int, default=32, help="cells per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay to 10%%)")
    parser.add_argument("--mask-prob", type=float, default=0.15, help="share of each cell's genes to hide")
    parser.add_argument("--neighbours", type=int, default=5, help="k of the k-NN score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    parser.add_argument("--smoke", action="store_true", help="a small model, a few steps (seconds)")
    return parser


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _knn_scores(train_x, train_y, test_x, test_y, k: int) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of a cosine k-NN classifier."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
    predicted = classifier.predict(test_x)
    return float((predicted == test_y).mean()), float(balanced_accuracy_score(test_y, predicted))


@torch.no_grad()
def embed_cells(model: CellEncoder, cells: list[torch.Tensor], batch_size: int = 64) -> np.ndarray:
    """Pooled embeddings [N, C] (float32 numpy) of token lists, in eval mode."""
    was_training = model.training
    model.eval()
    chunks = [model.cell_embedding(pad_cells(cells[i:i + batch_size])) for i in range(0, len(cells), batch_size)]
    model.train(was_training)
    return torch.cat(chunks).numpy()


@torch.no_grad()
def held_out_loss(model: CellEncoder, cells: list[torch.Tensor], mask_prob: float, batch_size: int = 64) -> float:
    """Masked-gene loss over held-out cells with fixed masks (same every call)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(99)
    losses = [masked_gene_loss(model, pad_cells(cells[i:i + batch_size]), mask_prob, generator).item()
              for i in range(0, len(cells), batch_size)]
    model.train(was_training)
    return float(np.mean(losses))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = SingleCellConfig.from_name("pbmc")
    if args.smoke:
        config = SingleCellConfig.from_name("pbmc", dim=32, n_layers=1, n_heads=2, mlp_dim=64, max_len=64)
        args.steps, args.batch_size = 4, 16
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, started_cpu = time.perf_counter(), time.process_time()

    data = pbmc68k_reduced()
    train_idx, test_idx = stratified_split(data.cell_types, 0.2, seed=args.seed)
    tokenizer = GeneTokenizer.fit(data.expression[train_idx], max_len=config.max_len)
    train_cells, test_cells = tokenizer(data.expression[train_idx]), tokenizer(data.expression[test_idx])
    train_y, test_y = data.cell_types[train_idx], data.cell_types[test_idx]
    lengths = [len(c) for c in train_cells]
    print(f"data: pbmc68k_reduced, {len(train_idx)} pretraining / {len(test_idx)} held-out cells, "
          f"{len(data.gene_names)} genes, {len(data.cell_type_names)} cell types; "
          f"genes per cell {min(lengths)}-{max(lengths)}")

    model = CellEncoder(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {config.n_layers} layers, "
          f"width {config.dim}")
    untrained_acc, untrained_bal = _knn_scores(embed_cells(model, train_cells), train_y,
                                               embed_cells(model, test_cells), test_y, args.neighbours)
    initial_loss = held_out_loss(model, test_cells, args.mask_prob)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_cells), generator=generator).tolist()
    cursor = 0
    warmup = max(1, args.steps // 20)
    progress = tqdm(range(args.steps), desc="train_singlecell", unit="step")
    for step in progress:
        if cursor + args.batch_size > len(order):   # next epoch
            order, cursor = torch.randperm(len(train_cells), generator=generator).tolist(), 0
        batch = pad_cells([train_cells[i] for i in order[cursor:cursor + args.batch_size]])
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup)
        loss = masked_gene_loss(model, batch, args.mask_prob, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", genes=batch.shape[1])

    final_loss = held_out_loss(model, test_cells, args.mask_prob)
    knn_acc, knn_bal = _knn_scores(embed_cells(model, train_cells), train_y,
                                   embed_cells(model, test_cells), test_y, args.neighbours)

    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(50, len(train_idx) - 1), random_state=0).fit(data.expression[train_idx])
    pca_acc, pca_bal = _knn_scores(pca.transform(data.expression[train_idx]), train_y,
                                   pca.transform(data.expression[test_idx]), test_y, args.neighbours)
    majority = float((test_y == np.bincount(train_y).argmax()).mean())

    result = {
        "steps": args.steps, "held_out_masked_gene_loss": final_loss, "initial_masked_gene_loss": initial_loss,
        "chance_loss": math.log(config.n_genes), "knn_accuracy": knn_acc, "knn_balanced_accuracy": knn_bal,
        "untrained_knn_accuracy": untrained_acc, "untrained_knn_balanced_accuracy": untrained_bal,
        "pca_knn_accuracy": pca_acc, "pca_knn_balanced_accuracy": pca_bal, "majority_accuracy": majority,
        "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - started_cpu,
    }
    print(f"held-out masked-gene loss {initial_loss:.3f} -> {final_loss:.3f} (uniform guess {math.log(config.n_genes):.3f})")
    print(f"held-out {args.neighbours}-NN accuracy / balanced: pretrained {knn_acc:.3f} / {knn_bal:.3f}, "
          f"untrained {untrained_acc:.3f} / {untrained_bal:.3f}, expression PCA-50 {pca_acc:.3f} / {pca_bal:.3f}, "
          f"majority class {majority:.3f}")
    print(f"train_singlecell: steps={args.steps} knn_accuracy={knn_acc:.3f} (untrained {untrained_acc:.3f}, "
          f"PCA {pca_acc:.3f}) masked_gene_loss={final_loss:.3f} "
          f"wall={result['wall_s']:.0f}s cpu={result['cpu_s']:.0f}s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
