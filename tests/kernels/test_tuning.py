"""The tuning scheme: search spaces, lookup order, atomic tables, and every shipped table's schema."""

import importlib
import json

import pytest

from attnrewrite.kernels import tuning


def _space(**overrides):
    kwargs = dict(
        kernel="toy_fwd",
        axes={"BLOCK_M": (16, 32, 64), "num_warps": (2, 4)},
        default={"BLOCK_M": 16, "num_warps": 2},
        bucket=lambda shape: f"t{shape['T']}",
        valid=lambda cfg, shape: cfg["BLOCK_M"] <= shape["T"],
    )
    kwargs.update(overrides)
    return tuning.SearchSpace(**kwargs)


def test_space_enumerates_only_valid_points():
    space = _space()
    assert len(space.configs({"T": 1024})) == 6
    assert {c["BLOCK_M"] for c in space.configs({"T": 32})} == {16, 32}


def test_space_rejects_default_outside_axes():
    with pytest.raises(ValueError, match="outside"):
        _space(default={"BLOCK_M": 128, "num_warps": 2})
    with pytest.raises(ValueError, match="exactly the axes"):
        _space(default={"BLOCK_M": 16})


def test_choose_falls_back_to_default_on_cpu(monkeypatch):
    tuning._chosen.clear()
    calls = []
    cfg = tuning.choose("toykind", _space(), {"T": 64}, device="cpu", make_bench=lambda c: calls.append(c))
    assert cfg == {"BLOCK_M": 16, "num_warps": 2}
    assert calls == []  # never benchmarks without a GPU


def test_choose_prefers_table_entry(monkeypatch, tmp_path):
    tuning._chosen.clear()
    table = {"schema": 1, "kind": "toykind", "device": "cpu",
             "kernels": {"toy_fwd": {"t64": {"config": {"BLOCK_M": 64, "num_warps": 4}, "ms": 0.1}}}}
    monkeypatch.setattr(tuning, "load_table", lambda kind, dev: table)
    assert tuning.choose("toykind", _space(), {"T": 64}, device="cpu") == {"BLOCK_M": 64, "num_warps": 4}
    # an entry outside the space is ignored, not trusted
    tuning._chosen.clear()
    table["kernels"]["toy_fwd"]["t64"]["config"] = {"BLOCK_M": 48, "num_warps": 4}
    assert tuning.choose("toykind", _space(), {"T": 64}, device="cpu") == {"BLOCK_M": 16, "num_warps": 2}


def test_write_table_is_atomic_and_roundtrips(tmp_path):
    path = tmp_path / "sub" / "gpu.json"
    tuning.write_table(path, {"schema": 1, "kind": "k", "device": "d", "kernels": {}})
    assert json.loads(path.read_text())["kind"] == "k"
    assert [p.name for p in path.parent.iterdir()] == ["gpu.json"]  # no temporary file left behind


def test_validate_table_names_each_problem():
    space = _space()
    bad = {"schema": 2, "kind": "k", "kernels": {
        "toy_fwd": {"t64": {"config": {"BLOCK_M": 48, "num_warps": 4}}, "t32": {"ms": 1.0}},
        "other": {}}}
    errors = tuning.validate_table(bad, {"toy_fwd": space})
    text = "\n".join(errors)
    assert "schema" in text and "'device'" in text and "outside" in text
    assert "needs a 'config'" in text and "unknown kernel 'other'" in text


def test_tune_needs_a_gpu():
    if tuning.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        tuning.tune_kind("sigmoid")


@pytest.mark.parametrize("kind,path", list(tuning.iter_tables()) or [pytest.param(None, None, marks=pytest.mark.skip(reason="no tables shipped yet"))])
def test_shipped_tables_are_valid(kind, path):
    spaces = importlib.import_module(f"attnrewrite.kernels.{kind}.tune").SPACES
    table = json.loads(path.read_text())
    assert tuning.validate_table(table, spaces) == []
    assert table["kind"] == kind and path.stem == table["device"]


def test_lookup_never_times_and_never_memoises(monkeypatch):
    """lookup() serves traced calls: memo, then table, then default; a later choose() may still autotune."""
    tuning._chosen.clear()
    space = _space()
    monkeypatch.setattr(tuning, "load_table", lambda kind, dev: {"kernels": {}})
    assert tuning.lookup("toykind", space, {"T": 64}, device="cpu") == {"BLOCK_M": 16, "num_warps": 2}
    assert tuning._chosen == {}
    table = {"kernels": {"toy_fwd": {"t64": {"config": {"BLOCK_M": 32, "num_warps": 4}}}}}
    monkeypatch.setattr(tuning, "load_table", lambda kind, dev: table)
    assert tuning.lookup("toykind", space, {"T": 64}, device="cpu") == {"BLOCK_M": 32, "num_warps": 4}
    tuning._chosen[("toykind", "toy_fwd", "cpu", "t64")] = {"BLOCK_M": 64, "num_warps": 2}
    assert tuning.lookup("toykind", space, {"T": 64}, device="cpu") == {"BLOCK_M": 64, "num_warps": 2}
    tuning._chosen.clear()
