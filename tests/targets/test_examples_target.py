"""Each example runs end to end in its --smoke mode (a few steps) and reports its numbers."""

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_lm_smoke(capsys):
    result = _load("train_lm").main(["--smoke"])
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < result["initial_val_loss"]
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("train_lm: ")


@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_train_lm_smoke_with_a_rewritten_kind(kind, capsys):
    import attnrewrite

    before = {id(r) for r in attnrewrite.recent_reports()}  # the log keeps 64: compare identities
    result = _load("train_lm").main(["--smoke", "--attention", kind])
    assert result["attention"] == kind
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < result["initial_val_loss"]
    reports = [r for r in attnrewrite.recent_reports() if id(r) not in before]
    assert reports and all(r.to == kind and r.rewritten and not r.skipped for r in reports)
    assert f"attention={kind}" in capsys.readouterr().out.strip().splitlines()[-1]


def test_train_lm_saves_a_tiny_model_whose_positions_are_fewer_than_the_sample(tmp_path, capsys):
    # the tiny config holds 128 positions: the 120-byte sample after an 11-byte prompt must fit them,
    # and the checkpoint is written whatever sampling does
    path = tmp_path / "tiny.pt"
    train_lm = _load("train_lm")
    result = train_lm.main(["--config", "tiny", "--steps", "2", "--batch-size", "2", "--block-size", "16",
                            "--eval-batches", "1", "--warmup", "1", "--save", str(path)])
    model, info = train_lm.load_checkpoint(str(path))
    assert info["val_loss"] == result["val_loss"] and model.config.max_seq_len == 128
    assert "sample:" in capsys.readouterr().out


def test_train_lm_refuses_an_unknown_kind(capsys):
    with pytest.raises(SystemExit):
        _load("train_lm").main(["--smoke", "--attention", "quadratic"])
    assert "invalid choice" in capsys.readouterr().err


def test_train_singlecell_smoke(capsys):
    pytest.importorskip("anndata")
    pytest.importorskip("scanpy")
    result = _load("train_singlecell").main(["--smoke"])
    assert 0.0 <= result["knn_accuracy"] <= 1.0 and math.isfinite(result["held_out_masked_gene_loss"])
    assert result["pca_knn_accuracy"] > result["majority_accuracy"]   # the data carry cell-type signal
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("train_singlecell: ")


def test_finetune_minilm_smoke(capsys):
    result = _load("finetune_minilm").main(["--smoke"])
    assert result["parity_max_abs"] <= 1e-5
    assert result["before"]["paraphrase_cosine"] > result["before"]["unrelated_cosine"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("finetune_minilm: ")
