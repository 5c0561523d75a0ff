"""Data sets for the reference models that need no download.

- :func:`text_corpus`: a byte-level corpus of the docstrings of Python's own standard library
  (read from its source files with ``ast``, never imported), split by module into train and
  validation. The same Python version builds the same corpus, byte for byte.
- :func:`digits`: scikit-learn's bundled 8x8 handwritten digits (extra ``vision``).
- :func:`pbmc68k_reduced`: scanpy's bundled 700 blood cells x 765 genes with 10 cell types,
  read with anndata from the file inside the scanpy package (extra ``singlecell``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Standard-library folders left out of the corpus: test suites (huge, and mostly test data),
# and bundled third-party or demo code.
_SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib",
                              "lib2to3", "turtledemo", "ensurepip", "__pycache__"})
_VALIDATION_SHARE = 10   # one module in ten goes to validation
_CORPUS_FORMAT = 1       # bump when the way the corpus is built changes


def _missing_extra(package: str, extra: str, what: str) -> ImportError:
    return ImportError(f"{what} needs the optional package {package!r}: "
                       f"pip install 'attnrewrite[{extra}]'")


# --------------------------------------------------------------------------------------------
# Text: standard-library docstrings, byte level
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextCorpus:
    """Byte-level text: ``train`` and ``val`` are 1-d uint8 tensors; token ids are byte values."""

    train: torch.Tensor
    val: torch.Tensor
    source: str          # what the text is, e.g. "docstrings of the Python 3.11.7 standard library"
    sha256: str          # of train + val, to check that two machines built the same corpus

    vocab_size = 256

    @staticmethod
    def decode(tokens) -> str:
        """Text of a sequence of byte ids (invalid UTF-8 is replaced, not raised)."""
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")

    @staticmethod
    def encode(text: str) -> torch.Tensor:
        """Byte ids [N] int64 of ``text``."""
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def _stdlib_sources(stdlib: Path) -> list[Path]:
    files = []
    for path in stdlib.rglob("*.py"):
        relative = path.relative_to(stdlib)
        if not _SKIPPED_FOLDERS.intersection(relative.parts[:-1]):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def _docstrings(source: bytes) -> list[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):   # a few files are deliberately invalid (e.g. bad encodings)
        return []
    found = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_validation(module_path: str) -> bool:
    # A hash of the module's path, not its position in the list, so adding a module to the
    # standard library does not move every other module between the splits.
    digest = hashlib.sha256(module_path.encode()).digest()
    return digest[0] % _VALIDATION_SHARE == 0


def build_text_corpus(stdlib: Path | None = None) -> tuple[bytes, bytes]:
    """(train, validation) UTF-8 bytes of the docstrings under the standard library folder
    ``stdlib`` (default: this interpreter's). Documents are separated by a blank line."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in _stdlib_sources(stdlib):
        text = "\n\n".join(_docstrings(path.read_bytes()))
        if text:
            (val if _is_validation(path.relative_to(stdlib).as_posix()) else train).append(text)
    if not train or not val:
        raise FileNotFoundError(f"no standard-library sources with docstrings under {stdlib} "
                                "(this Python may ship only compiled files)")
    return "\n\n".join(train).encode("utf-8"), "\n\n".join(val).encode("utf-8")


def cache_dir() -> Path:
    """Where built data sets are kept: ``$ATTNREWRITE_CACHE``, else ``$XDG_CACHE_HOME/attnrewrite``,
    else ``~/.cache/attnrewrite``."""
    if os.environ.get("ATTNREWRITE_CACHE"):
        return Path(os.environ["ATTNREWRITE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnrewrite"


def text_corpus(cache: Path | None = None) -> TextCorpus:
    """The standard-library docstring corpus (about 1.5 MB on CPython 3.11), built on first use
    (a few seconds) and cached as two files under ``cache`` (default :func:`cache_dir`)."""
    version = ".".join(map(str, sys.version_info[:3]))
    tag = f"stdlib-docstrings-{sys.implementation.name}{version}-v{_CORPUS_FORMAT}"
    folder = Path(cache or cache_dir())
    train_file, val_file = folder / f"{tag}.train.txt", folder / f"{tag}.val.txt"
    if train_file.exists() and val_file.exists():
        train, val = train_file.read_bytes(), val_file.read_bytes()
    else:
        train, val = build_text_corpus()
        folder.mkdir(parents=True, exist_ok=True)
        # Write to temporary names and rename, so a concurrent reader never sees half a file.
        for data, final in ((train, train_file), (val, val_file)):
            partial = final.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(data)
            partial.replace(final)
    digest = hashlib.sha256(train + b"\0" + val).hexdigest()
    return TextCorpus(
        train=torch.frombuffer(bytearray(train), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val), dtype=torch.uint8),
        source=f"docstrings of the {sys.implementation.name} {version} standard library",
        sha256=digest,
    )


def text_batch(data: torch.Tensor, batch_size: int, block_size: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a 1-d uint8 corpus for next-byte prediction: (inputs, targets), each
    [batch_size, block_size] int64, targets shifted one byte to the right."""
    if data.dim() != 1 or len(data) <= block_size:
        raise ValueError(f"need a 1-d corpus longer than block_size={block_size}, got shape {tuple(data.shape)}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    windows = torch.stack([data[s: s + block_size + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


# --------------------------------------------------------------------------------------------
# Images: scikit-learn's digits
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSplit:
    """Images [N, 1, 8, 8] float32 in [0, 1] and labels [N] int64."""

    images: torch.Tensor
    labels: torch.Tensor


def digits(validation_fraction: float = 0.2) -> tuple[ImageSplit, ImageSplit]:
    """(train, validation) of scikit-learn's 1797 bundled 8x8 digits, split per class with a fixed
    seed (the same split on every machine)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise _missing_extra("scikit-learn", "vision", "the digits data set") from error
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0   # pixels are 0..16
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, val_idx = stratified_split(bunch.target, validation_fraction, seed=0)
    return (ImageSplit(images[train_idx], labels[train_idx]), ImageSplit(images[val_idx], labels[val_idx]))


def stratified_split(labels: np.ndarray, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) index arrays, sorted, taking ``validation_fraction`` of every class
    (at least one item of each class with two or more) into validation."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    val = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * validation_fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            n_val = 0
        val.extend(members[:n_val].tolist())
    val = np.sort(np.array(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


# --------------------------------------------------------------------------------------------
# Single cell: scanpy's pbmc68k_reduced
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SingleCellData:
    """An expression matrix with cell types.

    ``expression`` [N, G] float32: log-normalised counts (``adata.raw.X``, non-negative; zero
    means not detected). ``cell_types`` [N] int64 indexes ``cell_type_names``.
    """

    expression: np.ndarray
    gene_names: list[str]
    cell_types: np.ndarray
    cell_type_names: list[str]


def pbmc68k_reduced_path() -> Path:
    """Path of ``10x_pbmc68k_reduced.h5ad`` inside the installed scanpy package (scanpy itself is
    not imported: finding the package is enough)."""
    spec = importlib.util.find_spec("scanpy")
    if spec is None or not spec.submodule_search_locations:
        raise _missing_extra("scanpy", "singlecell", "the pbmc68k_reduced data set")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "datasets" / "10x_pbmc68k_reduced.h5ad"
        if path.exists():
            return path
    raise FileNotFoundError(f"scanpy is installed at {list(spec.submodule_search_locations)} "
                            "but has no datasets/10x_pbmc68k_reduced.h5ad")


def pbmc68k_reduced() -> SingleCellData:
    """scanpy's bundled PBMC data: 700 cells x 765 genes, 10 cell types from ``obs['bulk_labels']``."""
    path = pbmc68k_reduced_path()
    try:
        import anndata
    except ImportError as error:
        raise _missing_extra("anndata", "singlecell", "the pbmc68k_reduced data set") from error
    import warnings

    with warnings.catch_warnings():
        # The file was written by an old anndata; the reader warns about every element it
        # upgrades on the fly. Nothing there concerns the arrays used here.
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(path)
    raw = adata.raw if adata.raw is not None else adata
    expression = raw.X.toarray() if hasattr(raw.X, "toarray") else np.asarray(raw.X)
    labels = adata.obs["bulk_labels"]
    return SingleCellData(
        expression=expression.astype(np.float32),
        gene_names=[str(name) for name in raw.var_names],
        cell_types=np.asarray(labels.cat.codes, dtype=np.int64),
        cell_type_names=[str(name) for name in labels.cat.categories],
    )
