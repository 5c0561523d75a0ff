"""Building and loading the kinds' small C kernels for the CPU (shared by :mod:`.sigmoid.native` and
:mod:`.hashed.native`).

A kernel is a C source string compiled once per machine with the system's C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``) into ``$ATTNREWRITE_CACHE/native`` (else ``$XDG_CACHE_HOME/attnrewrite/native``,
else ``~/.cache/attnrewrite/native``), the file name keyed by a hash of the source, compiler and flags, and
loaded with ctypes.  Where there is no compiler, compiling fails, or ``ATTNREWRITE_NATIVE=0`` is set,
:class:`NativeLibrary` gives None and the caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


#: C source shared by the kernels: e^c for c in [-87, 88], as the kernels' hot loops need it.  c = n ln2 + r with
#: n = round(c / ln2) (by adding and subtracting 1.5 * 2^23), ln2 split in two parts (Cody and Waite) so r is
#: exact, e^r by a degree-5 polynomial fitted on [-ln2/2, ln2/2] (relative error under 2e-7), 2^n built in the
#: exponent bits.  The caller clamps c (and decides what lies outside the range).  Needs <stdint.h>, <string.h>.
C_EXP = r"""
static inline float exp_in_range(float c) {
    float n = (c * 1.44269504f + 12582912.0f) - 12582912.0f;
    float r = c - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 0.0082917167f;
    p = p * r + 0.041915029f;
    p = p * r + 0.16667663f;
    p = p * r + 0.49998900f;
    p = p * r + 0.99999964f;
    p = p * r + 1.0000001f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}
"""


def enabled() -> bool:
    """False when ``ATTNREWRITE_NATIVE=0`` switches the compiled kernels off."""
    return os.environ.get("ATTNREWRITE_NATIVE", "1") != "0"


def cache_dir() -> Path:
    """Where the compiled kernels are kept."""
    if os.environ.get("ATTNREWRITE_CACHE"):
        return Path(os.environ["ATTNREWRITE_CACHE"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnrewrite" / "native"


def flags(extra_x86: tuple[str, ...] = ()) -> list[str]:
    """The compiler flags: optimised, position-independent, vectorisable; AVX2 and FMA (and ``extra_x86``)
    on an x86 CPU where torch itself reports AVX2."""
    # -fno-trapping-math lets the compiler vectorise branches into selects
    found = ["-O3", "-shared", "-fPIC", "-fno-trapping-math", "-ffp-contract=fast"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        found += ["-mavx2", "-mfma", *extra_x86]  # torch says this CPU has AVX2 (and FMA, POPCNT with it)
    return found


def compiler() -> str | None:
    """The C compiler to use, or None."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def build(name: str, source: str, extra_x86: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile ``source`` (once per machine; see the module docstring) and load it; None without a compiler.
    Raises OSError or subprocess.SubprocessError when compiling or loading fails."""
    cc = compiler()
    if cc is None:
        log.info("attnrewrite: no C compiler found; the %s CPU path uses torch ops", name)
        return None
    options = flags(extra_x86)
    key = hashlib.sha256("\0".join([source, cc, *options]).encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"{name}_{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as work:
            path = Path(work) / f"{name}.c"
            path.write_text(source)
            built = Path(work) / target.name
            subprocess.run([cc, *options, str(path), "-o", str(built)], check=True, capture_output=True, timeout=120)
            os.replace(built, target)  # atomic: a concurrent process sees the whole file or none
    return ctypes.CDLL(str(target))


def sgemm_address() -> int | None:
    """The address of the BLAS ``sgemm_`` torch itself links (MKL or OpenBLAS, 32-bit integers), or None."""
    folder = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (folder / name).exists():
            try:
                blas = ctypes.CDLL(str(folder / name))
                return ctypes.cast(blas.sgemm_, ctypes.c_void_p).value
            except (OSError, AttributeError):
                return None
    return None


class NativeLibrary:
    """One kernel, built on first use and kept for the process.

    ``declare(lib)`` sets the ctypes signatures of the loaded library.  :meth:`get` returns the library, or
    None where it cannot be had (switched off, no compiler, a failed build: logged once as a warning)."""

    def __init__(self, name: str, source: str, declare: Callable[[ctypes.CDLL], None],
                 extra_x86: tuple[str, ...] = ()):
        self.name, self.source, self.declare, self.extra_x86 = name, source, declare, extra_x86
        self._lock = threading.Lock()
        self._built = False
        self._lib: ctypes.CDLL | None = None

    def get(self) -> ctypes.CDLL | None:
        if not enabled():
            return None
        with self._lock:
            if not self._built:
                try:
                    lib = build(self.name, self.source, self.extra_x86)
                    if lib is not None:
                        self.declare(lib)
                    self._lib = lib
                except (OSError, AttributeError, subprocess.SubprocessError) as error:
                    log.warning("attnrewrite: building the %s CPU kernel failed (%s); using torch ops", self.name,
                                error)
                    self._lib = None
                self._built = True
            return self._lib
