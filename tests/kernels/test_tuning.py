"""The tuning scheme: search spaces, lookup order, atomic tables, and every shipped table's schema."""

import contextvars
import importlib
import json
import os
import threading

import pytest
import torch

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


# --------------------------------------------------------------------------- pick_config and the autotune switch

GPU = torch.device("cuda", 0)  # only named: device_key is patched, nothing runs on it


@pytest.fixture
def gpu_without_table(monkeypatch):
    """choose() on a pretend GPU with no table: records whether it autotuned."""
    tuning._chosen.clear()
    searched = []

    def device_key(device=None):
        return "pretend-gpu" if device is not None and torch.device(device).type == "cuda" else "cpu"

    monkeypatch.setattr(tuning, "device_key", device_key)
    monkeypatch.setattr(tuning, "load_table", lambda kind, dev: {"kernels": {}})

    def autotune(space, shape, bench):
        searched.append(1)
        return {"BLOCK_M": 64, "num_warps": 4}, 0.1

    monkeypatch.setattr(tuning, "autotune", autotune)
    monkeypatch.delenv("ATTNREWRITE_AUTOTUNE", raising=False)
    yield searched
    tuning._chosen.clear()


def test_pick_config_order(gpu_without_table):
    space, shape, bench = _space(), {"T": 64}, lambda config: (lambda: None)
    forced = {"BLOCK_M": 32, "num_warps": 2}
    assert tuning.pick_config("toykind", space, shape, GPU, bench, config=forced) == forced
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        traced = mode.from_tensor(torch.ones(2))
    assert tuning.pick_config("toykind", space, shape, GPU, bench, tensors=(traced,)) == space.default
    assert gpu_without_table == [] and tuning._chosen == {}  # traced: nothing timed, nothing remembered
    searched = tuning.pick_config("toykind", space, shape, GPU, bench, tensors=(torch.ones(2),))
    assert searched == {"BLOCK_M": 64, "num_warps": 4}
    assert gpu_without_table == [1]
    assert tuning.pick_config("toykind", space, shape, torch.device("cpu"), bench) == space.default  # no search on CPU


def test_autotune_disabled_is_a_context_not_the_environment(gpu_without_table):
    space, bench = _space(), lambda config: (lambda: None)
    with tuning.autotune_disabled():
        assert not tuning.autotune_enabled()
        assert "ATTNREWRITE_AUTOTUNE" not in os.environ
        assert tuning.pick_config("toykind", space, {"T": 64}, GPU, bench) == space.default
        seen_by_another_thread = []
        worker = threading.Thread(target=lambda: seen_by_another_thread.append(tuning.autotune_enabled()))
        worker.start()
        worker.join()
        assert seen_by_another_thread == [True]  # a thread of its own keeps its own setting
    assert tuning.autotune_enabled() and gpu_without_table == []


def test_the_environment_variable_is_the_default(monkeypatch):
    monkeypatch.setenv("ATTNREWRITE_AUTOTUNE", "0")
    assert not tuning.autotune_enabled()
    monkeypatch.setenv("ATTNREWRITE_AUTOTUNE", "1")
    assert tuning.autotune_enabled()
    with tuning.autotune_disabled():
        assert not tuning.autotune_enabled()


def test_a_backward_on_autograds_device_thread_sees_the_callers_setting():
    """Autograd runs a CUDA backward on a thread of its own, with the caller's context stashed in
    torch's thread-local state; emulated here on a plain thread."""
    with tuning.autotune_disabled():
        caller = contextvars.copy_context()
    seen = []

    def device_thread():
        seen.append(tuning.autotune_enabled())
        torch._C._stash_obj_in_tls("context", caller)
        try:
            seen.append(tuning.autotune_enabled())
        finally:
            torch._C._remove_obj_from_tls("context")

    worker = threading.Thread(target=device_thread)
    worker.start()
    worker.join()
    assert seen == [True, False]


def test_a_backward_started_inside_the_block_sees_it():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(tuning.autotune_enabled())
            return grad

    x = torch.ones(3, requires_grad=True)
    with tuning.autotune_disabled():
        Probe.apply(x).sum().backward()
    Probe.apply(x).sum().backward()
    assert seen == [False, True]


# --------------------------------------------------------------------------- bad tables and ATTNREWRITE_TUNING_DIR


@pytest.fixture
def tuning_dir(monkeypatch, tmp_path):
    """A fresh ATTNREWRITE_TUNING_DIR with nothing cached or memoised."""
    monkeypatch.setenv("ATTNREWRITE_TUNING_DIR", str(tmp_path))
    tuning._load.cache_clear()
    tuning._chosen.clear()
    yield tmp_path
    tuning._load.cache_clear()
    tuning._chosen.clear()


def _sigmoid_fwd_entry():
    """(space, shape, bucket) of the sigmoid forward kernel for a small launch."""
    from attnrewrite.kernels.sigmoid import spaces

    space = spaces.SPACES[spaces.space_name("fwd", 16, 16)]
    q = torch.zeros(1, 2, 32, 16)
    shape = spaces.shape_of(q, q, q, False, 1)
    return space, shape, space.bucket(shape)


def _other_point(space, shape):
    """A valid configuration of ``space`` other than its default (so that a table's effect shows)."""
    return next(c for c in space.configs(shape) if c != dict(space.default))


def test_the_variable_selects_the_folder(tuning_dir):
    space, shape, bucket = _sigmoid_fwd_entry()
    config = _other_point(space, shape)
    table = {"schema": 1, "kind": "sigmoid", "device": "cpu", "kernels": {space.kernel: {bucket: {"config": config}}}}
    tuning.write_table(tuning_dir / "sigmoid" / "cpu.json", table)
    assert tuning.table_path("sigmoid", "cpu") == tuning_dir / "sigmoid" / "cpu.json"
    assert tuning.choose("sigmoid", space, shape, "cpu") == config


def test_without_the_variable_the_package_folder_is_read(monkeypatch):
    monkeypatch.delenv("ATTNREWRITE_TUNING_DIR", raising=False)
    assert tuning.table_path("sigmoid", "x") == tuning.KERNELS_DIR / "sigmoid" / "tuning" / "x.json"


BAD_TABLES = {
    "not json": ('{"schema": 1, "kernels": {', "is not valid JSON"),
    "a list": ("[1, 2]", "must be a JSON object, got list"),
    "schema 2": (json.dumps({"schema": 2, "kind": "sigmoid", "device": "cpu", "kernels": {}}), "schema is 2"),
    "kernels a list": (json.dumps({"schema": 1, "kind": "sigmoid", "device": "cpu", "kernels": []}),
                       "'kernels' must be an object"),
    "buckets a string": (json.dumps({"schema": 1, "kind": "sigmoid", "device": "cpu", "kernels": {"{k}": "x"}}),
                         "buckets must be an object"),
    "entry a number": (json.dumps({"schema": 1, "kind": "sigmoid", "device": "cpu", "kernels": {"{k}": {"{b}": 3}}}),
                       "needs a 'config'"),
    "config a list": (json.dumps({"schema": 1, "kind": "sigmoid", "device": "cpu",
                                  "kernels": {"{k}": {"{b}": {"config": [64, 4]}}}}), "'config' must be an object"),
    "config of strings": (json.dumps({"schema": 1, "kind": "sigmoid", "device": "cpu",
                                      "kernels": {"{k}": {"{b}": {"config": {"BLOCK_M": "64"}}}}}),
                          "'config' must be an object of integers"),
    "unknown kernel": (json.dumps({"schema": 1, "kind": "sigmoid", "device": "cpu", "kernels": {"nope": {}}}),
                       "unknown kernel 'nope'"),
}


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_a_bad_table_is_ignored_with_one_warning_and_the_launch_takes_the_default(tuning_dir, name):
    import warnings

    from attnrewrite.kernels.sigmoid.api import sigmoid_attention_dispatch

    space, shape, bucket = _sigmoid_fwd_entry()
    text, fault = BAD_TABLES[name]
    path = tuning_dir / "sigmoid" / "cpu.json"
    path.parent.mkdir()
    path.write_text(text.replace("{k}", space.kernel).replace("{b}", bucket))
    q = torch.randn(1, 2, 32, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuning.choose("sigmoid", space, shape, "cpu") == dict(space.default)
        for _ in range(2):  # real kernel launches (interpreted on the CPU) run on the default
            out = sigmoid_attention_dispatch(q, q, q, is_causal=True, impl="triton")
    ours = [w for w in caught if "tuning table" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert str(path) in str(ours[0].message) and fault in str(ours[0].message)
    torch.testing.assert_close(out, sigmoid_attention_dispatch(q, q, q, is_causal=True, impl="torch"),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("table", [
    None, 3, "text", [], [{"schema": 1}], {"schema": 1, "kind": 5, "device": [], "kernels": None},
    {"schema": 1, "kind": "k", "device": "d", "kernels": {"toy_fwd": [1]}},
    {"schema": 1, "kind": "k", "device": "d", "kernels": {"toy_fwd": {"t1": None}}},
    {"schema": 1, "kind": "k", "device": "d", "kernels": {"toy_fwd": {"t1": {"config": None}}}},
    {"schema": 1, "kind": "k", "device": "d", "kernels": {"toy_fwd": {"t1": {"config": {"BLOCK_M": [16]}}}}},
    {"schema": 1, "kind": "k", "device": "d", "kernels": {"toy_fwd": {"t1": {"config": {"BLOCK_M": True,
                                                                                       "num_warps": 2}}}}},
    {"schema": 1, "kind": "k", "device": "d", "kernels": {"toy_fwd": {"t1": {"config": {"BLOCK_M": 16, "num_warps": 2},
                                                                             "ms": "fast"}}}},
], ids=lambda t: type(t).__name__)
def test_validate_table_reports_malformed_input_instead_of_crashing(table):
    errors = tuning.validate_table(table, {"toy_fwd": _space()})
    assert errors and all(isinstance(e, str) for e in errors)
    assert tuning.validate_table(table) != []  # the structure alone (no spaces): still an answer


def test_a_sound_table_validates_with_and_without_spaces():
    table = {"schema": 1, "kind": "k", "device": "d",
             "kernels": {"toy_fwd": {"t64": {"config": {"BLOCK_M": 64, "num_warps": 4}, "ms": 0.5}}}}
    assert tuning.validate_table(table, {"toy_fwd": _space()}) == []
    assert tuning.validate_table(table) == []
