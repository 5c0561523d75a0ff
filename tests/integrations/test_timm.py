"""timm's vision models through the pass: every attention site rewritten to ``softmax``, outputs exact.

Each case builds a timm model with a tiny config and random weights, on both of timm's attention
paths — fused (``F.scaled_dot_product_attention``) and non-fused (the written-out
``softmax(q·kᵀ)·v``) — chosen with ``timm.layers.set_fused_attn`` while the model is built (timm
reads ``use_fused_attn()`` in each attention module's ``__init__``).  The model is compiled once with
the attnrewrite backend (``to="softmax"``, eager compiler) and checked, in this order:

1. the compiled output equals eager's (rtol 1e-5) — always, whatever was or was not rewritten: a
   site certified with a wrong output fails here, and this check is never expected to fail;
2. the rewritten sites are exactly the library's: one per attention module, at its module path,
   their number counted from timm's source (each case says where).  A miss the matcher does not
   handle yet is expected (strict xfail with ``raises=SitesMissed``, the reason quoted from the
   report), so the case flips to a failure the day the miss is fixed;
3. near misses (attention-like modules that are not ``softmax(q·kᵀ)·v``: talking heads, factorised
   attention, differential attention's combined maps) are not rewritten.  See docs/third_party.md.

Weights are redrawn after timm's init (``redraw_weights``): with std-0.02 weights and 1e-5 layer
scales a block's attention barely reaches the output, and a wrong site would pass the tolerance.

timm and torchvision live in ``.thirdparty/`` (``.ci/install``), outside the environment: this module
puts that folder on the path and makes torchvision importable first
(``attnrewrite.testing.thirdparty.use_thirdparty_dir``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import zlib
from dataclasses import dataclass, field
from typing import Callable

import pytest

from attnrewrite.testing.thirdparty import THIRDPARTY_DIR, use_thirdparty_dir

if not use_thirdparty_dir() and importlib.util.find_spec("timm") is None:
    raise ImportError(f"timm is not installed: `bash .ci/install` puts it (with torchvision) in {THIRDPARTY_DIR}")

import timm  # noqa: E402  (after the folder is on the path)
import timm.layers  # noqa: E402
import timm.layers.config  # noqa: E402
import torch  # noqa: E402
from timm.layers.attention import Attention as TimmAttention  # noqa: E402
from timm.layers.diff_attention import DiffAttention  # noqa: E402
from timm.models import cait, coat, efficientformer, eva, maxxvit, swin_transformer, xcit  # noqa: E402

from attnrewrite.testing.thirdparty import SitesMissed, module_paths, redraw_weights, run_rewritten  # noqa: E402

#: Batch size of the example images.
BATCH = 2


@contextlib.contextmanager
def attention_path(fused: bool):
    """Build timm modules on the fused (SDPA) or the written-out attention path; restores timm's setting."""
    previous = timm.layers.config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(fused, experimental=fused)  # experimental: XCA reads use_fused_attn(True)
    try:
        yield
    finally:
        timm.layers.config._USE_FUSED_ATTN = previous


@dataclass(frozen=True)
class Case:
    """One timm model.

    Attributes:
        id: the test id.
        build: returns the model (called inside :func:`attention_path`).
        sites: the number of attention sites, counted from timm's source (``source`` says how).
        attention: the module classes that hold the attention sites (``per_module`` each).
        source: where ``sites`` comes from in timm's source.
        near_misses: module classes holding attention-like computations that must not be rewritten.
        image: the side of the square example image (several: the model is run on each, compiled once).
        misses: ``{fused: reason}`` — the path on which some site is known not to be rewritten yet.
        paths: the attention paths the model has (``(True, False)``, or one where the flag changes nothing).
        per_module: attention sites in each module of ``attention``.
    """

    id: str
    build: Callable[[], torch.nn.Module]
    sites: int
    attention: tuple[type, ...]
    source: str
    near_misses: tuple[type, ...] = ()
    image: tuple[int, ...] = (32,)
    misses: dict[bool, str] = field(default_factory=dict)
    paths: tuple[bool, ...] = (True, False)
    per_module: int = 1


def _vit(**kw):
    return lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                                     embed_dim=32, num_heads=2, **kw)


def _maxxvit(block_type: tuple, nchw: bool):
    cfg = maxxvit.MaxxVitCfg(embed_dim=(16, 32)[: len(block_type)], depths=(1,) * len(block_type), block_type=block_type,
                             stem_width=8, transformer_cfg=maxxvit.MaxxVitTransformerCfg(
                                 dim_head=8, window_size=(4, 4), use_nchw_attn=nchw))
    return lambda: maxxvit.MaxxVit(cfg, img_size=32, num_classes=10)


CASES = [
    Case("vit", _vit(depth=2), 2, (TimmAttention,),
         "VisionTransformer builds `depth` Blocks, each with one Attention (one softmax(q·kᵀ)·v or one SDPA call)"),
    Case("vit-dynamic-size", _vit(depth=2, dynamic_img_size=True), 2, (TimmAttention,),
         "as vit; dynamic_img_size=True resamples the position embedding to each image size",
         image=(32, 48)),
    Case("swin", lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=32, patch_size=4, window_size=4,
        embed_dim=16, depths=(2,), num_heads=(2,)), 2, (swin_transformer.WindowAttention,),
         "SwinTransformerStage builds `depth` SwinTransformerBlocks, each with one WindowAttention; odd blocks shift "
         "the windows (shift_size = window_size // 2 on an 8×8 grid of 4×4 windows) and add the shift mask"),
    Case("eva-rope", lambda: timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2), 2, (eva.EvaAttention,),
         "Eva builds `depth` EvaBlocks, each with one EvaAttention; eva02 applies rotary embeddings to q and k"),
    Case("cait", lambda: timm.create_model(
        "cait_xxs24_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=1,
        num_heads=2, depth_token_only=1), 1, (cait.ClassAttn,),
         "Cait builds `depth` LayerScaleBlocks with TalkingHeadAttn (near misses: heads mixed before and after "
         "the softmax) and `depth_token_only` LayerScaleBlockClassAttn, each with one ClassAttn (class-token query)",
         near_misses=(cait.TalkingHeadAttn,)),
    Case("xcit", lambda: timm.create_model(
        "xcit_nano_12_p16_224", pretrained=False, num_classes=10, img_size=32, patch_size=16, embed_dim=32, depth=1,
        num_heads=2, cls_attn_layers=1), 2, (xcit.XCA, cait.ClassAttn),
         "Xcit builds `depth` XCABlocks, each with one XCA (softmax attention over channels: the token axis is "
         "the head dimension, per-head temperature as scale), and `cls_attn_layers` ClassAttentionBlocks, each "
         "with one ClassAttn (class-attention over [cls, tokens])"),
    Case("vit-diff-two-sdpa", _vit(depth=1, attn_layer="diff"), 2, (DiffAttention,),
         "fused DiffAttention calls SDPA twice (two attention maps, one per half of q and k), both sites",
         paths=(True,), per_module=2),
    Case("vit-diff-combined-maps", _vit(depth=1, attn_layer="diff"), 0, (),
         "written-out DiffAttention subtracts λ·(second softmax) from the first before the product with v: "
         "the probabilities are not attention weights of one site (near miss)",
         near_misses=(DiffAttention,), paths=(False,)),
    Case("coat-factorised", lambda: timm.create_model(
        "coat_lite_tiny", pretrained=False, num_classes=10, img_size=32, embed_dims=(16, 16, 16, 16),
        serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2)), 0, (),
         "CoaT-Lite's 4 serial blocks each hold one FactorAttnConvRelPosEnc: softmax of k over tokens, then "
         "q·(kᵀv) (factorised, no q·kᵀ scores): near misses, no attention site", near_misses=(coat.FactorAttnConvRelPosEnc,),
         paths=(False,)),
    Case("coatnet-nchw", _maxxvit(("C", "T"), nchw=False), 1, (maxxvit.Attention2d,),
         "a CoAtNet stack: stage 0 an MbConvBlock, stage 1 one TransformerBlock2d whose Attention2d works on "
         "NCHW maps (scores q.transpose(-2, -1) @ k, output v @ attn.transpose(-2, -1))"),
    Case("efficientformer", lambda: timm.create_model(
        "efficientformer_l1", pretrained=False, num_classes=10, depths=(1, 1, 1, 1), embed_dims=(8, 8, 16, 16),
        num_vit=1), 1, (efficientformer.Attention,),
         "EfficientFormer: conv (MetaBlock2d) stages, then in the last stage a Flat and `num_vit` MetaBlock1d, each "
         "with one Attention (token_mixer) adding learned attention biases for a fixed 7×7 grid (so 224-pixel "
         "images); the Attention has no fused path", image=(224,), paths=(False,)),
    Case("maxvit-nchw", _maxxvit(("M",), nchw=True), 2, (maxxvit.Attention2d,),
         "one MaxxVitBlock: an MbConvBlock, then block (window) and grid PartitionAttention2d, each with one "
         "Attention2d on NCHW partitions with a relative position bias"),
]


def _params():
    params = []
    for case in CASES:
        for fused in case.paths:
            marks = []
            if fused in case.misses:
                marks.append(pytest.mark.xfail(strict=True, raises=SitesMissed, reason=case.misses[fused]))
            params.append(pytest.param(case, fused, id=f"{case.id}-{'fused' if fused else 'written-out'}", marks=marks))
    return params


def _build(case: Case, fused: bool) -> torch.nn.Module:
    seed = zlib.crc32(case.id.encode())
    torch.manual_seed(seed)
    with attention_path(fused):
        model = redraw_weights(case.build().eval(), seed)  # timm's init would hide a wrong site (see there)
    paths = {m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    assert paths <= {fused}, f"{case.id}: attention modules on the wrong path: {paths}"
    return model


def _images(case: Case) -> list[dict]:
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.id}/images".encode()))
    return [{"x": torch.randn(BATCH, 3, side, side, generator=g)} for side in case.image]


@pytest.mark.parametrize("case,fused", _params())
def test_timm_model_is_rewritten_exactly(case: Case, fused: bool):
    model = _build(case, fused)
    expected = module_paths(model, *case.attention) * case.per_module
    near = module_paths(model, *case.near_misses)
    assert len(expected) == case.sites, (case.id, expected)  # the count taken from timm's source
    assert near or not case.near_misses, f"{case.id}: no near-miss module built"

    run = run_rewritten(model, _images(case))
    run.assert_exact()  # 1. never expected to fail
    run.assert_not_rewritten(near)  # 3.
    # 2. in every graph: with several image sizes Dynamo specialises on the size (timm's position-embedding
    # resampling reads it as an int; even dynamic=True recompiles, "size mismatch at index 2"), so each
    # size is a graph of its own and each must be rewritten whole.
    run.assert_sites_rewritten(expected, graphs=len(case.image))


def test_torchvision_is_importable_with_the_nms_schemas():
    """torchvision is importable here: its ops loaded, or the two schemas declared, as torchvision's
    C++ code declares them (a changed signature upstream would make its fake registrations fail again)."""
    import torchvision
    import torchvision.extension

    from attnrewrite.testing.thirdparty import TORCHVISION_SCHEMAS, make_torchvision_importable

    assert hasattr(torchvision, "ops")
    declared = make_torchvision_importable()  # idempotent: torchvision is imported already
    assert declared != torchvision.extension._has_ops()  # declared exactly when its C++ ops did not load
    for op, schema in TORCHVISION_SCHEMAS.items():
        assert str(getattr(torch.ops.torchvision, op).default._schema) == f"torchvision::{schema}"


def test_the_public_routes_agree_with_the_test_helper():
    """The cases above compile through ``attnrewrite.testing.thirdparty.run_rewritten``; the public routes
    — ``attnrewrite.explain`` and ``torch.compile(backend="attnrewrite")`` — see and do the same."""
    import attnrewrite

    case = next(c for c in CASES if c.id == "vit")
    model = _build(case, fused=False)
    images = _images(case)
    run = run_rewritten(model, images)
    report = attnrewrite.explain(model, images[0]["x"], to="softmax")
    assert [(s.status, s.module, s.spec) for s in report.sites] == [(s.status, s.module, s.spec) for s in run.report.sites]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnrewrite", options={"to": "softmax", "compiler": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(images[0]["x"]), run.outputs[0][0], rtol=0, atol=0)
