"""``python -m attnrewrite distill`` end to end on a tiny llama checkpoint, its bad input, and the
MiniLM corpus it shares with ``bench/distill_quality.py``."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from attnrewrite.__main__ import build_parser, main
from attnrewrite.targets.llama import Llama, LlamaConfig
from attnrewrite.targets.sentences import (CORPORA, HELDOUT_SENTENCES, distillation_sentences, docstring_sentences,
                                           grammar_sentences)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batches", "2", "--batch-size", "2", "--block-size", "16", "--transfer-steps", "3",
        "--finetune-steps", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained llama in examples/train_lm.py's ``--save`` format (config and weights)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=256, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=64,
                              max_seq_len=64))
    path = tmp_path_factory.mktemp("cli") / "tiny.pt"
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture
def distill_kwargs(monkeypatch):
    """The keyword arguments the CLI gives ``attnrewrite.distill`` (which still runs), filled in by its call."""
    import attnrewrite.distill_cli as cli

    given = {}
    real = cli.distill

    def spy(*args, **kwargs):
        given.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "distill", spy)
    return given


def _run(capsys, *argv):
    assert main(["distill", *argv]) == 0
    return capsys.readouterr().out


def test_the_cli_distils_a_checkpoint_and_writes_weights_that_load_into_a_converted_model(checkpoint, tmp_path, capsys):
    import attnrewrite

    out = tmp_path / "distilled.pt"
    text = _run(capsys, "--checkpoint", checkpoint, "--to", "sigmoid", "--stage", "transfer", "--out", str(out), *TINY)
    assert "stage transfer" in text and "{'learned': True}" in text
    for line in ("original:", "rewritten, not distilled:", "distilled ("):
        assert line in text and "validation loss" in text.split(line)[1].split("\n")[0], text
    saved = torch.load(out, weights_only=True)
    assert saved["to"] == "sigmoid" and saved["options"] == {"learned": True}
    # transfer alone trains the kind's per-site states, no adapters
    assert any("attnrewrite_" in name for name in saved["state_dict"])
    assert not any("lora" in name or "adapter" in name for name in saved["state_dict"]), list(saved["state_dict"])
    fresh_data = torch.load(checkpoint, weights_only=True)
    fresh = Llama(LlamaConfig(**fresh_data["config"]))
    fresh.load_state_dict(fresh_data["state_dict"])
    converted = attnrewrite.convert(fresh, "sigmoid", (torch.zeros(1, 16, dtype=torch.long),), **saved["options"])
    converted.load_state_dict(saved["state_dict"])


def test_the_cli_honours_stage_transfer_trains_the_states_finetune_the_model(checkpoint, tmp_path, capsys):
    original = torch.load(checkpoint, weights_only=True)["state_dict"]
    saved = {}
    for stage in ("transfer", "finetune"):
        out = tmp_path / f"{stage}.pt"
        assert f"stage {stage}" in _run(capsys, "--checkpoint", checkpoint, "--to", "sigmoid", "--stage", stage,
                                        "--out", str(out), *TINY)
        saved[stage] = torch.load(out, weights_only=True)["state_dict"]

    def base_changed(weights):  # the model's own weights (adapters are folded back into them)
        return [name for name, value in original.items() if not torch.equal(weights[name], value)]

    def states(weights):
        return {name: value for name, value in weights.items() if "attnrewrite_" in name}

    assert not base_changed(saved["transfer"]), "transfer changed the model's own weights"
    assert base_changed(saved["finetune"]), "finetune left the model's weights alone"
    moved = [name for name, value in states(saved["transfer"]).items()
             if not torch.equal(value, states(saved["finetune"])[name])]
    assert moved, "transfer left the per-site states where finetune (which does not train them) left them"


def test_the_cli_passes_transfer_loss_weights_on(checkpoint, capsys, distill_kwargs):
    given = distill_kwargs
    _run(capsys, "--checkpoint", checkpoint, "--to", "linear", "--stage", "transfer", "--transfer-loss", "weights",
         *TINY)
    assert given["transfer_loss"] == "weights" and given["stage"] == "transfer"


def test_the_cli_gives_the_kinds_seed_and_its_own_apart(checkpoint, capsys, distill_kwargs):
    """--option seed=N is the kind's (it raised "multiple values for 'seed'" beside --seed), --seed distill's."""
    given = distill_kwargs
    _run(capsys, "--checkpoint", checkpoint, "--to", "linear", "--stage", "transfer", "--option", "feature_map=hedgehog",
         "--option", "seed=5",
         "--seed", "2", *TINY)
    assert given["kind_options"]["seed"] == 5 and given["distill_seed"] == 2 and "seed" not in given


@pytest.mark.parametrize("argv, message", [
    (["--to", "no_such_kind"], "unknown attention kind 'no_such_kind'"),
    (["--to", "sigmoid", "--option", "no_such_option=1"], "unknown option(s) ['no_such_option'] for kind 'sigmoid'"),
    (["--to", "sigmoid", "--option", "learned"], "--option takes NAME=VALUE"),
    (["--to", "sigmoid", "--option", "learned=3"], "option 'learned' of kind 'sigmoid'"),
    (["--to", "sigmoid", "--corpus", "english"], "--corpus chooses MiniLM's sentences"),
    (["--to", "hashed", "--transfer-loss", "weights"], "--transfer-loss weights needs attention weights"),
])
def test_bad_input_is_named_before_any_training(checkpoint, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--checkpoint", checkpoint, *argv, *TINY])
    assert message in str(exc.value), exc.value


def test_an_unknown_corpus_or_stage_is_refused_by_the_parser(capsys):
    for argv in (["--corpus", "klingon"], ["--stage", "everything"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["distill", "--model", "minilm", "--to", "sigmoid", *argv])
        assert "invalid choice" in capsys.readouterr().err


# a tokenizer's vocabulary as word_sentences reads it (word -> frequency rank): 676 whole two-letter "words"
VOCAB = {a + b: rank for rank, (a, b) in enumerate((a, b) for a in "abcdefghijklmnopqrstuvwxyz"
                                                   for b in "abcdefghijklmnopqrstuvwxyz")}


def test_the_english_corpus_is_half_grammar_a_quarter_docstrings_and_clear_of_the_held_out_sentences():
    sentences = distillation_sentences("english", 40, VOCAB)
    assert len(sentences) == 40
    assert sentences[:20] == grammar_sentences(20, seed=0)
    assert sentences[20:30] == docstring_sentences(10, seed=0)
    assert not set(sentences) & set(HELDOUT_SENTENCES)
    with pytest.raises(ValueError, match="unknown distillation corpus 'klingon'"):
        distillation_sentences("klingon", 8, VOCAB)


def test_the_bench_and_the_cli_use_the_one_corpus_definition(monkeypatch):
    bench = _bench()
    assert bench.distillation_sentences is distillation_sentences and bench.CORPORA is CORPORA
    corpus = next(a for a in build_parser()._subparsers._group_actions[0].choices["distill"]._actions
                  if a.dest == "corpus")
    assert tuple(corpus.choices) == CORPORA and corpus.default is None  # None: english for MiniLM

    import attnrewrite.distill_cli as cli
    import attnrewrite.demo as demo
    asked = []

    class Stop(Exception):
        pass

    def fake_sentences(corpus, count, vocabulary):
        asked.append((corpus, count))
        raise Stop

    monkeypatch.setattr("attnrewrite.targets.sentences.distillation_sentences", fake_sentences)
    monkeypatch.setattr(demo, "load_minilm", lambda: (type("Tok", (), {"get_vocab": lambda self: VOCAB})(),
                                                      torch.nn.Identity()))
    for given, used in ((None, "english"), ("mixed", "mixed")):
        args = build_parser().parse_args(["distill", "--model", "minilm", "--to", "sigmoid", "--batches", "3",
                                          "--batch-size", "4"] + (["--corpus", given] if given else []))
        with pytest.raises(Stop):
            cli._minilm(args, {})
    assert asked == [("english", 12), ("mixed", 12)]


def _bench():
    spec = importlib.util.spec_from_file_location("distill_quality", ROOT / "bench" / "distill_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_bench_plans_its_rows_in_the_tables_order_and_refuses_unknown_ones():
    bench = _bench()
    args = bench.build_parser().parse_args(["--rows", "finetune only,before,after both", "--jobs", "2"])
    assert bench.planned_rows(args) == [("sigmoid", "before"), ("sigmoid", "after both"), ("sigmoid", "finetune only"),
                                        ("linear", "before"), ("linear", "after both"), ("linear", "finetune only")]
    args = bench.build_parser().parse_args(["--kinds", "linear", "--features", "64", "--no-key-gate"])
    assert [name for _, name in bench.planned_rows(args)] == list(bench.ROWS)
    setting = bench.chosen_settings(args)["linear"]
    assert setting["features"] == 64 and setting["key_gate"] is False
    assert setting["transfer_steps"] == bench.KIND_DEFAULTS["linear"]["transfer_steps"]
    assert bench.kind_options("linear", {"feature_map": "hedgehog"}, setting) == {"feature_map": "hedgehog",
                                                                                   "features": 64}
    with pytest.raises(SystemExit, match="unknown rows \\['after all'\\]"):
        bench.planned_rows(bench.build_parser().parse_args(["--rows", "before,after all"]))
    with pytest.raises(SystemExit, match="--jobs must be at least 1"):
        bench.main(["--jobs", "0"])
