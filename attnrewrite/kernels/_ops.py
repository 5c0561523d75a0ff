"""How every kind registers its ``torch.library`` operators (namespace ``attnrewrite``), and how a call
chooses between the Triton kernels and the torch path.

Three kinds of operator, one function each:

- :func:`composite_op` — an operator whose implementation is plain torch (``CompositeImplicitAutograd``):
  it decomposes *before* autograd, so its fake implementation and its gradient are those of the ops it
  calls, and under ``torch.compile`` inductor sees (and fuses) what is underneath.  The public ops of
  the exact, sigmoid and linear kinds are of this sort.
- :func:`kernel_op` — an opaque ``torch.library.custom_op`` with a fake implementation and, when it is
  differentiable, an autograd formula: for loops that must stay whole in a traced graph (the torch
  paths of summary, hashed and sigmoid) and for backward ops.
- :func:`triton_ops` — a pair for a Triton path: a ``torch.library.triton_op`` for CUDA (inductor
  traces into it and sees the kernel launches) and a twin ``<name>_interpreted``, a plain
  :func:`kernel_op` running the same implementation on CPU tensors under ``TRITON_INTERPRET=1``
  (a ``triton_op`` cannot be compiled for the CPU; the twins exist for tests).

The opaque operators all use the functional ``torch.library.custom_op`` API; ``composite_op`` is the
one place that uses :class:`torch.library.Library`, because ``custom_op`` cannot make a
``CompositeImplicitAutograd`` operator.  Every operator with SDPA's leading arguments writes its
schema with :func:`sdpa_schema`.

:func:`resolve_impl` turns a call's ``impl="auto" | "triton" | "torch"`` into a path, with the same
rules and messages for every kind that has kernels.

:func:`like_sdpa_under_autocast` is SDPA's autocast rule (cast the inputs to the autocast dtype, run with
autocast off), :func:`sdpa_autocast` registers it on a public op and :func:`call_dtype` reports the dtype
a call runs in, the one :func:`resolve_impl` chooses the path from.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from attnrewrite.kernels.checks import check_qkv, refuse_sharded_sequence, refuse_torch_context_parallel

NAMESPACE = "attnrewrite"
IMPLS = ("auto", "triton", "torch")

# The leading arguments of ``F.scaled_dot_product_attention``, as every SDPA-like operator takes them.
_SDPA_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
              "bool is_causal={is_causal}, float? scale=None, bool enable_gqa=False")

# Library.define / Library.impl need a Library object that lives as long as the process.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def sdpa_schema(extra: str = "", returns: str = "Tensor", *, is_causal: bool = False) -> str:
    """The schema ``(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0,
    bool is_causal=False, float? scale=None, bool enable_gqa=False[, extra]) -> returns``.

    Args:
        extra: the kind's own arguments, in schema syntax (e.g. ``"float? bias=None"``).
        returns: the return type(s) in schema syntax.
        is_causal: the default of ``is_causal`` (True for kinds meant for language models).

    Returns:
        A schema without the operator name, as ``torch.library.custom_op(schema=...)`` takes it.
    """
    args = _SDPA_ARGS.format(is_causal=is_causal)
    return f"({args}{', ' + extra if extra else ''}) -> {returns}"


def _digest_sources(root: Path) -> str:
    # as attnrewrite.rewriter.backend.digest_sources (the floors keep the pass from importing this module)
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def _kernels_source_digest() -> str:
    return _digest_sources(Path(__file__).resolve().parent)


def schema_fingerprint(namespace: str = NAMESPACE) -> str:
    """sha256 (16 hex digits) over the schema of every operator registered in ``namespace``, each written
    without the namespace (so two namespaces holding the same schemas agree), sorted.

    Importing ``attnrewrite`` registers every kind's operators, so within one checkout this is one value.
    """
    prefix = namespace + "::"
    schemas = []
    for qualname in torch._C._dispatch_get_all_op_names():
        if qualname.startswith(prefix):
            name, _, overload = qualname.partition(".")
            schemas.append(str(torch._C._get_schema(name, overload)).removeprefix(prefix))
    return hashlib.sha256("\n".join(sorted(schemas)).encode()).hexdigest()[:16]


CACHE_TAG_PREFIX = "attnrewrite-ops:"


def cache_key_tag() -> str:
    """The part of torch.compile's cache keys that names this attnrewrite: the schemas of its operators
    (:func:`schema_fingerprint`) and a digest of the kernels' source (what a composite op decomposes into)."""
    return f"{CACHE_TAG_PREFIX}{schema_fingerprint()}.{_kernels_source_digest()}"


def tag_compile_caches() -> None:
    """While torch.compile traces an attnrewrite operator, put :func:`cache_key_tag` into
    ``torch.compiler.config.cache_key_tag`` (kept beside the user's own tag, replacing an older
    attnrewrite part), which inductor's FX graph cache and the AOTAutograd cache fold into every key.

    Why: those caches key a graph on its code, which names an operator, not its schema or the Python a
    composite operator decomposes into.  A cache written by another version of attnrewrite would otherwise
    replay its compiled code against this version's operators (seen: a cached sliding_window backward
    calling the blockwise op without the ``seed`` argument it gained since).  Done on the first trace of
    an attnrewrite op rather than at import, so importing attnrewrite changes no global config.
    """
    if torch._guards.TracingContext.try_get() is None and not torch.compiler.is_compiling():
        return
    tag = cache_key_tag()
    current = torch.compiler.config.cache_key_tag
    if tag in current.split("|"):
        return
    kept = [part for part in current.split("|") if part and not part.startswith(CACHE_TAG_PREFIX)]
    torch.compiler.config.cache_key_tag = "|".join([*kept, tag])


def composite_op(name: str, schema: str, impl: Callable) -> torch._ops.OpOverloadPacket:
    """Define ``attnrewrite::<name>`` with ``impl`` as its ``CompositeImplicitAutograd`` kernel.

    ``impl`` must be made of differentiable, traceable torch calls (other operators included): the
    dispatcher runs it for every backend, under autograd and under fake tensors alike.  Inside
    torch's own context-parallel manager it raises instead (:func:`.checks.refuse_torch_context_parallel`).
    Returns ``torch.ops.attnrewrite.<name>``.
    """
    what = f"attnrewrite.ops.{name}"

    @functools.wraps(impl)
    def guarded(*args, **kwargs):
        refuse_torch_context_parallel(what)
        tag_compile_caches()
        empty = empty_output(*args[:3])
        if empty is None:
            return impl(*args, **kwargs)
        # an empty call is still checked, so a malformed one raises as a full one does; batch sizes as SDPA
        # takes them (0 against 1 broadcasts, 0 against 2 does not)
        check_qkv(*args[:3], what, any_leading_dims=True)
        torch.broadcast_shapes(*(x.shape[:1] for x in args[:3]))
        return empty

    _LIB.define(name + schema)
    _LIB.impl(name, guarded, "CompositeImplicitAutograd")
    return getattr(torch.ops.attnrewrite, name)


def empty_output(q, k, v, *, no_keys: bool = False) -> torch.Tensor | None:
    """The output of an SDPA-like call with nothing to compute (a batch, head or query count of 0, or
    values of width 0; with ``no_keys`` also a key count of 0: every query then sees no key and gets 0,
    as from SDPA), or None when there is something.

    The kinds' loops divide by these sizes; SDPA returns an empty [B, Hq, Tq, Dv] for them, and so do we.
    Every composite op returns this before its implementation runs, once the call's q, k and v pass
    :func:`~attnrewrite.kernels.checks.check_qkv` (types, ranks, dtypes, devices, paired shapes).
    The result is tied to q, k and v by a product with 0, so a backward through it gives each input its
    (zero, possibly empty) gradient instead of failing for want of a graph.
    """
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)):
        return None  # the kind's own checks name the problem
    shape = (*q.shape[:-1], v.shape[-1])
    # guard_or_false: a size only known at run time (unbacked) is taken as non-zero, as the kinds take it
    if not any(guard_or_false(size == 0) for size in (*shape, *((k.shape[-2],) if no_keys else ()))):
        return None
    tie = q.sum() + k.sum() + v.sum()
    return q.new_zeros(shape) + (tie * 0).to(q.dtype)


def kernel_op(name: str, impl: Callable, *, fake: Callable, schema: str | None = None,
              backward: Callable | None = None, setup_context: Callable | None = None):
    """Define the opaque operator ``attnrewrite::<name>`` (``torch.library.custom_op``).

    Args:
        name: the operator's name in the ``attnrewrite`` namespace.
        impl: the implementation on real tensors.  Its type annotations give the schema unless
            ``schema`` is passed.
        fake: the shape-only implementation run while tracing (must raise the same input errors
            as ``impl`` where it checks inputs).
        schema: an explicit schema (e.g. from :func:`sdpa_schema`), without the name.
        backward, setup_context: the autograd formula (``register_autograd``); None for an operator
            that is not differentiated (a backward op, an inference-only op): differentiating it
            then raises :func:`refuse_derivative`'s error.

    Returns:
        The ``CustomOpDef``; call it like a function.
    """
    if backward is not None:  # a forward kernel: refused on a shard the context-parallel manager did not hand it
        impl = _refusing_on_a_shard(impl, f"attnrewrite::{name}")
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)

    @functools.wraps(fake)
    def tagging_fake(*args, **kwargs):
        tag_compile_caches()
        return fake(*args, **kwargs)

    op.register_fake(tagging_fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    else:
        refuse_derivative(op, name)
    return op


def _refusing_on_a_shard(impl: Callable, what: str) -> Callable:
    @functools.wraps(impl)
    def guarded(*args, **kwargs):
        refuse_sharded_sequence(what)
        return impl(*args, **kwargs)

    return guarded


def refuse_derivative(op, name: str) -> None:
    """Make differentiating ``op`` (a backward or inference-only operator) raise a clear
    ``NotImplementedError``: a forward op's second-order gradients (``create_graph=True``,
    ``torch.func.hessian``, gradient penalties) go through its backward op, and without this torch's
    message names neither the kind nor what is missing."""

    def _no_derivative(ctx, *grads):
        raise NotImplementedError(
            f"{NAMESPACE}::{name} has no derivative: second-order gradients (double backward, "
            f"create_graph=True, hessians) through it are not implemented; take first-order gradients "
            f"only, or use a kind whose op supports them (softmax on the math backend, linear's torch path)")

    _no_derivative.refuses = True  # tells tests (opcheck) that the op is not differentiable
    op.register_autograd(_no_derivative, setup_context=lambda ctx, inputs, output: None)


# The devices whose autocast the public ops follow, as SDPA does.
AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_cast(x, device_type: str, dtype: torch.dtype):
    # SDPA's rule (ATen's lower_precision_fp cast): floating tensors on the autocast device, except
    # float64, go to the autocast dtype; everything else passes unchanged
    if (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
            and x.device.type == device_type):
        return x.to(dtype)
    return x


def call_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a call whose first input is ``x`` runs in under SDPA's autocast rule: the autocast
    dtype while autocast is on for ``x``'s device (float64 excepted), else ``x.dtype``.

    Inside :func:`like_sdpa_under_autocast`'s body autocast is off and the inputs are cast, so there
    it is ``x.dtype``: the path a call takes (``impl="auto"``) is chosen from the dtype it will run in.
    """
    device_type = x.device.type
    if (x.dtype != torch.float64 and device_type in AUTOCAST_DEVICES
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def like_sdpa_under_autocast(device_type: str, body: Callable, *args, **kwargs):
    """``body(*args, **kwargs)`` under the autocast rule of ``F.scaled_dot_product_attention``.

    Outside autocast (or on a device SDPA's rule does not cover) the body runs as called.  Inside
    ``torch.autocast(device_type, dtype)`` the floating-point tensor arguments on that device (q, k,
    v, a float mask, learned parameters; never float64) are cast to ``dtype`` and the body runs with
    autocast off for that device, so what it calls — a torch path or the Triton kernels — sees one
    dtype and returns it.  The one statement of the rule: :func:`sdpa_autocast` registers it for an
    operator, and :func:`call_dtype` reports the dtype it gives.
    """
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return body(*args, **kwargs)
    dtype = torch.get_autocast_dtype(device_type)
    args = [_autocast_cast(a, device_type, dtype) for a in args]
    kwargs = {n: _autocast_cast(a, device_type, dtype) for n, a in kwargs.items()}
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):  # autocast off, as SDPA runs
        return body(*args, **kwargs)


def sdpa_autocast(name: str) -> None:
    """Give ``attnrewrite::<name>`` the autocast rule of ``F.scaled_dot_product_attention``
    (:func:`like_sdpa_under_autocast`).

    SDPA is a ``lower_precision_fp`` op: inside ``torch.autocast(device, dtype)`` its floating-point
    tensor inputs on that device (q, k, v, a float mask; never float64) are cast to ``dtype``, it
    runs with autocast off and returns ``dtype``.  A model whose rotary embedding leaves q and k in
    float32 while v is bfloat16 therefore runs; an op standing in for SDPA must do the same.
    ``torch.library.register_autocast`` casts to one dtype fixed at registration, so the rule is
    written here: the dtype is read from the autocast state of each call.  Registered on the
    Autocast keys of :data:`AUTOCAST_DEVICES`, as a C++ dispatcher kernel and as the Python kernel
    that tracing (``torch.compile``'s pre-dispatch) runs.  Also works for composite ops, which have
    no Autocast kernel of their own (their decomposition would reach the inner ops uncast): the
    public ops of every kind with kernels are composite ops choosing their path inside, so the path
    is chosen from the cast inputs.
    """
    op = getattr(torch.ops.attnrewrite, name).default
    for device_type in AUTOCAST_DEVICES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)

        def run(*args, _device_type=device_type, **kwargs):
            return like_sdpa_under_autocast(_device_type, op, *args, **kwargs)

        op.py_impl(getattr(torch._C.DispatchKey, key_name))(run)
        _LIB.impl(name, lambda _keyset, *args, _run=run, **kwargs: _run(*args, **kwargs), key_name,
                  with_keyset=True)


class TritonOps(NamedTuple):
    """One Triton operator in its two forms: ``cuda`` (a ``triton_op``) and ``interpreted`` (its CPU twin)."""

    cuda: object
    interpreted: object

    def on(self, device: torch.device):
        """The form for tensors on ``device``: the ``triton_op`` on CUDA, the interpreted twin elsewhere
        (whether the interpreter is on is for :func:`resolve_impl` to check, before the call)."""
        return self.cuda if device.type == "cuda" else self.interpreted


def triton_ops(name: str, impl: Callable, *, fake: Callable, backward: Callable | None = None,
               setup_context: Callable | None = None) -> TritonOps:
    """Define ``attnrewrite::<name>`` as a ``triton_op`` for CUDA and ``attnrewrite::<name>_interpreted``
    as its interpreted CPU twin, with one implementation, schema and autograd formula.

    Args:
        impl: launches the kernels through :func:`traceable`; its annotations give the schema.
        fake: the twin's shape-only implementation (a ``triton_op`` traces ``impl`` itself on fake
            tensors instead).
        backward, setup_context: the autograd formula, registered on both forms (None: differentiating
            either raises, :func:`refuse_derivative`).  A backward that
            calls a backward operator picks its form from the saved tensors' device
            (:meth:`TritonOps.on`), so each form is differentiated by its own kind of op.
    """
    cuda = torch.library.triton_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
    interpreted = kernel_op(f"{name}_interpreted", impl, fake=fake)
    for op, op_name in ((cuda, name), (interpreted, f"{name}_interpreted")):
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        else:
            refuse_derivative(op, op_name)
    return TritonOps(cuda, interpreted)


def traceable(kernel):
    """``kernel`` wrapped so that torch.compile / make_fx can trace its launch (``wrap_triton``); the
    interpreter's kernels (``TRITON_INTERPRET=1``) are returned as they are and run eagerly."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def resolve_impl(
    impl: str,
    device: torch.device,
    *,
    what: str,
    dtype: torch.dtype,
    head_dims: Sequence[int],
    triton_dtypes: Sequence[torch.dtype],
    auto_dtypes: Sequence[torch.dtype] | None = None,
    max_head_dim: int = 256,
    refusal: str | None = None,
    available: bool = True,
    interpreter_active: Callable[[], bool] = lambda: False,
) -> str:
    """``"triton"`` or ``"torch"``: the path that runs a call asking for ``impl``.

    ``"auto"`` runs the kernels on CUDA when they can take the call (``auto_dtypes``, head dims up to
    ``max_head_dim``, no ``refusal``) and the torch path otherwise; ``"torch"`` always runs the torch
    path; ``"triton"`` runs the kernels or raises, naming why — it never falls back silently.

    Args:
        impl: ``"auto"``, ``"triton"`` or ``"torch"``.
        device: the device of the inputs.
        what: the operation, at the head of every message (e.g. ``"sigmoid attention"``).
        dtype: the inputs' dtype; head_dims: (Dk, Dv).
        triton_dtypes: the dtypes the kernels take; auto_dtypes: those ``"auto"`` sends to them
            (default: ``triton_dtypes``).
        refusal: why the kernels cannot run this call (e.g. an option they do not implement), or None.
        available: False when triton cannot be imported.
        interpreter_active: whether the kernels were defined under ``TRITON_INTERPRET=1`` (asked only
            for an explicit ``"triton"`` on the CPU).

    Raises:
        ValueError: ``impl`` is not one of the three, or ``"triton"`` cannot take these inputs.
        RuntimeError: ``"triton"`` without triton, or on a device where the kernels cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"{what}: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    auto_dtypes = triton_dtypes if auto_dtypes is None else auto_dtypes
    if impl == "auto":
        fits = dtype in auto_dtypes and max(head_dims) <= max_head_dim and refusal is None
        return "triton" if device.type == "cuda" and available and fits else "torch"
    if impl == "torch":
        return "torch"
    prefix = f"{what}(impl='triton')"
    if not available:
        raise RuntimeError(f"{prefix}: triton is not installed; use impl='torch' (or 'auto')")
    if refusal is not None:
        raise ValueError(f"{prefix}: {refusal}; use impl='torch' (or 'auto')")
    if dtype not in triton_dtypes:
        raise ValueError(f"{prefix}: the kernels take {_dtype_names(triton_dtypes)}, got {dtype}; "
                         "use impl='torch' (or 'auto')")
    if max(head_dims) > max_head_dim:
        raise ValueError(f"{prefix}: head dims up to {max_head_dim} are supported, got {tuple(head_dims)}")
    if device.type == "cpu" and not interpreter_active():
        raise RuntimeError(f"{prefix}: tensors are on the CPU; set TRITON_INTERPRET=1 before attnrewrite is "
                           "imported to run the kernels there, or use impl='torch' (or 'auto')")
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"{prefix}: tensors are on {device}; the kernels run on CUDA devices "
                           "(or on the CPU under TRITON_INTERPRET=1)")
    return "triton"


__all__ = ["AUTOCAST_DEVICES", "CACHE_TAG_PREFIX", "IMPLS", "NAMESPACE", "TritonOps", "cache_key_tag", "call_dtype",
           "composite_op", "kernel_op", "schema_fingerprint", "tag_compile_caches",
           "like_sdpa_under_autocast", "refuse_derivative", "resolve_impl", "sdpa_autocast", "sdpa_schema", "traceable",
           "triton_ops"]
