"""One rule for "this float-mask entry masks its key", the same in every dtype a mask is held in.

BERT writes a padded key as ``(1 − m) · −10000``; held in bfloat16 that is −9984 (8 significant bits), in
float16 and float32 exactly −10000.  The rule (:data:`attnrewrite.ir.spec.MASKED_SCORE`, mirrored in
:data:`attnrewrite.kernels.checks.MASKED_SCORE` for the kernels, which may not import the pass) must read
all of them as masked and no bias as masked — also once the mask is cast up to float32 (scores upcast for
the softmax, a bfloat16 mask added to float32 scores), where −9984 is no longer rounded back to −1e4.
"""

import pytest
import torch

from attnrewrite.ir import spec
from attnrewrite.kernels import checks
from attnrewrite.kernels.hashed import sparse, triton_ops
from attnrewrite.kernels.summary.op import key_valid_from_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_the_kernels_and_the_pass_share_one_threshold():
    assert checks.MASKED_SCORE == spec.MASKED_SCORE


@pytest.mark.parametrize("dtype", DTYPES)
def test_berts_padding_value_is_masked_in_every_dtype_and_a_bias_is_not(dtype):
    masked = torch.tensor([-10000.0, torch.finfo(dtype).min, float("-inf")]).to(dtype)
    bias = torch.tensor([-5000.0, -100.0, 0.0]).to(dtype)  # -5000: BERT's formula at m = 0.5
    for held_in in (dtype, torch.float32, torch.float64):
        assert bool((masked.to(held_in) <= spec.MASKED_SCORE).all()), (masked, held_in)
        assert not bool((bias.to(held_in) <= spec.MASKED_SCORE).any()), (bias, held_in)


def _bert_padding(dtype):
    """A BERT mask made in ``dtype``, then added to (here: cast to) float32 scores."""
    keep = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return keep.bool(), ((1 - keep.to(dtype)) * -10000.0).float()[:, None, None, :]  # [B, 1, 1, Tk]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernels_read_a_bert_mask_as_padding_in_every_dtype(dtype):
    keep, additive = _bert_padding(dtype)
    assert torch.equal(key_valid_from_mask(additive, 2, 5), keep)  # summary (raised "a float bias" in bf16)
    for mask_keep, bias in (sparse.mask_parts(additive, slice(0, 1), 1, 5), triton_ops.mask_views(additive)):
        assert torch.equal(mask_keep.bool().reshape(2, 5), keep)  # hashed: padding takes no top-k slot
        assert not bool(bias.any())
