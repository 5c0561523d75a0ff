"""Per-GPU kernel tuning as data.

Each Triton kernel declares its search space in code (:class:`SearchSpace`).
Which point of that space to use on a given GPU and shape is data: a JSON table
``attnrewrite/kernels/<kind>/tuning/<device>.json`` written by
``python -m attnrewrite tune --kind <kind>``.  At launch time the lookup is

    table entry for (device, kernel, shape bucket)
      -> autotune over the declared space (GPU only, once per bucket and process)
      -> the space's safe default

and the choice, with where it came from, is logged at debug level.  :func:`pick_config` is that
lookup for one launch, as every kind's kernels call it; :func:`autotune_disabled` turns the timed
search off for a block of code (the environment variable ``ATTNREWRITE_AUTOTUNE=0`` for a process).

Tables are read from the package (``kernels/<kind>/tuning/<device>.json``) or, when the environment
variable ``ATTNREWRITE_TUNING_DIR`` names a folder, from ``$ATTNREWRITE_TUNING_DIR/<kind>/<device>.json``
instead (as flash-linear-attention's ``FLA_CONFIG_DIR``: tune into a folder of your own, or point a
deployment at one); ``tune`` writes there too.  A table that cannot be read, is not JSON, has another
schema version or does not fit the declared spaces is ignored as a whole with one warning naming
the file and the fault, and its kernels launch with the configuration they would have without it.

Table format (``schema`` 1)::

    {"schema": 1, "kind": "sigmoid", "device": "nvidia-h100-80gb-hbm3",
     "torch": "2.11.0", "triton": "3.6.0", "created": "2026-11-27T12:00:00Z",
     "kernels": {"sigmoid_fwd": {"d128-t8192-causal0-bf16":
                                  {"config": {"BLOCK_M": 128, ...}, "ms": 0.41}}}}
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import functools
import importlib
import itertools
import json
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KERNELS_DIR = Path(__file__).resolve().parent

Config = dict[str, int]
Shape = Mapping[str, Any]


@dataclass(frozen=True)
class SearchSpace:
    """The configurations one kernel may be launched with.

    Args:
        kernel: unique kernel name within its kind, e.g. ``"sigmoid_fwd"``.
        axes: each tunable parameter and the values it may take, e.g.
            ``{"BLOCK_M": (64, 128), "num_warps": (4, 8)}``.
        default: a configuration that is correct for every shape (used when no
            table entry exists and autotuning is impossible, e.g. on the CPU).
        bucket: maps a launch shape to the name of its tuning bucket; shapes in
            one bucket share a configuration.
        valid: optional filter ``valid(config, shape) -> bool`` removing points
            that cannot run for a shape (too much shared memory, block > T ...).
    """

    kernel: str
    axes: Mapping[str, tuple[int, ...]]
    default: Mapping[str, int]
    bucket: Callable[[Shape], str]
    valid: Callable[[Config, Shape], bool] | None = None

    def __post_init__(self):
        if set(self.default) != set(self.axes):
            raise ValueError(f"{self.kernel}: default must set exactly the axes {sorted(self.axes)}")
        if not self.contains(self.default):
            raise ValueError(f"{self.kernel}: default {dict(self.default)} lies outside its search space")

    def configs(self, shape: Shape) -> list[Config]:
        """Every point of the space that is valid for ``shape``."""
        names = list(self.axes)
        points = [dict(zip(names, values)) for values in itertools.product(*self.axes.values())]
        return [c for c in points if self.valid is None or self.valid(c, shape)]

    def contains(self, config: Mapping[str, int]) -> bool:
        """True when ``config`` sets every axis to one of its declared values."""
        return set(config) == set(self.axes) and all(config[k] in self.axes[k] for k in self.axes)


@dataclass(frozen=True)
class Workload:
    """One shape to tune one kernel for, and how to time a configuration on it.

    ``make_bench(config)`` returns a zero-argument callable that launches the
    kernel once with ``config`` on inputs it has already allocated.
    """

    space: SearchSpace
    shape: Shape
    make_bench: Callable[[Config], Callable[[], Any]]


# --------------------------------------------------------------------------- devices


def device_key(device: torch.device | str | None = None) -> str:
    """A file-name-safe name for the GPU, e.g. ``"nvidia-h100-80gb-hbm3"``; ``"cpu"`` without one."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return device.type
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


TUNING_DIR_VARIABLE = "ATTNREWRITE_TUNING_DIR"


def table_path(kind: str, device: str) -> Path:
    """Where the tuning table of ``kind`` for the device named ``device`` lives:
    ``$ATTNREWRITE_TUNING_DIR/<kind>/<device>.json`` when the variable is set (and not empty), else
    the package's ``kernels/<kind>/tuning/<device>.json``."""
    folder = os.environ.get(TUNING_DIR_VARIABLE)
    if folder:
        return Path(folder).expanduser() / kind / f"{device}.json"
    return KERNELS_DIR / kind / "tuning" / f"{device}.json"


def _empty_table(kind: str, device: str) -> dict:
    return {"schema": SCHEMA_VERSION, "kind": kind, "device": device, "kernels": {}}


def load_table(kind: str, device: str) -> dict:
    """The tuning table for ``kind`` on ``device`` (from :func:`table_path`), or an empty table when
    there is none or it is unusable (then warned about once: :func:`read_table`)."""
    return _load(kind, device, table_path(kind, device))


@functools.lru_cache(maxsize=None)
def _load(kind: str, device: str, path: Path) -> dict:
    # cached per path, so that changing ATTNREWRITE_TUNING_DIR reads the new folder, and a bad
    # table warns once per process rather than at every launch
    if not path.exists():
        return _empty_table(kind, device)
    table, errors = read_table(path, kind)
    if errors:
        warnings.warn(f"attnrewrite: ignoring the tuning table {path}: {'; '.join(errors)}. The {kind} kernels "
                      "launch with their default (or autotuned) configurations; rewrite the table with "
                      f"`python -m attnrewrite tune --kind {kind}`", RuntimeWarning, stacklevel=2)
        return _empty_table(kind, device)
    return table


def read_table(path: Path, kind: str) -> tuple[dict | None, list[str]]:
    """(table, []) for a sound table at ``path``, (None, [faults]) otherwise: unreadable, not JSON (with
    the line and column), or failing :func:`validate_table` against ``kind``'s declared spaces (only
    the structure is checked for a kind without tunable kernels)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"cannot be read ({exc})"]
    try:
        table = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"is not valid JSON ({exc})"]
    spaces = kind_module(kind).SPACES if kind in TUNABLE_KINDS else None
    errors = validate_table(table, spaces)
    return (None, errors) if errors else (table, [])


def _table_config(kind: str, device: str, kernel: str, bucket: str) -> dict | None:
    """The configuration the table gives ``kernel`` for ``bucket``, or None (no table, no entry, or an
    entry that is not a {name: int} object)."""
    kernels = load_table(kind, device).get("kernels")
    buckets = kernels.get(kernel) if isinstance(kernels, Mapping) else None
    entry = buckets.get(bucket) if isinstance(buckets, Mapping) else None
    config = entry.get("config") if isinstance(entry, Mapping) else None
    return dict(config) if _is_config(config) else None


def _is_config(config: Any) -> bool:
    return isinstance(config, Mapping) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in config.items())


# --------------------------------------------------------------------------- choosing


_chosen: dict[tuple[str, str, str, str], Config] = {}


# Whether a table miss may be autotuned.  Unset means "as the environment says"
# (ATTNREWRITE_AUTOTUNE, default on); autotune_disabled() sets it for a block.  A context variable
# rather than os.environ: it is local to the thread (and task) that set it, and setting it does not
# leak into subprocesses or other threads.
_AUTOTUNE: contextvars.ContextVar[bool] = contextvars.ContextVar("attnrewrite_autotune")


def autotune_enabled() -> bool:
    """Whether a table miss on a GPU may be autotuned: off inside :func:`autotune_disabled`, else
    off when the environment variable ``ATTNREWRITE_AUTOTUNE`` is ``"0"``, else on."""
    enabled = _AUTOTUNE.get(None)
    if enabled is None:
        enabled = _backward_callers_setting()
    if enabled is None:
        enabled = os.environ.get("ATTNREWRITE_AUTOTUNE", "1") != "0"
    return enabled


def _backward_callers_setting() -> bool | None:
    """The setting of the code that called ``.backward()``, when this runs inside it.

    Autograd runs a CUDA backward on a device thread of its own, where the caller's context
    variables are unset; torch stashes the caller's context for those threads
    (``torch.autograd.graph._engine_run_backward``), so a backward started inside
    :func:`autotune_disabled` launches its kernels without timing, as the forward did.
    """
    try:
        if not torch._C._is_key_in_tls("context"):
            return None
        caller = torch._C._get_obj_in_tls("context")
    except (AttributeError, RuntimeError):  # a torch without the stash: the thread's own setting only
        return None
    return caller.get(_AUTOTUNE, None) if isinstance(caller, contextvars.Context) else None


@contextlib.contextmanager
def autotune_disabled() -> Iterator[None]:
    """Within the block a table miss takes the default instead of a timed search (in this thread or
    task, and in the backward passes it starts)."""
    token = _AUTOTUNE.set(False)
    try:
        yield
    finally:
        _AUTOTUNE.reset(token)


def is_traced(*tensors: torch.Tensor) -> bool:
    """True while a graph is being traced (torch.compile, make_fx, fake or functional tensors):
    then nothing can be launched or timed."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or any(isinstance(t, FunctionalTensor) or is_fake(t) for t in tensors)


def pick_config(
    kind: str,
    space: SearchSpace,
    shape: Shape,
    device: torch.device,
    make_bench: Callable[[Config], Callable[[], Any]] | None = None,
    *,
    tensors: Iterable[torch.Tensor] = (),
    config: Mapping[str, int] | None = None,
) -> Config:
    """The configuration to launch ``space.kernel`` with, for one call of a kind's kernels.

    Args:
        kind: ``"sigmoid"``, ``"linear"``: whose tables to read.
        space, shape: the kernel's search space and the launch shape (the space buckets it).
        device: the tensors' device.
        make_bench: ``make_bench(config)`` -> a callable that launches once with ``config``, for a
            timed search on a GPU; None when the launch cannot be timed.
        tensors: the call's tensors, to tell a traced call (fake or functional tensors) from a real one.
        config: a configuration forced by the caller (tests, tuning); returned as it is.

    Returns:
        ``config`` when given; while tracing, :func:`lookup` (memoised choice, table, default; nothing
        timed and nothing remembered, so a later real call may still autotune); otherwise
        :func:`choose` (table -> autotune on a GPU -> default, memoised and logged).
    """
    if config is not None:
        log.debug("%s/%s: %s given by the caller", kind, space.kernel, dict(config))
        return dict(config)
    if is_traced(*tensors):
        return lookup(kind, space, shape, device)
    return choose(kind, space, shape, device, make_bench if torch.device(device).type == "cuda" else None)


def choose(
    kind: str,
    space: SearchSpace,
    shape: Shape,
    device: torch.device | str | None = None,
    make_bench: Callable[[Config], Callable[[], Any]] | None = None,
) -> Config:
    """The configuration to launch ``space.kernel`` with for ``shape``.

    Lookup order: the device's table, then (on a GPU, when ``make_bench`` is
    given and autotuning is enabled) a timed search over the declared space,
    then ``space.default``.  Results are memoised per process.
    """
    dev = device_key(device)
    bucket = space.bucket(shape)
    key = (kind, space.kernel, dev, bucket)
    if key in _chosen:
        return _chosen[key]

    entry = _table_config(kind, dev, space.kernel, bucket)
    if entry is not None and space.contains(entry):
        config, source = entry, "table"
    elif dev != "cpu" and make_bench is not None and autotune_enabled():
        config, _ = autotune(space, shape, make_bench)
        source = "autotune"
    else:
        config, source = dict(space.default), "default"
    valid = space.valid is None or space.valid(config, shape)
    if not valid:
        config, source = dict(space.default), "default (table entry invalid for this shape)"
    log.debug("%s/%s on %s, bucket %s: %s from %s", kind, space.kernel, dev, bucket, config, source)
    _chosen[key] = config
    return config


def lookup(kind: str, space: SearchSpace, shape: Shape, device: torch.device | str | None = None) -> Config:
    """The configuration :func:`choose` would return without timing anything: a memoised choice,
    else the table entry, else the default.  Remembers nothing, so a later :func:`choose` may still
    autotune.  For code that runs while a graph is traced (fake tensors: nothing can be timed)."""
    dev = device_key(device)
    bucket = space.bucket(shape)
    memo = _chosen.get((kind, space.kernel, dev, bucket))
    entry = _table_config(kind, dev, space.kernel, bucket)
    if memo is not None:
        config, source = dict(memo), "an earlier choice"
    elif entry is not None and space.contains(entry) and (space.valid is None or space.valid(entry, shape)):
        config, source = entry, "table"
    else:
        config, source = dict(space.default), "default"
    log.debug("%s/%s on %s, bucket %s, traced: %s from %s", kind, space.kernel, dev, bucket, config, source)
    return config


def autotune(
    space: SearchSpace,
    shape: Shape,
    make_bench: Callable[[Config], Callable[[], Any]],
    progress: Callable[[], None] | None = None,
) -> tuple[Config, float]:
    """Time every valid configuration of ``space`` on ``shape``; return the fastest and its ms.

    Configurations that fail to compile or run out of shared memory are skipped.
    """
    import triton.testing  # local: tuning needs a GPU, importing does not

    best: tuple[Config, float] | None = None
    for config in space.configs(shape):
        try:
            ms = triton.testing.do_bench(make_bench(config), warmup=5, rep=20)
        except Exception as exc:  # noqa: BLE001 — out of resources / compile errors are expected here
            log.debug("%s %s failed: %s", space.kernel, config, exc)
            ms = None
        if progress is not None:
            progress()
        if ms is not None and (best is None or ms < best[1]):
            best = (config, float(ms))
    if best is None:
        return dict(space.default), float("nan")
    return best


# --------------------------------------------------------------------------- writing and checking tables


def write_table(path: Path, table: Mapping) -> None:
    """Write ``table`` as JSON atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def validate_table(table: Any, spaces: Mapping[str, SearchSpace] | None = None) -> list[str]:
    """Every problem with ``table`` against the kind's declared ``spaces``; empty when it is sound.

    Never raises: any JSON value (a list, a string, nested values of the wrong type) gets a list of
    errors.  With ``spaces=None`` only the structure is checked (kernel names and configurations
    against no space).
    """
    if not isinstance(table, Mapping):
        return [f"the table must be a JSON object, got {type(table).__name__}"]
    errors = []
    if table.get("schema") != SCHEMA_VERSION:
        errors.append(f"schema is {table.get('schema')!r}, expected {SCHEMA_VERSION}")
    for key in ("kind", "device", "kernels"):
        if key not in table:
            errors.append(f"missing key {key!r}")
    for key in ("kind", "device"):
        if key in table and not isinstance(table[key], str):
            errors.append(f"{key!r} must be a string, got {type(table[key]).__name__}")
    kernels = table.get("kernels", {})
    if not isinstance(kernels, Mapping):
        return errors + [f"'kernels' must be an object, got {type(kernels).__name__}"]
    for kernel, buckets in kernels.items():
        space = None if spaces is None else spaces.get(kernel)
        if spaces is not None and space is None:
            errors.append(f"unknown kernel {kernel!r} (declared: {sorted(spaces)})")
            continue
        if not isinstance(buckets, Mapping):
            errors.append(f"{kernel}: buckets must be an object")
            continue
        for bucket, entry in buckets.items():
            errors += _entry_errors(f"{kernel}/{bucket}", entry, space)
    return errors


def _entry_errors(where: str, entry: Any, space: SearchSpace | None) -> list[str]:
    if not isinstance(entry, Mapping) or "config" not in entry:
        return [f"{where}: entry needs a 'config'"]
    errors = []
    config = entry["config"]
    if not _is_config(config):
        errors.append(f"{where}: 'config' must be an object of integers, got {config!r}")
    elif space is not None and not space.contains(config):
        errors.append(f"{where}: {config} lies outside the declared space")
    ms = entry.get("ms")
    if "ms" in entry and (not isinstance(ms, (int, float)) or isinstance(ms, bool)):
        errors.append(f"{where}: 'ms' must be a number")
    return errors


# --------------------------------------------------------------------------- the tune command

#: Kinds with tunable kernels: those whose kernel folder has a ``tune.py`` (SPACES and workloads()).
TUNABLE_KINDS = tuple(sorted(p.parent.name for p in KERNELS_DIR.glob("*/tune.py")))


def kind_module(kind: str):
    """The module ``attnrewrite.kernels.<kind>.tune``, which declares ``SPACES`` and ``workloads()``."""
    if kind not in TUNABLE_KINDS:
        raise ValueError(f"no tunable kernels for kind {kind!r}; choose one of {TUNABLE_KINDS}")
    return importlib.import_module(f"attnrewrite.kernels.{kind}.tune")


def tune_kind(kind: str, out: Path | None = None, quick: bool = False, show_progress: bool = True) -> Path:
    """Search every workload of ``kind`` on the current GPU and write its table. Returns the path.

    ``quick`` asks the kind for a reduced set of shapes (for a smoke run).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("tuning needs a CUDA GPU; none is visible to torch")
    from tqdm.auto import tqdm

    module = kind_module(kind)
    workloads: list[Workload] = list(module.workloads(quick=quick))
    total = sum(len(w.space.configs(w.shape)) for w in workloads)
    dev = device_key()
    table: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "device": dev,
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernels": {},
    }
    with tqdm(total=total, desc=f"tune {kind} on {dev}", disable=not show_progress) as bar:
        for w in workloads:
            config, ms = autotune(w.space, w.shape, w.make_bench, progress=bar.update)
            table["kernels"].setdefault(w.space.kernel, {})[w.space.bucket(w.shape)] = {"config": config, "ms": ms}
    errors = validate_table(table, module.SPACES)
    if errors:
        raise RuntimeError("tuning produced an invalid table: " + "; ".join(errors))
    path = Path(out) if out is not None else table_path(kind, dev)
    write_table(path, table)
    _load.cache_clear()
    _chosen.clear()
    return path


def iter_tables() -> Iterable[tuple[str, Path]]:
    """Every (kind, path) of a tuning table that ships in the package."""
    for kind in TUNABLE_KINDS:
        yield from ((kind, p) for p in sorted((KERNELS_DIR / kind / "tuning").glob("*.json")))


__all__ = [
    "SearchSpace",
    "Workload",
    "autotune",
    "autotune_disabled",
    "autotune_enabled",
    "choose",
    "device_key",
    "is_traced",
    "iter_tables",
    "kind_module",
    "lookup",
    "load_table",
    "pick_config",
    "read_table",
    "table_path",
    "tune_kind",
    "validate_table",
    "write_table",
]

