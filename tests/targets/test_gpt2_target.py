"""attnrewrite.targets.gpt2: both attention paths, gradients, compile, HF parity."""

import pytest
import torch
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel

from attnrewrite.targets.gpt2 import GPT2, GPT2Config

IMPLS = ("eager", "sdpa")


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_tiny_forward_and_backward(attn_impl, check_gradients):
    model = GPT2.from_name("tiny", attn_impl=attn_impl)
    tokens = torch.randint(0, 256, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, 256)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    check_gradients(model)


def test_eager_and_sdpa_paths_compute_the_same_function():
    eager = GPT2.from_name("tiny", attn_impl="eager").eval()
    sdpa = GPT2(GPT2Config.from_name("tiny", attn_impl="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    reference = GPT2.from_name("tiny").double().eval()
    reference.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 256, (3, 50))
    with torch.no_grad():
        exact = reference(tokens)
        eager_error = (eager(tokens).double() - exact).abs().max()
        sdpa_error = (sdpa(tokens).double() - exact).abs().max()
    band = torch.finfo(torch.float32).eps * exact.abs().max()
    assert sdpa_error <= 2 * eager_error + band and eager_error <= 2 * sdpa_error + band


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_compiles_with_fullgraph(attn_impl):
    model = GPT2.from_name("tiny", attn_impl=attn_impl).eval()
    tokens = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens))


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(1)
    config = HFGPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                          initializer_range=0.2, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_from_hf_matches_hf_logits(hf_gpt2, attn_impl):
    model = GPT2.from_hf(hf_gpt2, attn_impl=attn_impl).eval()
    assert model.config.attn_impl == attn_impl
    tokens = torch.randint(0, 256, (2, 60))
    with torch.no_grad():
        expected, actual = hf_gpt2(tokens).logits, model(tokens)
    assert expected.std() > 0.5
    assert (actual - expected).abs().max() <= 1e-5


def test_head_is_tied_to_the_token_embedding():
    model = GPT2.from_name("tiny")
    assert model.lm_head.weight is model.wte.weight


def test_named_configs_have_the_published_parameter_counts():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in GPT2.from_name(name).parameters())
                  for name in ("gpt2", "gpt2-medium", "gpt2-xl")}
    assert counts == {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-xl": 1_557_611_200}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="attn_impl"):
        GPT2Config(attn_impl="flash")
    model = GPT2.from_name("tiny")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 256, (1, 129)))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.randint(0, 256, (5,)))
