"""attnrewrite.targets.singlecell: rank-value tokens, padding, masked-gene objective, compile."""

import numpy as np
import pytest
import torch

from attnrewrite.targets.singlecell import (
    MASK_ID, N_SPECIAL_TOKENS, PAD_ID, CellEncoder, GeneTokenizer, SingleCellConfig, mask_genes,
    masked_gene_loss, pad_cells)


def test_tokenizer_ranks_expressed_genes_by_median_scaled_expression():
    expression = np.array([[4.0, 0.0, 1.0, 2.0],
                           [2.0, 3.0, 0.0, 1.0],
                           [0.0, 0.0, 0.0, 5.0]])
    tokenizer = GeneTokenizer.fit(expression, max_len=10)
    # Medians over expressing cells: gene0 3, gene1 3, gene2 1, gene3 2.
    np.testing.assert_allclose(tokenizer.gene_scale, [3.0, 3.0, 1.0, 2.0])
    cells = tokenizer(expression)
    # Cell 0 scaled: 4/3, -, 1, 1 -> gene0, then genes 2 and 3 tie and keep gene order.
    assert cells[0].tolist() == [g + N_SPECIAL_TOKENS for g in (0, 2, 3)]
    assert cells[1].tolist() == [g + N_SPECIAL_TOKENS for g in (1, 0, 3)]
    assert cells[2].tolist() == [3 + N_SPECIAL_TOKENS]
    assert [len(c) for c in GeneTokenizer(tokenizer.gene_scale, max_len=2)(expression)] == [2, 2, 1]


def test_pad_cells_pads_to_the_longest_cell():
    tokens = pad_cells([torch.tensor([5, 6, 7]), torch.tensor([9])])
    assert tokens.tolist() == [[5, 6, 7], [9, PAD_ID, PAD_ID]]


def test_tiny_forward_and_backward(check_gradients):
    model = CellEncoder.from_name("tiny")
    tokens = pad_cells([torch.randint(2, 66, (n,)) for n in (30, 12, 21)])
    loss = masked_gene_loss(model, tokens, mask_prob=0.3, generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    check_gradients(model)


def test_masked_gene_loss_is_cross_entropy_over_the_hidden_genes():
    model = CellEncoder.from_name("tiny").eval()
    tokens = pad_cells([torch.randint(2, 66, (n,)) for n in (30, 12)])
    loss = masked_gene_loss(model, tokens, 0.3, torch.Generator().manual_seed(5))
    inputs, labels = mask_genes(tokens, 0.3, torch.Generator().manual_seed(5))
    expected = torch.nn.functional.cross_entropy(model.gene_logits(inputs).flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, expected)


def test_cell_embedding_ignores_padding():
    model = CellEncoder.from_name("tiny").eval()
    short, long = torch.randint(2, 66, (9,)), torch.randint(2, 66, (40,))
    with torch.no_grad():
        alone = model.cell_embedding(short[None])
        batched = model.cell_embedding(pad_cells([short, long]))
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-6)
    assert batched.shape == (2, 32)


def test_mask_genes_hides_only_genes_and_labels_them():
    tokens = pad_cells([torch.randint(2, 66, (n,)) for n in (50, 3, 20)])
    inputs, labels = mask_genes(tokens, mask_prob=0.2, generator=torch.Generator().manual_seed(1))
    hidden = inputs == MASK_ID
    assert torch.equal(hidden, labels != -100)
    assert torch.equal(labels[hidden], tokens[hidden])
    assert not (hidden & (tokens == PAD_ID)).any()
    assert hidden.sum(dim=1).min() >= 1            # every cell contributes to the loss
    assert torch.equal(inputs[~hidden], tokens[~hidden])


def test_compiles_with_fullgraph():
    model = CellEncoder.from_name("tiny").eval()
    tokens = pad_cells([torch.randint(2, 66, (n,)) for n in (17, 33)])
    compiled = torch.compile(model.cell_embedding, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model.cell_embedding(tokens))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="non-negative"):
        GeneTokenizer.fit(np.array([[1.0, -1.0]]), max_len=4)
    tokenizer = GeneTokenizer(np.ones(3), max_len=4)
    with pytest.raises(ValueError, match=r"\[cells, 3\]"):
        tokenizer(np.ones((2, 5)))
    model = CellEncoder(SingleCellConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.full((1, 65), 5))
