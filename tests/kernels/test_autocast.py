"""SDPA's dtype contract for every kind's public op: inside ``torch.autocast`` the inputs are cast to
the autocast dtype (float64 excepted) and the output has it; outside autocast exactly the dtype mixes
SDPA accepts are accepted, and the ones it refuses raise its error type (RuntimeError)."""

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch.utils._python_dispatch import TorchDispatchMode

import attnrewrite
from attnrewrite import ops
from attnrewrite.kernels._ops import call_dtype, like_sdpa_under_autocast
from attnrewrite.kernels.summary.triton_op import interpreter_active
from attnrewrite.testing.numerics import assert_within_budget

KINDS = ("softmax", "sigmoid", "linear", "summary", "hashed")
# summary and hashed take Tq == Tk; every kind takes causal self-attention
SHAPE = (2, 4, 16, 8)


def _entry_points(kind):
    """The Python wrapper (attnrewrite.ops) and the registered op (torch.ops.attnrewrite)."""
    return {"ops": getattr(ops, f"{kind}_attention"),
            "torch.ops": getattr(torch.ops.attnrewrite, f"{kind}_attention")}


def _qkv(q_dtype, k_dtype, v_dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*SHAPE, generator=g).to(device=device, dtype=d) for d in (q_dtype, k_dtype, v_dtype))


MIXES = [  # (q, k, v): the HF Llama case (rotary leaves q, k in fp32, v in bf16), and others
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float32, torch.bfloat16),
    (torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float64),  # float64 is left alone by autocast, as by SDPA
]


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(str(d).removeprefix("torch.") for d in m))
@pytest.mark.parametrize("entry", ["ops", "torch.ops"])
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_output_dtype_is_sdpas(kind, entry, mix, autocast_dtype):
    q, k, v = _qkv(*mix)
    with torch.autocast("cpu", autocast_dtype):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = _entry_points(kind)[entry](q, k, v, None, 0.0, True)
    assert out.dtype == want.dtype
    assert out.shape == want.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_gradients_reach_the_fp32_inputs(kind):
    q, k, v = (t.requires_grad_() for t in _qkv(torch.float32, torch.float32, torch.bfloat16))
    with torch.autocast("cpu", torch.bfloat16):
        out = getattr(ops, f"{kind}_attention")(q, k, v, is_causal=True)
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == t.dtype


@pytest.mark.parametrize("mix", [(torch.float32, torch.float32, torch.bfloat16),
                                 (torch.float64, torch.float32, torch.float32),
                                 (torch.float16, torch.float16, torch.float32)])
@pytest.mark.parametrize("kind", KINDS)
def test_outside_autocast_mixed_dtypes_raise_sdpas_error_type(kind, mix):
    q, k, v = _qkv(*mix)
    with pytest.raises(RuntimeError) as sdpa_error:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name, fn in _entry_points(kind).items():
        with pytest.raises(type(sdpa_error.value)):
            fn(q, k, v, None, 0.0, True)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_beside_float32_is_refused_inside_autocast_as_by_sdpa(kind):
    """Autocast leaves float64 alone and casts float32: the mix that remains is refused by both."""
    q, k, v = _qkv(torch.float64, torch.float32, torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with pytest.raises(RuntimeError):
            getattr(ops, f"{kind}_attention")(q, k, v, is_causal=True)


@pytest.mark.parametrize("kind", KINDS)
def test_every_public_op_has_a_cuda_autocast_kernel(kind):
    """The CUDA rule is the CPU one on the AutocastCUDA key; checked here on machines without a GPU."""
    name = f"attnrewrite::{kind}_attention"
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_autocast_output_dtype_is_sdpas(kind):
    q, k, v = _qkv(torch.float32, torch.float32, torch.bfloat16, device="cuda")
    with torch.autocast("cuda", torch.float16):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = getattr(ops, f"{kind}_attention")(q, k, v, is_causal=True)
    assert out.dtype == want.dtype == torch.float16


def test_hf_llama_under_cpu_bf16_autocast_is_rewritten_to_sigmoid():
    """HF Llama's rotary embedding returns fp32 q/k beside a bf16 v under autocast; eager attention
    casts them through matmul, and the sigmoid op replacing it must take them as SDPA would."""
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 100, (2, 8))
    with torch.autocast("cpu", torch.bfloat16):
        report = attnrewrite.explain(model, input_ids=ids, to="sigmoid", options={"strict": True})
        compiled = torch.compile(model, backend="attnrewrite",
                                 options={"to": "sigmoid", "compiler": "eager", "strict": True})
        logits = compiled(input_ids=ids).logits
    assert len(report.rewritten) == cfg.num_hidden_layers and not report.skipped and not report.errors
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


# --------------------------------------------------------------------------- each path under autocast

#: the kinds whose public op has Triton kernels (``impl=``), with options that fit SHAPE, and the
#: operator that shows each path ran (the torch path of sliding_window is plain torch: no op of its own)
PATHS = {
    "sigmoid": ({}, {"triton": "sigmoid_attention_fwd_interpreted", "torch": "sigmoid_chunked_fwd"}),
    "summary": (dict(chunk_size=4, window_chunks=1),
                {"triton": "summary_attention_fwd_interpreted", "torch": "summary_attention_torch"}),
    "hashed": (dict(bits=16, top_k=3, window=3, sinks=1),
               {"triton": "hashed_attention_fwd_interpreted", "torch": "hashed_attention_torch"}),
    "sliding_window": (dict(window=5, sinks=1), {"triton": "sliding_window_attention_fwd_interpreted", "torch": None}),
}


class _Ops(TorchDispatchMode):
    """The ``attnrewrite`` operators that reach the dispatcher, with their first tensor argument's dtype."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "attnrewrite":
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.calls.append((func._opname, None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind", PATHS)
def test_each_path_runs_in_the_autocast_dtype(kind, impl):
    """Under CPU bf16 autocast, fp32 q/k beside a bf16 v: the path asked for runs on bf16 inputs, returns
    bf16, and is within the numerics rule of the float64 result (the torch path at bf16 as "plain")."""
    if impl == "triton" and not interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    options, ran = PATHS[kind]
    op = getattr(ops, f"{kind}_attention")
    q, k, v = _qkv(torch.float32, torch.float32, torch.bfloat16)
    recorder = _Ops()
    with torch.autocast("cpu", torch.bfloat16), recorder:
        out = op(q, k, v, is_causal=True, impl=impl, **options)
    assert out.dtype == torch.bfloat16
    names = [name for name, _ in recorder.calls]
    other = ran["torch" if impl == "triton" else "triton"]
    if ran[impl] is not None:
        assert (ran[impl], torch.bfloat16) in recorder.calls, recorder.calls
    assert other is None or other not in names, names
    plain = op(q.bfloat16(), k.bfloat16(), v, is_causal=True, impl="torch", **options)
    exact = op(q.double(), k.double(), v.double(), is_causal=True, impl="torch", **options)
    if impl == "torch":  # the same computation as on inputs cast by hand
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert_within_budget(out, plain, exact, torch.bfloat16, f"{kind} impl={impl}")


@pytest.mark.parametrize("kind", PATHS)
def test_auto_chooses_from_the_dtype_the_call_runs_in(kind):
    """On the CPU "auto" is the torch path whatever the dtype; the dtype it sees is the autocast one."""
    options, ran = PATHS[kind]
    q, k, v = _qkv(torch.float32, torch.float32, torch.float32)
    recorder = _Ops()
    with torch.autocast("cpu", torch.bfloat16), recorder:
        getattr(ops, f"{kind}_attention")(q, k, v, is_causal=True, impl="auto", **options)
    assert ran["triton"] not in [name for name, _ in recorder.calls]
    assert all(dtype in (None, torch.bfloat16) for _, dtype in recorder.calls), recorder.calls


def test_call_dtype_reports_the_autocast_dtype():
    x = torch.zeros(2)
    assert call_dtype(x) == torch.float32 and call_dtype(x.double()) == torch.float64
    with torch.autocast("cpu", torch.bfloat16):
        assert call_dtype(x) == torch.bfloat16 and call_dtype(x.double()) == torch.float64
        seen = like_sdpa_under_autocast("cpu", lambda a, b=None: (a.dtype, b.dtype, call_dtype(a)), x,
                                        b=x.half())
    assert seen == (torch.bfloat16, torch.bfloat16, torch.bfloat16)  # inside: cast, autocast off
