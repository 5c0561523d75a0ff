"""Live tensor bytes: how much tensor memory a computation holds at its peak, counted, not sampled.

tracemalloc does not see torch's allocations and the resident set is per process (useless for W ranks
simulated by threads).  :class:`LiveTensorBytes` is a dispatch mode that notes the storage of every tensor an
op returns while it is on (in its own thread: a mode is thread-local, and autograd runs a CPU backward in the
calling thread, so the backward's ops are seen too) and, after each op, adds up the bytes of the storages
still alive.  Tensors made before the mode was entered (a rank's inputs) are not counted; a tensor that
merely views a counted storage adds nothing.
"""

from __future__ import annotations

from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import torch
from torch._library import custom_ops


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as live: ...`` then ``live.peak`` (bytes), ``live.peak_at`` (the op after which the
    peak was reached) and ``live.peak_tensors`` ([(bytes, op, shape)] of the storages alive at the peak, largest
    first)."""

    def __init__(self):
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int, str, tuple]] = {}
        self.peak = 0
        self.peak_at = ""
        self.peak_tensors: list[tuple[int, str, tuple]] = []

    def live(self) -> int:
        """The bytes of the counted storages alive now (and forget the dead ones)."""
        dead = [key for key, (ref, *_rest) in self._storages.items() if ref.expired()]
        for key in dead:
            del self._storages[key]
        return sum(size for _, size, _, _ in self._storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inner = _python_impl(func)
        if inner is not None:  # an opaque custom op: count what its implementation allocates inside it
            with self:
                out = inner(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in inputs:  # a view of an input (or the input itself, returned or written in place)
                continue
            known = self._storages.get(key)
            if storage.nbytes() and (known is None or known[0].expired()):
                self._storages[key] = (StorageWeakRef(storage), storage.nbytes(), str(func), tuple(tensor.shape))
        now = self.live()
        if now > self.peak:
            self.peak, self.peak_at = now, str(func)
            self.peak_tensors = sorted(((size, op, shape) for _, size, op, shape in self._storages.values()),
                                       reverse=True)
        return out


def _python_impl(func):
    """The CPU implementation of a ``torch.library.custom_op`` written in Python, else None."""
    name = getattr(func, "name", None)
    if not callable(name) or not hasattr(func, "namespace") or func.namespace == "aten":
        return None
    opdef = custom_ops.OPDEFS.get(func.name().split(".")[0])
    return None if opdef is None else opdef._backend_fns.get("cpu") or opdef._init_fn
