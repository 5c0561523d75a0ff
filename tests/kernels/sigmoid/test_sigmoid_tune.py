"""The sigmoid kind's tuning declarations: spaces, buckets, fitting, workloads, and that the kernels
compile for a Hopper GPU (sm_90) on this CPU-only machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnrewrite.kernels import tuning
from attnrewrite.kernels.sigmoid import spaces, tune

REPO = Path(__file__).resolve().parents[3]


def _shape(**changes):
    shape = {"D": 128, "DV": 128, "Tq": 4096, "Tk": 4096, "causal": 0, "mask": 0, "dtype": "16bit"}
    shape.update(changes)
    return shape


def test_one_space_per_kernel_and_head_class():
    assert set(spaces.SPACES) == {f"{k}_d{h}" for k in spaces.KERNELS for h in spaces.HEAD_CLASSES}
    for name, space in spaces.SPACES.items():
        assert space.kernel == name
        head = int(name.rsplit("_d", 1)[1])
        assert space.configs(_shape(D=head, DV=head)), f"{name}: no valid point at T = 4096"


@pytest.mark.parametrize("name", list(spaces.SPACES))
def test_defaults_fit_a_hopper_sm_for_16_bit_inputs(name):
    head = int(name.rsplit("_d", 1)[1])
    space = spaces.SPACES[name]
    assert space.valid(dict(space.default), _shape(D=head, DV=head))


@pytest.mark.parametrize("dtype", ["16bit", "fp32"])
@pytest.mark.parametrize("lengths", [(1, 4096), (8, 8), (100, 300), (16384, 16384)])
@pytest.mark.parametrize("mask", [0, 1])
def test_fit_always_returns_a_point_of_the_space(dtype, lengths, mask):
    for name, space in spaces.SPACES.items():
        head = int(name.rsplit("_d", 1)[1])
        shape = _shape(D=head, DV=head, Tq=lengths[0], Tk=lengths[1], dtype=dtype, mask=mask)
        config = spaces.fit(space, space.default, shape)
        assert space.contains(config), f"{name} {shape}: {config}"
        smem, _ = spaces.resources(name.rsplit("_d", 1)[0], config, shape)
        if space.configs(shape):
            assert space.valid(config, shape)
        assert smem <= spaces.SMEM_BYTES or not space.configs(shape)


def test_fit_keeps_a_valid_config_and_shrinks_for_float32():
    space = spaces.SPACES["fwd_d128"]
    assert spaces.fit(space, space.default, _shape()) == dict(space.default)
    shrunk = spaces.fit(space, space.default, _shape(dtype="fp32"))
    assert shrunk != dict(space.default) and space.valid(shrunk, _shape(dtype="fp32"))
    decode = spaces.fit(space, space.default, _shape(Tq=1))
    assert decode["BLOCK_M"] == 16


def test_buckets_separate_what_changes_the_best_config():
    names = {spaces.bucket(_shape(**c)) for c in (
        {}, {"Tq": 1}, {"causal": 1}, {"mask": 1}, {"dtype": "fp32"}, {"D": 64, "DV": 64}, {"Tk": 100000})}
    assert len(names) == 7
    assert spaces.bucket(_shape(Tq=3000)) == spaces.bucket(_shape(Tq=4096))


def test_head_class_rejects_too_large_head_dims():
    assert spaces.head_class(80, 96) == 128
    with pytest.raises(ValueError, match="up to 256"):
        spaces.head_class(512, 64)


def test_workloads_declare_known_spaces_without_allocating():
    for quick in (True, False):
        workloads = list(tune.workloads(quick=quick))
        assert workloads
        for w in workloads:
            assert isinstance(w, tuning.Workload) and w.space is spaces.SPACES[w.space.kernel]
            assert w.space.configs(w.shape), f"{w.space.kernel} {w.shape}: nothing to time"
    assert len(list(tune.workloads(quick=True))) < len(list(tune.workloads(quick=False)))


@pytest.mark.slow
def test_default_kernels_compile_for_hopper():
    """The interpreter accepts code the GPU compiler rejects; compile the real kernels for sm_90
    (TTIR -> PTX -> cubin with the ptxas in Triton's wheel) and check for wgmma and no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, str(REPO / "bench" / "sigmoid_aot.py"), "--heads", "128"],
                            capture_output=True, text=True, env=env, timeout=600)
    if "No such file" in result.stderr and "ptxas" in result.stderr:
        pytest.skip("this Triton install carries no ptxas")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| fwd") or line.startswith("| bwd")]
    assert len(rows) == 6  # three kernels, causal and not
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[5] == "0", f"spills: {row}"
        assert cells[9] == "True", f"no wgmma: {row}"
