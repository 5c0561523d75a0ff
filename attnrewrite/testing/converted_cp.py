"""Context parallelism of converted models: the llama target converted by :func:`attnrewrite.convert` (learned
per-site states), its sequence sharded by :func:`attnrewrite.distributed.context_parallel`, against the
single-process run of the same model *rewritten* by the pass (``attnrewrite.rewrite``, strict).

A compiled graph cannot run inside the manager (Dynamo guards on its torch-function mode, see the manager's
docstring), so inside it each layer's attention calls :func:`attnrewrite.converted_attention` — the op the
rewrite emits, with the layer's converted state applied by the kind's own ``emit`` — and the states reach the
context-parallel ops as their tensor arguments.  Each case checks the logits, the gradient of every weight
and every learned state (each rank's share, summed over the ranks), then 3 AdamW steps; no call may fall back
to the all-gather of K/V.  The suite runs in the processes of :func:`attnrewrite.testing.distributed.run_suite`
(``run_suite("attnrewrite.testing.converted_cp:converted_cases")``).
"""

from __future__ import annotations

import copy
import warnings
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

import attnrewrite
from attnrewrite.distributed import context_parallel
from attnrewrite.distributed.layout import shard
from attnrewrite.targets.llama import Attention, Llama, LlamaConfig, apply_rope

T, B = 32, 2

#: label → (kind, options): every kind with learned per-site states, sized so that T = 32 uses the kind's
#: structure (several summary chunks, a real top-k selection); llama/tiny has 4 query heads over 2 KV heads.
CONVERTED_KINDS: dict[str, tuple[str, dict]] = {
    "sigmoid-learned": ("sigmoid", {"learned": True}),
    "linear-hedgehog": ("linear", {"feature_map": "hedgehog"}),
    "summary-learned": ("summary", {"summary": "learned", "chunk_size": 4, "window_chunks": 1}),
    "hashed-learned": ("hashed", {"hash": "learned", "top_k": 3, "window": 2, "sinks": 1}),
}


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


class _CausalAttention(Attention):
    """The llama attention's projections and rotary embedding around :meth:`attend` (causal on the global
    positions, grouped kv heads)."""

    reads_mask = False  # causal on the global positions (is_causal=True): no [T, T] mask of the shard

    def attend(self, q, k, v):
        raise NotImplementedError

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        out = self.attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class ConvertedAttention(_CausalAttention):
    """The llama attention with its softmax replaced by the converted site's attention, called eagerly
    (same weights, same names, the converted state where :func:`attnrewrite.convert` attached it)."""

    kind: str = "softmax"
    options: dict = {}

    def attend(self, q, k, v):
        return attnrewrite.converted_attention(self, q, k, v, self.kind, is_causal=True, scale=self.head_dim ** -0.5,
                                               enable_gqa=True, **self.options)


def converted_llama(label: str) -> Llama:
    """llama/tiny in float64, seeded by ``label``, converted to the label's kind; the learned states are moved off
    their initial values (a state the sharded run dropped would then show, and no gradient is zero by symmetry)."""
    kind, options = CONVERTED_KINDS[label]
    torch.manual_seed(_seed(label))
    model = Llama(LlamaConfig.from_name("tiny")).double()
    attnrewrite.convert(model, kind, (torch.zeros(1, T, dtype=torch.long),), **options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attnrewrite_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(_seed(name)), dtype=p.dtype))
    return model


def eager_attention(model: Llama, kind: str, options: dict) -> Llama:
    """Each layer's attention becomes a :class:`ConvertedAttention` of ``kind`` (in place)."""
    cls = type(f"ConvertedAttention_{kind}", (ConvertedAttention,), {"kind": kind, "options": options})
    for layer in model.layers:
        layer.attention.__class__ = cls
    return model


def _assert_step_matches(label: str, logits, ref_logits, sharded, reference, rank: int, world: int) -> None:
    """This rank's logits are its shard of the single-process run's, and every weight's and learned state's
    gradient (shares already summed over the ranks) is the single-process one; a state's gradient is not zero."""
    assert_close(logits, shard(ref_logits.detach(), 1, rank, world), msg=lambda m: f"{label} logits: {m}")
    for (name, mine), theirs in zip(sharded.named_parameters(), reference.parameters()):
        assert_close(mine.grad, theirs.grad, msg=lambda m, n=name: f"{label}: d{n}: {m}")
        if "attnrewrite_" in name:
            assert theirs.grad.abs().max() > 0, f"{label}: d{name} is zero"


def _assert_weights_match(label: str, sharded, reference, steps: int) -> None:
    """Every parameter, learned states among them, equals the single-process run's after the same AdamW steps."""
    for (name, mine), theirs in zip(sharded.named_parameters(), reference.parameters()):
        assert_close(mine, theirs, msg=lambda m, n=name: f"{label}: {n} after {steps} AdamW steps: {m}")


def _converted_case(label: str):
    kind, options = CONVERTED_KINDS[label]

    def case(mesh):
        from attnrewrite.testing.distributed import _no_kv_all_gather

        torch._dynamo.reset()  # each case compiles llama's forward again (its own kind)
        rank, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
        model = converted_llama(label)
        states = sorted(name for name, _ in model.named_parameters() if "attnrewrite_" in name)
        assert states, f"{label}: convert attached no learned state"
        reference = attnrewrite.rewrite(copy.deepcopy(model), to=kind, compiler="eager", strict=True, **options)
        sharded = eager_attention(copy.deepcopy(model), kind, options)
        g = torch.Generator().manual_seed(_seed(label) + 1)
        batches = [torch.randint(0, 256, (B, T + 1), generator=g) for _ in range(3)]
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        cp_opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
        for step, batch in enumerate(batches):
            x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            ref_opt.zero_grad()
            ref_logits = reference(x)
            F.cross_entropy(ref_logits.flatten(0, 1), y.flatten()).backward()
            report = attnrewrite.recent_reports()[-1]
            assert report.rewritten and not report.skipped, report
            cp_opt.zero_grad()
            xs, ys, positions = x.clone(), y.clone(), torch.arange(T)
            with context_parallel(mesh, buffers=[xs, ys, positions], buffer_seq_dims=[1, 1, 0]), _no_kv_all_gather():
                logits = sharded(xs, positions=positions)
                loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum") / (B * T)
                loss.backward()
            for p in sharded.parameters():  # replicated parameters, learned states among them: sum the shares
                dist.all_reduce(p.grad, group=group)
            if step == 0:
                _assert_step_matches(label, logits, ref_logits, sharded, reference, rank, world)
            ref_opt.step()
            cp_opt.step()
        _assert_weights_match(label, sharded, reference, len(batches))

    return case


def _not_converted_case(mesh):
    """Learned options on a model that was not converted raise, naming the kind and what to do; so do options
    other than those the model was converted with.  Never a silent run without the learned state."""
    from attnrewrite.testing.distributed import _raises

    torch.manual_seed(0)
    plain = eager_attention(Llama(LlamaConfig.from_name("tiny")).double(), "sigmoid", {"learned": True})
    x, positions = torch.randint(0, 256, (B, T)), torch.arange(T)
    with context_parallel(mesh, buffers=[x, positions], buffer_seq_dims=[1, 0]):
        _raises(ValueError, "needs per-site parameters", lambda: plain(x, positions=positions))
    model = eager_attention(converted_llama("summary-learned"), "summary",
                            {"summary": "learned", "chunk_size": 8, "window_chunks": 1})
    with context_parallel(mesh, buffers=[x, positions], buffer_seq_dims=[1, 0]):
        _raises(ValueError, "made for", lambda: model(x, positions=positions))


class SdpaAttention(_CausalAttention):
    """The llama attention spelled as HF's SDPA path spells it (``F.scaled_dot_product_attention``, causal by
    ``is_causal``, GQA by ``enable_gqa``): what ``torch.compile(backend="attnrewrite")`` finds and rewrites."""

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def compiled_converted_llama(label: str) -> Llama:
    """llama/tiny (float64, seeded by ``label``) with :class:`SdpaAttention`, converted to the label's kind, the
    learned states moved off their initial values (as :func:`converted_llama`)."""
    kind, options = CONVERTED_KINDS[label]
    torch.manual_seed(_seed(label))
    model = Llama(LlamaConfig.from_name("tiny")).double()
    for layer in model.layers:
        layer.attention.__class__ = SdpaAttention
    attnrewrite.convert(model, kind, (torch.zeros(1, T, dtype=torch.long),), **options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attnrewrite_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(_seed(name)), dtype=p.dtype))
    return model


def _compiled_converted_case(label: str, compiled_outside_first: bool):
    """``torch.compile(converted, backend="attnrewrite")`` run inside ``context_parallel`` (Dynamo compiles it again
    there, through the manager's mode; the backend routes the rewritten graph's attention back to the manager), against
    the single-process run of the same compiled model on the whole sequence: logits, the gradients of every weight and
    learned state (summed over the ranks), two AdamW steps (the second reuses the graph compiled inside)."""
    kind, options = CONVERTED_KINDS[label]

    def case(mesh):
        from attnrewrite.testing.distributed import _no_kv_all_gather

        torch._dynamo.reset()
        rank, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
        model = compiled_converted_llama(label)
        backend_options = {"to": kind, "strict": True, **options}
        reference = torch.compile(copy.deepcopy(model), backend="attnrewrite",
                                  options={**backend_options, "compiler": "eager"})
        sharded_model = copy.deepcopy(model)
        # compiled outside first: with the eager compiler (inductor there would cost minutes); compiled inside only:
        # the default compiler, inductor, which the manager cannot host (the graph runs uncompiled, with a warning)
        sharded = torch.compile(sharded_model, backend="attnrewrite",
                                options={**backend_options, "compiler": "eager"} if compiled_outside_first
                                else backend_options)
        g = torch.Generator().manual_seed(_seed(label) + 2)
        batches = [torch.randint(0, 256, (B, T + 1), generator=g) for _ in range(2)]
        if compiled_outside_first:  # a graph compiled outside the manager: its guard on the mode stack fails inside
            with torch.no_grad():
                sharded(batches[0][:, :-1].contiguous())
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        cp_opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
        for step, batch in enumerate(batches):
            x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            ref_opt.zero_grad()
            ref_logits = reference(x)
            F.cross_entropy(ref_logits.flatten(0, 1), y.flatten()).backward()
            cp_opt.zero_grad()
            xs, ys, positions = x.clone(), y.clone(), torch.arange(T)
            seen = len(attnrewrite.recent_reports())
            with context_parallel(mesh, buffers=[xs, ys, positions], buffer_seq_dims=[1, 1, 0]), _no_kv_all_gather(), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                logits = sharded(xs, positions=positions)
                loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum") / (B * T)
                loss.backward()
            inside = attnrewrite.recent_reports()[seen:]
            if step == 0 and not compiled_outside_first:
                assert any("runs uncompiled" in str(w.message) for w in caught), [str(w.message) for w in caught]
            if step == 0:  # compiled inside, every site rewritten with its state; the second step reuses that graph
                assert sum(len(r.rewritten) for r in inside) == len(model.layers), inside
                assert not any(r.skipped for r in inside), inside
            else:
                assert not any(r.rewritten for r in inside), f"{label}: compiled again in step 2: {inside}"
            for p in sharded.parameters():  # replicated parameters, learned states among them: sum the shares
                dist.all_reduce(p.grad, group=group)
            _assert_step_matches(label, logits, ref_logits, sharded_model, reference, rank, world)
            ref_opt.step()
            cp_opt.step()
        _assert_weights_match(label, sharded_model, reference, len(batches))

    return case


#: the kinds whose compiled converted model runs inside the manager in the suite (the others as above, eagerly)
COMPILED_KINDS = ("sigmoid-learned", "linear-hedgehog")


def converted_cases():
    """Every kind with learned states × (outputs, gradients, 3 AdamW steps), and the refusals."""
    return [*((f"converted-{label}", _converted_case(label)) for label in CONVERTED_KINDS),
            ("converted-refusals", _not_converted_case)]


def compiled_converted_cases():
    """A compiled converted llama inside the manager (sigmoid compiled outside first, then inside)."""
    return [(f"compiled-converted-{label}", _compiled_converted_case(label, compiled_outside_first=index == 0))
            for index, label in enumerate(COMPILED_KINDS)]
