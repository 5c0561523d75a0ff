"""attnrewrite.targets.data: the offline data sets: determinism, splits, shapes, missing extras."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from attnrewrite.targets import data


def _fake_stdlib(root):
    (root / "json").mkdir(parents=True)
    (root / "json" / "__init__.py").write_text('"""JSON encoder."""\n\ndef dumps(o):\n    """Serialize o."""\n')
    (root / "abc.py").write_text('"""Abstract base classes."""\nclass ABC:\n    """Helper class."""\n')
    (root / "test").mkdir()
    (root / "test" / "test_abc.py").write_text('"""Tests are not corpus text."""\n')
    (root / "broken.py").write_text('"""Never seen."""\ndef (:\n')
    for i in range(30):   # enough modules that both splits get some
        (root / f"mod{i:02d}.py").write_text(f'"""Module number {i}."""\n')
    return root


def test_build_reads_docstrings_in_order_and_skips_tests_and_broken_files(tmp_path):
    train, val = data.build_text_corpus(_fake_stdlib(tmp_path))
    text = (train + val).decode()
    assert "Abstract base classes.\n\nHelper class." in text
    assert "JSON encoder.\n\nSerialize o." in text
    assert "Tests are not corpus text" not in text and "Never seen" not in text
    assert train and val
    assert data.build_text_corpus(tmp_path) == (train, val)


def test_a_python_without_sources_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no standard-library sources"):
        data.build_text_corpus(tmp_path)


def test_split_is_by_module_and_stable_when_modules_are_added(tmp_path):
    root = _fake_stdlib(tmp_path)
    _, val = data.build_text_corpus(root)
    (root / "zzz_new.py").write_text('"""A module added later."""\n')
    train_after, val_after = data.build_text_corpus(root)
    for i in range(30):
        line = f"Module number {i}.".encode()
        assert (line in val) == (line in val_after)
        assert (line in val_after) != (line in train_after)


def test_real_corpus_is_built_once_then_read_from_the_cache(monkeypatch):
    corpus = data.text_corpus()   # the session's private cache (see conftest)
    assert corpus.train.dtype == torch.uint8 and corpus.train.dim() == 1
    assert len(corpus.train) > 500_000 and len(corpus.val) > 50_000
    assert 0.03 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.2
    assert "Return" in data.TextCorpus.decode(corpus.train[:200_000])

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(data, "build_text_corpus", no_rebuild)
    cached = data.text_corpus()
    assert cached.sha256 == corpus.sha256 and torch.equal(cached.val, corpus.val)


def test_text_batches_are_shifted_windows():
    corpus = data.TextCorpus.encode("hello world, " * 20).to(torch.uint8)
    x, y = data.text_batch(corpus, batch_size=5, block_size=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert data.TextCorpus.decode(x[0]) in "hello world, " * 20
    with pytest.raises(ValueError, match="block_size"):
        data.text_batch(corpus[:10], batch_size=1, block_size=16)


def test_digits_split_is_fixed_stratified_and_disjoint():
    pytest.importorskip("sklearn")
    train, val = data.digits()
    assert train.images.shape[1:] == (1, 8, 8) and len(train.labels) + len(val.labels) == 1797
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    assert set(val.labels.tolist()) == set(range(10))
    again_train, again_val = data.digits()
    assert torch.equal(val.images, again_val.images) and torch.equal(train.labels, again_train.labels)


def test_stratified_split_takes_every_class():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 2 + [3])
    train, val = data.stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [10, 2, 1, 0]


def test_pbmc68k_reduced_loads_offline():
    pytest.importorskip("anndata")
    if importlib.util.find_spec("scanpy") is None:
        pytest.skip("scanpy (extra 'singlecell') is not installed")
    cells = data.pbmc68k_reduced()
    assert cells.expression.shape == (700, 765) and cells.expression.dtype == np.float32
    assert cells.expression.min() == 0.0
    assert len(cells.cell_type_names) == 10 and cells.cell_types.shape == (700,)
    assert set(cells.cell_types.tolist()) == set(range(10))
    assert len(cells.gene_names) == 765 and {"CD79A", "LYZ", "NKG7"} <= set(cells.gene_names)   # B, monocyte, NK markers


def test_missing_scanpy_names_the_extra(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scanpy" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"attnrewrite\[singlecell\]"):
        data.pbmc68k_reduced()


def test_missing_anndata_names_the_extra(monkeypatch):
    if importlib.util.find_spec("scanpy") is None:
        pytest.skip("needs scanpy's data file to reach the anndata import")
    monkeypatch.setitem(sys.modules, "anndata", None)   # makes `import anndata` raise ImportError
    with pytest.raises(ImportError, match=r"'anndata'.*attnrewrite\[singlecell\]"):
        data.pbmc68k_reduced()


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"attnrewrite\[vision\]"):
        data.digits()
