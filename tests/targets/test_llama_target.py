"""attnrewrite.targets.llama: shapes, gradients, compile, HF parity, KV-cache generation."""

import copy

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from attnrewrite.targets.llama import CONFIGS, Llama, LlamaConfig


def _hf_llama(tie=False, **overrides):
    # A larger init than HF's 0.02 spreads the logits (std ~ 1), so a match is not a match of near-zeros.
    config = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.1, rope_theta=500.0, tie_word_embeddings=tie,
                  attn_implementation="eager")
    config.update(overrides)
    return LlamaForCausalLM(HFLlamaConfig(**config)).eval()


def test_tiny_forward_and_backward(check_gradients):
    model = Llama.from_name("tiny")
    tokens = torch.randint(0, 256, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, 256) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    check_gradients(model)


def test_position_t_sees_only_positions_up_to_t():
    model = Llama.from_name("tiny").eval()
    tokens = torch.randint(0, 256, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_compiles_with_fullgraph_for_training_and_decoding():
    model = Llama.from_name("tiny").eval()
    tokens = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens))
        model.setup_cache(2, 32)
        prefill = compiled(tokens, torch.arange(16))
        step = compiled(tokens[:, :1], torch.tensor([16]))
    assert prefill.shape == (2, 16, 256) and step.shape == (2, 1, 256)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_from_hf_matches_hf_logits(tie):
    hf = _hf_llama(tie=tie)
    model = Llama.from_hf(hf).eval()
    assert model.config.n_kv_heads == 2 and model.config.rope_theta == 500.0
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        expected, actual = hf(tokens).logits, model(tokens)
    assert expected.std() > 0.5
    assert (actual - expected).abs().max() <= 1e-5


def test_from_hf_refuses_scaled_rope():
    hf = _hf_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    with pytest.raises(ValueError, match="default RoPE"):
        Llama.from_hf(hf)


def _spread_weights(model):
    # Random tiny models at the default init give near-uniform logits where argmax ties are a
    # coin toss; a wider init makes greedy decoding well defined.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


def test_generate_with_kv_cache_equals_full_recompute():
    model = _spread_weights(Llama.from_name("tiny")).eval()
    prompt = torch.randint(0, 256, (3, 7))
    generated = model.generate(prompt, max_new_tokens=25)
    assert generated.shape == (3, 32)
    assert torch.equal(generated[:, :7], prompt)

    sequence = prompt
    with torch.no_grad():
        for _ in range(25):
            next_token = model(sequence)[:, -1].argmax(dim=-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    assert len(set(generated[0, 7:].tolist())) > 1   # not a degenerate constant continuation


def test_cached_decoding_logits_match_full_sequence():
    model = _spread_weights(Llama.from_name("tiny")).eval()
    reference = copy.deepcopy(model).double()
    tokens = torch.randint(0, 256, (2, 12))
    model.setup_cache(2, 12)
    with torch.no_grad():
        exact = reference(tokens)
        full = model(tokens)
        prefill = model(tokens[:, :8], torch.arange(8))
        steps = [model(tokens[:, t:t + 1], torch.tensor([t])) for t in range(8, 12)]
    cached = torch.cat([prefill, *steps], dim=1)
    # The cached path sums over a longer (masked) key axis, so it rounds differently from the
    # full pass; against float64 it may err at most twice as much, plus one float32 ulp of the scale.
    full_error = (full.double() - exact).abs().max()
    cached_error = (cached.double() - exact).abs().max()
    assert cached_error <= 2 * full_error + torch.finfo(torch.float32).eps * exact.abs().max()


def test_sampling_is_reproducible_with_a_generator():
    model = Llama.from_name("tiny").eval()
    prompt = torch.randint(0, 256, (2, 4))
    runs = [model.generate(prompt, 10, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_named_configs_have_the_published_parameter_counts():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in Llama.from_name(name).parameters())
                  for name in ("tinyllama-1.1b", "llama-2-7b", "llama-3-8b")}
    assert counts == {"tinyllama-1.1b": 1_100_048_384, "llama-2-7b": 6_738_415_616,
                      "llama-3-8b": 8_030_261_248}
    assert set(CONFIGS) >= {"tiny", "char", "small"}


def test_bad_inputs_raise_clear_errors():
    model = Llama.from_name("tiny")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.randint(0, 256, (8,)))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 256, (1, 129)))
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.randint(0, 256, (1, 4)), torch.arange(4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.randint(0, 256, (1, 100)), max_new_tokens=40)
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(KeyError, match="known"):
        LlamaConfig.from_name("llama-9000")
