"""The package's own reference models as rewrite targets: every site found, certified, rewritten to
the exact kind, outputs and gradients equal; and the other kinds rewrite what they can honour."""

import pytest
import torch

from attnrewrite.targets import llama
from attnrewrite.testing.checks import compile_rewritten
from attnrewrite.testing.targets import NAMES, build


@pytest.mark.parametrize("name", NAMES)
def test_target_specs(name):
    """The zoo (tests/patterns/test_zoo.py) proves every target rewritten with equal outputs and
    gradients; here: that each site's spec says what the model's code does."""
    import attnrewrite

    model, inputs, expected = build(name)
    report = attnrewrite.explain(model.eval(), **inputs)
    assert report.sites and all(s.status == "rewritten" for s in report.sites), report
    for site in report.sites:
        for key, value in expected.items():
            assert site.spec[key] == value, (site.module, key, site.spec)


@pytest.mark.parametrize("name,kind,rewritten", [
    ("llama", "sigmoid", True), ("llama", "linear", True),
    ("vit", "linear", True),  # bidirectional, no mask
    ("singlecell", "linear", True),  # key padding through masked_fill
    ("bert", "linear", True),  # BERT's additive (1 - m)·min bias: key padding, its values checked per call
])
def test_other_kinds_on_targets(name, kind, rewritten):
    from attnrewrite.rewriter.report import Report

    model, inputs, _ = build(name)
    report = Report()
    out = compile_rewritten(model.eval(), report, to=kind)(**inputs)
    assert torch.isfinite(out).all()
    assert bool(report.rewritten) == rewritten, report
    if not rewritten:
        assert all("additive bias" in s.reason for s in report.attention_sites())


@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_growing_lengths_recompile_cleanly(kind):
    """Sampling without a cache grows the sequence: automatic dynamic shapes make the lengths
    symbolic, and the rewritten graph must still get its example values (strict: no site lost)."""
    import attnrewrite

    torch.manual_seed(0)
    model = llama.Llama.from_name("tiny").eval()
    attnrewrite.rewrite(model, to=kind, compiler="eager", strict=True)
    tokens = torch.randint(0, model.config.vocab_size, (1, 90))
    before = {id(r) for r in attnrewrite.recent_reports()}  # the log keeps 64: compare identities
    with torch.no_grad():
        for t in (60, 61, 62, 63, 66, 70, 75, 80, 90):  # crosses the linear path's 64-token chunk
            assert torch.isfinite(model(tokens[:, :t])).all()
    # One static compile, then one dynamic graph per regime of the op (the linear path has two:
    # shorter and longer than its chunk). A kind whose op specialised the length would compile per
    # length, and past Dynamo's recompile limit silently run the original (softmax) code.
    compiles = sum(id(r) not in before for r in attnrewrite.recent_reports())
    assert compiles <= 3, f"{compiles} compiles for 9 lengths"
