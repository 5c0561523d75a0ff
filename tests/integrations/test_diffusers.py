"""diffusers' models through the pass: every attention site rewritten to ``softmax``, outputs exact.

Three models with tiny configs and random weights: a UNet with cross-attention to text states
(``UNet2DConditionModel``, with a key-padding mask on the text), a DiT (``DiTTransformer2DModel``)
and a VAE whose encoder and decoder mid-blocks hold one attention each (``AutoencoderKL``).  Each on
both of diffusers' attention processors: ``AttnProcessor2_0`` (the default, one
``F.scaled_dot_product_attention`` call) and ``AttnProcessor`` (written out: ``baddbmm`` scores,
``softmax``, ``bmm`` with the values), set on every ``Attention`` module.

Compiled once with the attnrewrite backend (``to="softmax"``, eager compiler), each case checks,
in this order: the compiled output equals eager's (rtol 1e-5; never expected to fail); the rewritten
sites are exactly the model's ``Attention`` modules, their number counted from diffusers' source
(each case says where); and the report names each site by its ``named_modules()`` path.  diffusers
keeps its blocks in a dict-backed container that Dynamo reaches through ``__dict__._modules``; the
report cleans those segments away, so the paths read ``down_blocks.0…`` as ``named_modules()`` does.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import diffusers
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from attnrewrite.testing.thirdparty import module_paths, redraw_weights, run_rewritten

BATCH = 2


def _unet() -> torch.nn.Module:
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


def _unet_inputs(g: torch.Generator) -> dict:
    text_mask = torch.ones(BATCH, 5)
    text_mask[1, 3:] = 0  # the second prompt is two tokens shorter: cross-attention masks its padding
    return {"sample": torch.randn(BATCH, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 7]),
            "encoder_hidden_states": torch.randn(BATCH, 5, 16, generator=g), "encoder_attention_mask": text_mask}


def _dit() -> torch.nn.Module:
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, norm_num_groups=8, num_embeds_ada_norm=10)


def _dit_inputs(g: torch.Generator) -> dict:
    return {"hidden_states": torch.randn(BATCH, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 7]),
            "class_labels": torch.tensor([1, 4])}


def _vae() -> torch.nn.Module:
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(16,), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)


def _vae_inputs(g: torch.Generator) -> dict:
    # sample_posterior=False (the default): the latent is the posterior's mode, no sampling noise
    return {"sample": torch.randn(BATCH, 3, 16, 16, generator=g)}


@dataclass(frozen=True)
class Case:
    """One diffusers model: ``sites`` attention sites, one per ``Attention`` module, counted from the source."""

    id: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], dict]
    sites: int
    source: str


CASES = [
    Case("unet-cross-attention", _unet, _unet_inputs, 8,
         "UNet2DConditionModel: the CrossAttnDownBlock2D holds layers_per_block=1 Transformer2DModel, the "
         "UNetMidBlock2DCrossAttn 1, the CrossAttnUpBlock2D layers_per_block + 1 = 2; each Transformer2DModel one "
         "BasicTransformerBlock with attn1 (self) and attn2 (cross, to the text states): 4 × 2 = 8"),
    Case("dit", _dit, _dit_inputs, 2,
         "DiTTransformer2DModel: num_layers=2 BasicTransformerBlocks, each with attn1 only (no cross-attention "
         "dim, so no attn2)"),
    Case("vae-mid-block", _vae, _vae_inputs, 2,
         "AutoencoderKL: the Encoder's and the Decoder's UNetMidBlock2D each hold one Attention (add_attention "
         "defaults to True), the down and up blocks none"),
]

PROCESSORS = {"sdpa": AttnProcessor2_0, "written-out": AttnProcessor}


def _params():
    return [pytest.param(case, processor, id=f"{case.id}-{processor}") for case in CASES for processor in PROCESSORS]


@pytest.mark.parametrize("case,processor", _params())
def test_diffusers_model_is_rewritten_exactly(case: Case, processor: str):
    seed = zlib.crc32(case.id.encode())
    torch.manual_seed(seed)
    model = redraw_weights(case.build().eval(), seed)  # e.g. zero-initialised projections would hide a wrong site
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    for module in attention:
        module.set_processor(PROCESSORS[processor]())
    expected = module_paths(model, Attention)
    assert len(expected) == case.sites, (case.id, expected)  # the count taken from diffusers' source

    inputs = case.inputs(torch.Generator().manual_seed(zlib.crc32(f"{case.id}/inputs".encode())))
    run = run_rewritten(model, [inputs], output=lambda out: out.sample)
    run.assert_exact()  # never expected to fail
    run.assert_sites_rewritten(expected)
    run.assert_module_paths_clean()
