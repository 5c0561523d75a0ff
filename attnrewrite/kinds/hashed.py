"""The ``hashed`` kind: how the rewriter uses ``attnrewrite::hashed_attention`` (:mod:`attnrewrite.kernels.hashed.public`).

Hashed attention (after DASH-KV) gives queries and keys binary codes from two projections
(asymmetric), and lets each query attend — exact softmax — only to the first ``sinks`` keys, the
last ``window`` keys and the ``top_k`` other keys whose codes agree best with its own.  Decoding
stores the keys' codes bit-packed next to the keys and values (:class:`attnrewrite.HashedCache`):
a step scores all T keys with XOR/popcount on T·bits/8 bytes per head and then reads only the
selected keys and values.

A site can be rewritten to ``hashed`` when it is causal self-attention whose other mask parts are
the same for every head (bool masks and additive biases are honoured: the selection never picks a
masked key, and a bias is added to the selected keys' scores), without dropout; a score modification
with a program (:mod:`attnrewrite.ir.score_program`) is applied to the selected keys' scores before the
mask (the selection reads codes, not scores; the Triton kernels and the torch path apply any program, the
kernels a chain of nonlinear steps through a generated score function), as a decoding step through
``HashedCache``, which runs the site's own code, applies it.  A bias that differs across heads is read
by distance when it is proven to be one: a relative position bias R[h, j − i] (T5's buckets, a table by
clamped distance) reaches the op as the table R [Hq, Tq + Tk − 1] (``position="relative"``), recomputed
from the model's own nodes, and ALiBi as its slopes; the op adds R[h, j − i] to each selected key's score
(the torch path and the Triton kernels gather it per selected key, and R gets its gradient), never a
[H, T, T] tensor.  Other sites are skipped with the reason.  Returned attention weights are not
supplied (such sites are skipped).
"""

from __future__ import annotations

from typing import Any

import torch

import attnrewrite.kernels.hashed.public  # noqa: F401 — registers attnrewrite::hashed_attention
from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.spec import AttentionSpec
from attnrewrite.kernels.hashed.op import FAR_DTYPES, HASHES, TRITON_FAR_DTYPES
from attnrewrite.kernels.hashed.state import HashProjections
from attnrewrite.kinds.causal import applied_score_mod, causal_self_attention_reason, term_shape
from attnrewrite.kinds.options import Option, impl_choice, integer, one_of
from attnrewrite.kinds.registry import Kind, register


# --------------------------------------------------------------------------- the kind


def far_dtype_option() -> Option:
    """``far_dtype``: None (off) or a name from :data:`~attnrewrite.kernels.hashed.op.FAR_DTYPES`."""
    accepts = "None or one of " + ", ".join(repr(name) for name in FAR_DTYPES)

    def check(value):
        if value is None:
            return None
        if not isinstance(value, str):
            return TypeError, f"a {type(value).__name__}, not a dtype name"
        return None if value in FAR_DTYPES else (ValueError, "not a far dtype")

    return Option(None, accepts, check)


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    if options.get("impl") == "triton" and options.get("far_dtype") not in (None, *TRITON_FAR_DTYPES):
        return (f"impl='triton' with far_dtype={options['far_dtype']!r} (the Triton kernels round far keys through "
                f"{TRITON_FAR_DTYPES} only; impl='auto' or 'torch' runs it on the torch path)")
    reason, spec = applied_score_mod(spec, options)  # applied by the op; the rest as for any site
    if reason is not None:
        return reason
    reason = causal_self_attention_reason(spec, "hashed")
    if reason is not None:
        return reason
    for term in spec.bias:
        if term.kind not in ("position", "relative") and term_shape(term)[1] != 1:  # (those two: by distance)
            return ("a mask that differs across heads (the heads of a group share one selection of keys; only a bias "
                    "proven to be R[h, j − i] or ALiBi is read per head)")
    return None


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    q_projection = k_projection = None
    if options["hash"] == "learned":
        projections = state(call.q)
        q_projection, k_projection = projections[0], projections[1]
    return torch.ops.attnrewrite.hashed_attention(
        call.scaled_q(), call.k, call.v, call.attn_mask, 0.0, True, call.scale, call.enable_gqa,
        bits=options["bits"], top_k=options["top_k"], window=options["window"], sinks=options["sinks"],
        hash=options["hash"], q_projection=q_projection, k_projection=k_projection, seed=options["seed"],
        score_mod=call.score_program, far_dtype=options.get("far_dtype"), impl=options["impl"],
        position_slopes=call.position_slopes, position=call.position)


def make_state(spec: AttentionSpec, options: dict[str, Any]):
    if options["hash"] != "learned":
        return None
    from attnrewrite.patterns.layout import ref_shape

    q_shape, k_shape = ref_shape(spec.q), ref_shape(spec.k)
    return HashProjections(q_shape[-3], k_shape[-3], q_shape[-1], options["bits"], options["seed"])


KIND = register(Kind(
    name="hashed",
    emit=emit,
    supports=supports,
    options={
        "bits": integer(64, minimum=8, multiple_of=8),
        "top_k": integer(256, minimum=0),
        "window": integer(64, minimum=0),
        "sinks": integer(4, minimum=0),
        "hash": one_of("random", HASHES),
        "seed": integer(0, minimum=0),
        "impl": impl_choice("auto"),
        "far_dtype": far_dtype_option(),
    },
    description="hashed attention: exact softmax over sinks, a recent window and the top-k keys by code agreement",
    make_state=make_state,
    expected_skips={target: "not causal self-attention" for target in ("bert", "vit", "singlecell")},
    score_mod=True,  # applies call.score_program when the modification has one (supports says why not)
    position_bias=True,  # adds ALiBi (call.position_slopes) to the selected keys' scores, read as slope_h · d
    shift_invariant=True,  # a softmax over each query's keys: an ALiBi offset's row constant cancels
    relative_bias=True,  # reads a relative bias R[h, j − i] (T5) per selected key (position="relative")
    example_options={"top_k": 2, "window": 2, "sinks": 1},
))
