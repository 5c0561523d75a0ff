"""attnrewrite.targets.sentences: the held-out sentences and the word sentences built for distillation."""

import collections

import pytest

from attnrewrite.targets.sentences import HELDOUT_SENTENCES, word_sentences

# A vocabulary in id order, as BERT's vocab.txt: special tokens, single characters, then words by frequency.
VOCAB = ["[PAD]", "[unused0]", "[CLS]", "!", "a", "b",
         *(("".join(chr(97 + (i // 26 ** k) % 26) for k in range(3))) for i in range(300)), "##ing", "café"]


def test_word_sentences_are_deterministic_in_the_seed_and_of_the_asked_lengths():
    first = word_sentences(VOCAB, 50, seed=3, lengths=(4, 9))
    assert first == word_sentences(VOCAB, 50, seed=3, lengths=(4, 9))
    assert first != word_sentences(VOCAB, 50, seed=4, lengths=(4, 9))
    assert len(first) == 50
    for sentence in first:
        assert sentence[0].isupper() and sentence.endswith(".")
        assert 4 <= len(sentence.split()) <= 9


def test_word_sentences_use_whole_words_only_and_favour_the_frequent_ones():
    words = [w.lower().rstrip(".") for s in word_sentences(VOCAB, 400, top=200) for w in s.split()]
    allowed = [w for w in VOCAB if len(w) > 1 and w.isascii() and w.isalpha()][:200]
    assert set(words) <= set(allowed)  # no special tokens, single letters, ## pieces, non-ASCII or rank > top
    counts = collections.Counter(words)
    head, tail = sum(counts[w] for w in allowed[:20]), sum(counts[w] for w in allowed[-20:])
    assert head > 3 * tail, (head, tail)  # weight 1/(rank + 10): the first 20 words ~5x the last 20


def test_word_sentences_read_a_mapping_in_id_order():
    as_ids = {token: i for i, token in enumerate(VOCAB)}
    shuffled = dict(sorted(as_ids.items(), key=lambda item: hash(item[0]) % 97))
    assert word_sentences(shuffled, 20, seed=1) == word_sentences(VOCAB, 20, seed=1)


def test_word_sentences_never_give_a_held_out_sentence_and_refuse_a_tiny_vocabulary():
    assert not set(word_sentences(VOCAB, 500)) & set(HELDOUT_SENTENCES)
    with pytest.raises(ValueError, match="whole words"):
        word_sentences(["[PAD]", "a", "##s", "dog"], 5)
    with pytest.raises(ValueError, match="lengths"):
        word_sentences(VOCAB, 5, lengths=(5, 2))


def test_grammar_sentences_are_distinct_deterministic_and_no_near_copy_of_a_held_out_sentence():
    from attnrewrite.targets.sentences import grammar_sentences, shared_word_runs

    first = grammar_sentences(2048, seed=0)
    assert first == grammar_sentences(2048, seed=0) and first != grammar_sentences(2048, seed=1)
    assert len(set(first)) == 2048
    assert all(s[0].isupper() and s[-1] in ".?" and "  " not in s for s in first)
    assert not set(first) & set(HELDOUT_SENTENCES)
    assert shared_word_runs(first, length=5) == set()


def test_shared_word_runs_finds_a_near_copy():
    from attnrewrite.targets.sentences import shared_word_runs

    held = HELDOUT_SENTENCES[0]  # "The train to the coast leaves at seven in the morning."
    words = held.rstrip(".").split()
    near = "Yesterday " + " ".join(words[2:8]).upper() + ", they said."  # case and punctuation do not hide it
    assert tuple(w.lower() for w in words[2:7]) in shared_word_runs([near])
    assert shared_word_runs(["Nothing here repeats any of them at all."]) == set()
