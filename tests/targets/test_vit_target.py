"""attnrewrite.targets.vit: shapes, gradients, compile, and that it learns the bundled digits."""

import pytest
import torch

from attnrewrite.targets.vit import ViT, ViTConfig


def test_tiny_forward_and_backward(check_gradients):
    model = ViT.from_name("tiny")
    images = torch.rand(4, 1, 8, 8)
    logits = model(images)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 5, 9])).backward()
    check_gradients(model)


def test_compiles_with_fullgraph():
    model = ViT.from_name("tiny").eval()
    images = torch.rand(3, 1, 8, 8)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images))


def test_learns_digits_well_above_chance():
    pytest.importorskip("sklearn")
    from attnrewrite.targets.data import digits

    train, val = digits()
    model = ViT.from_name("tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        batch = torch.randint(len(train.labels), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(train.images[batch]), train.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(val.images).argmax(-1) == val.labels).float().mean().item()
    assert accuracy > 0.6   # chance is 0.1; this run reaches about 0.88


def test_bad_inputs_raise_clear_errors():
    model = ViT.from_name("tiny")
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=10, patch_size=4)
