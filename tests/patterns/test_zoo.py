"""Every model of the zoo, rewritten to the exact kind: all sites found and rewritten, outputs and
gradients equal to the original's (fp32).  Generated from ``attnrewrite.testing.zoo.ZOO``.

Ids are ``<family>-<impl>-<kind>`` (``llama-eager-softmax``).  A site the zoo expects not to be
rewritten is data in its entry (``expected_skips``, with the reason) and becomes a strict xfail
here; nothing is skipped.  Only the exact kind is compared with the original model: other kinds
compute something else by design.
"""

import pytest
import torch
import transformers

from attnrewrite.testing import zoo as hf_zoo
from attnrewrite.testing.checks import check_rewrite

torch.set_grad_enabled(True)

#: Kinds whose output must equal the original model's.
EXACT_KINDS = ("softmax",)

#: The families the issue names; the zoo must hold each of them.
REQUIRED_FAMILIES = {"llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "gpt2", "gpt_neox", "opt", "bloom",
                     "falcon", "bert", "roberta", "distilbert", "albert", "electra", "t5", "bart", "whisper", "vit",
                     "clip", "swin", "nn_transformer"}


def _cases() -> list:
    cases = []
    for entry in hf_zoo.ZOO:
        for kind in EXACT_KINDS:
            marks = []
            if kind in entry.expected_skips:
                marks.append(pytest.mark.xfail(strict=True, reason=entry.expected_skips[kind]))
            cases.append(pytest.param(entry, kind, id=f"{entry.id}-{kind}", marks=marks))
    return cases


@pytest.mark.parametrize("entry,kind", _cases())
def test_zoo_model_is_rewritten_exactly(entry, kind):
    torch.manual_seed(0)
    model = entry.build()
    # check_rewrite: site count, every site rewritten, output and every parameter gradient within
    # rtol 1e-5 — each gradient against its own scale, floored at 1e-2 of the largest gradient,
    # because some gradients (key biases: softmax ignores a shift of a score row) are exactly zero
    # in exact arithmetic and hold only rounding noise.
    report = check_rewrite(model, entry.example_inputs(), expected_sites=entry.sites, output=entry.pick_output,
                           to=kind, compiler="eager")
    assert {s.kind for s in report.attention_sites()} == {kind}, report


def test_zoo_covers_the_families_and_their_attention_implementations():
    families = {e.family for e in hf_zoo.ZOO}
    assert REQUIRED_FAMILIES <= families, sorted(REQUIRED_FAMILIES - families)
    ids = [e.id for e in hf_zoo.ZOO]
    assert len(ids) == len(set(ids)), "zoo ids must be unique"
    for entry in hf_zoo.HF_ENTRIES:  # both attention implementations wherever the model has sdpa
        model_class = getattr(transformers, entry.hf_class)
        impls = {e.impl for e in hf_zoo.HF_ENTRIES if e.family == entry.family}
        want = {"eager", "sdpa"} if model_class._supports_sdpa else {"eager"}
        assert impls == want, (entry.family, impls, want)


def test_zoo_inputs_hold_a_padding_mask_wherever_the_model_takes_one():
    import inspect

    for entry in hf_zoo.ZOO:
        inputs = entry.example_inputs()
        masks = [v for k, v in inputs.items() if "mask" in k]
        takes_mask = any("mask" in name for name in inspect.signature(entry.build().forward).parameters)
        if entry.family in ("vit", "swin") or not takes_mask:
            continue  # images, or a model without a padding-mask argument
        assert masks, f"{entry.id} has no padding mask"
        assert any(bool((m == 0).any()) if m.dtype != torch.bool else bool(m.any()) for m in masks), entry.id
