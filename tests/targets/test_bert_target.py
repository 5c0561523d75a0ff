"""attnrewrite.targets.bert: padding masks, MLM head, compile, HF parity, the pretrained MiniLM."""

import pytest
import torch
from transformers import BertConfig as HFBertConfig
from transformers import BertForMaskedLM as HFBertForMaskedLM

from attnrewrite.targets.bert import Bert, BertConfig, BertForMaskedLM, load_minilm_hf, mean_pool


def _padded_batch(vocab=512):
    ids = torch.randint(1, vocab, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 13:] = 0
    mask[2, 5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_tiny_forward_and_backward(check_gradients):
    model = BertForMaskedLM(BertConfig.from_name("tiny"))
    ids, mask = _padded_batch()
    logits = model(ids, mask)
    assert logits.shape == (3, 20, 512)
    labels = ids.masked_fill(mask == 0, -100)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    # Segment 1 never appears in the batch, so only row 0 of token_type_embeddings gets a gradient.
    check_gradients(model, skip=("bert.token_type_embeddings.weight",))
    assert model.bert.token_type_embeddings.weight.grad[0].abs().sum() > 0


def test_padding_does_not_change_real_tokens():
    model = Bert.from_name("tiny").eval()
    ids = torch.randint(1, 512, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 7)], dim=1).long()
    with torch.no_grad():
        alone, with_padding = model(ids), model(padded, mask)
        torch.testing.assert_close(with_padding[:, :9], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.embed(padded, mask), model.embed(ids), rtol=1e-5, atol=1e-6)


def test_compiles_with_fullgraph():
    model = Bert.from_name("tiny").eval()
    ids, mask = _padded_batch()
    compiled = torch.compile(model.embed, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), model.embed(ids, mask))


def test_mlm_head_is_tied_to_the_word_embeddings():
    model = BertForMaskedLM(BertConfig.from_name("tiny"))
    ids, mask = _padded_batch()
    logits = model(ids, mask)
    with torch.no_grad():
        model.bert.word_embeddings.weight[7] += 1.0
    assert not torch.allclose(model(ids, mask)[..., 7], logits[..., 7])


def test_from_hf_matches_hf_masked_lm_logits():
    config = HFBertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=128, initializer_range=0.2,
                          attn_implementation="eager")
    hf = HFBertForMaskedLM(config).eval()
    model = BertForMaskedLM.from_hf(hf).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        expected, actual = hf(input_ids=ids, attention_mask=mask).logits, model(ids, mask)
    real = mask.bool()
    assert expected[real].std() > 0.5
    assert (actual[real] - expected[real]).abs().max() <= 1e-5


SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage while the crowd sings along loudly.",
    "The stock market fell sharply today.",
    "Cats sleep.",
]


@pytest.fixture(scope="module")
def minilm():
    hf, tokenizer = load_minilm_hf()
    return hf.eval(), tokenizer


def test_pretrained_minilm_embeddings_match_hf(minilm):
    hf, tokenizer = minilm
    model = Bert.from_hf(hf).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()   # the batch really is padded
    with torch.no_grad():
        expected = mean_pool(hf(**batch).last_hidden_state, batch["attention_mask"])
        actual = model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert expected.abs().max() > 0.1
    assert (actual - expected).abs().max() <= 1e-5


def test_pretrained_minilm_ranks_paraphrases_above_unrelated_sentences(minilm):
    hf, tokenizer = minilm
    model = Bert.from_hf(hf).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        e = model.embed(batch["input_ids"], batch["attention_mask"], normalize=True)
    similarity = e @ e.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3 and similarity[0, 1] > similarity[0, 3] + 0.3


def test_bad_inputs_raise_clear_errors():
    model = Bert.from_name("tiny")
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=100, n_heads=3)
