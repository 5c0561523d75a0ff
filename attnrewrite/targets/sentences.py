"""English sentences for distilling and evaluating sentence encoders (the pretrained MiniLM).

- :data:`PARAPHRASE_PAIRS`: 50 pairs of everyday sentences, each pair saying one thing in two ways
  (100 sentences), written for this project.  They are held out: distillation never trains on
  them, and none is about programming, so they do not overlap the training text below.
  Embedding cosine to the original model is measured on all 100; paraphrase retrieval asks
  whether each sentence's nearest neighbour among the other 99 is its pair.
- :func:`docstring_sentences`: sentences cut from the standard-library docstring corpus
  (:func:`attnrewrite.targets.data.text_corpus`, train split): the distillation data.
- :func:`word_sentences`: sequences of everyday words drawn from a tokenizer's frequency-ordered
  vocabulary (no grammar): distillation data that brings the words of ordinary English, which
  docstrings lack, without any text that could overlap the held-out sentences.
- :func:`grammar_sentences`: everyday English with grammar from a small hand-written grammar
  (distillation data closest to the held-out sentences' domain), and :func:`shared_word_runs`, the
  check that no training sentence nearly copies a held-out one.
"""

from __future__ import annotations

import re
import zlib

PARAPHRASE_PAIRS: tuple[tuple[str, str], ...] = (
    ("The train to the coast leaves at seven in the morning.", "At 7 a.m. the coastal train departs."),
    ("My grandmother grows tomatoes in her back garden.", "Tomatoes are grown by my grandma behind her house."),
    ("Heavy rain flooded several streets downtown last night.", "Last night's downpour left city-centre roads under water."),
    ("She finished the marathon in just under four hours.", "Her marathon time was a little less than four hours."),
    ("The museum is closed on Mondays for cleaning.", "Every Monday the museum shuts so it can be cleaned."),
    ("He forgot his umbrella and got soaked on the way home.", "Without his umbrella, he was drenched walking home."),
    ("The bakery on the corner sells fresh bread every day.", "Fresh loaves are sold daily at the corner bakery."),
    ("Our flight was delayed because of fog at the airport.", "Fog at the airport held up our plane."),
    ("The children built a sandcastle near the waves.", "Close to the water, the kids made a castle of sand."),
    ("A small dog barked at the mail carrier.", "The postman was barked at by a little dog."),
    ("The orchestra played a symphony by Beethoven.", "A Beethoven symphony was performed by the orchestra."),
    ("Prices at the grocery store have gone up this year.", "Groceries cost more this year than before."),
    ("The mountain village is covered in snow all winter.", "Snow blankets the alpine village throughout winter."),
    ("I need to renew my passport before the trip.", "My passport has to be renewed ahead of the journey."),
    ("The doctor advised him to drink more water.", "He was told by his physician to increase his water intake."),
    ("The bridge was closed for repairs over the weekend.", "Repair work shut the bridge during the weekend."),
    ("Bees are important for pollinating many crops.", "Many crops depend on bees for pollination."),
    ("The students planted trees around the schoolyard.", "Trees were planted around the school grounds by the pupils."),
    ("Her new novel became a bestseller within a month.", "Within weeks of release, her latest book was a bestseller."),
    ("The kitten fell asleep in a sunny spot by the window.", "In the sunlight by the window, the young cat dozed off."),
    ("The team celebrated after winning the championship.", "After taking the title, the players celebrated."),
    ("Turn off the lights when you leave the room.", "Please switch the lights off as you go out."),
    ("The river freezes solid during the coldest months.", "In the depths of winter the river turns to solid ice."),
    ("He repaired the old bicycle with parts from a junkyard.", "Using scrap-yard parts, he fixed up the old bike."),
    ("Volunteers cleaned up the litter on the beach.", "The beach was cleared of rubbish by volunteers."),
    ("The restaurant was too noisy to have a conversation.", "It was so loud in the restaurant that we couldn't talk."),
    ("A strong wind knocked down the old oak tree.", "The ancient oak was blown over by a gale."),
    ("The farmer sells eggs at the Saturday market.", "On Saturdays the farmer's eggs are for sale at the market."),
    ("My phone battery dies before the end of the day.", "By evening my phone has run out of charge."),
    ("The city added new bike lanes along the main avenue.", "New cycle paths now run along the city's main avenue."),
    ("The concert tickets sold out in ten minutes.", "All the tickets for the show were gone within ten minutes."),
    ("She teaches mathematics at a high school in the suburbs.", "She is a maths teacher at a suburban secondary school."),
    ("The soup needs a little more salt.", "A pinch more salt would improve the soup."),
    ("Thousands of birds migrate south every autumn.", "Each fall, huge flocks of birds fly to the south."),
    ("The hotel room had a view of the harbour.", "From our hotel room we could see the harbour."),
    ("The power went out during the thunderstorm.", "The storm caused a blackout."),
    ("He apologised for arriving late to the meeting.", "He said sorry for being late to the meeting."),
    ("The library lends out books, films and music.", "You can borrow books, movies and music from the library."),
    ("The painter used bright colours for the sunset.", "Vivid colours were chosen by the artist to paint the sunset."),
    ("The baby started walking at eleven months.", "At eleven months old the infant took her first steps."),
    ("The ferry crosses the lake twice a day.", "Twice daily, a boat carries passengers across the lake."),
    ("Our neighbours are renovating their kitchen.", "The people next door are redoing their kitchen."),
    ("The hikers reached the summit just before sunset.", "Shortly before the sun went down the walkers got to the top."),
    ("Too much sugar is bad for your teeth.", "Eating lots of sugar harms your teeth."),
    ("The old factory was turned into apartments.", "Flats were created from the former factory building."),
    ("The festival attracts visitors from all over the world.", "People come from every corner of the globe for the festival."),
    ("He lost his keys somewhere in the park.", "Somewhere in the park, he dropped his keys."),
    ("The lecture was cancelled because the professor was ill.", "Since the lecturer was sick, the class did not take place."),
    ("Fresh fruit is cheaper in the summer.", "In summer, fresh fruit costs less."),
    ("The cat knocked a glass off the kitchen table.", "A glass was pushed off the kitchen table by the cat."),
)

#: The 100 held-out sentences, pair members side by side (sentence 2i and 2i+1 are paraphrases).
HELDOUT_SENTENCES: tuple[str, ...] = tuple(s for pair in PARAPHRASE_PAIRS for s in pair)


def docstring_sentences(count: int, seed: int = 0, min_chars: int = 30, max_chars: int = 200) -> list[str]:
    """``count`` sentences from the training split of the standard-library docstring corpus,
    chosen deterministically from ``seed`` (prose lines only: no code, no doctest prompts)."""
    from attnrewrite.targets.data import text_corpus

    text = bytes(text_corpus().train.tolist()).decode("utf-8", errors="replace")
    candidates = []
    for paragraph in text.split("\n\n"):
        flat = " ".join(line.strip() for line in paragraph.splitlines())
        if ">>>" in flat or "::" in flat:
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", flat):
            if min_chars <= len(sentence) <= max_chars and sentence[0].isupper() and sentence.count("(") < 2:
                candidates.append(sentence)
    candidates = sorted(set(candidates))
    if count > len(candidates):
        raise ValueError(f"the corpus holds {len(candidates)} usable sentences, {count} were asked for")
    ranked = sorted(candidates, key=lambda s: zlib.crc32(f"{seed}:{s}".encode()))
    return ranked[:count]


def word_sentences(vocabulary, count: int, seed: int = 0, top: int = 8000,
                   lengths: tuple[int, int] = (6, 20)) -> list[str]:
    """``count`` "sentences" of ``lengths`` words drawn at random from the ``top`` most frequent whole
    words of ``vocabulary``, with weight 1/(rank + 10) (roughly Zipf's law), capitalised, ending with
    a full stop.

    ``vocabulary`` is a word-piece vocabulary in id order, as BERT's ``vocab.txt`` (its words are
    ordered by frequency in English text): a sequence of tokens, or a mapping token -> id
    (``tokenizer.get_vocab()``).  Only alphabetic ASCII tokens of two letters or more count as words
    (no ``##`` pieces, no special tokens).  Deterministic in ``seed``.
    """
    import random

    if isinstance(vocabulary, dict):
        vocabulary = sorted(vocabulary, key=vocabulary.get)
    words = [w for w in vocabulary if len(w) > 1 and w.isascii() and w.isalpha()][:top]
    if len(words) < 100:
        raise ValueError(f"the vocabulary holds {len(words)} whole words; word_sentences needs at least 100")
    low, high = lengths
    if not 1 <= low <= high:
        raise ValueError(f"lengths must be (low, high) with 1 <= low <= high; got {lengths!r}")
    weights = [1.0 / (rank + 10) for rank in range(len(words))]
    rng = random.Random(f"word_sentences:{seed}")
    return [" ".join(rng.choices(words, weights, k=rng.randint(low, high))).capitalize() + "."
            for _ in range(count)]


# --------------------------------------------------------------------------- a small grammar of everyday English
#
# Words of ordinary life, grouped by what they can do in a sentence.  The lists were written for
# this grammar from general categories (people, animals, things, places, times); the held-out
# sentences above were not mined for them, and the bench checks that no generated sentence shares a
# run of words long enough to be a near copy of one of them.

_PEOPLE = ("the farmer", "my sister", "my brother", "our teacher", "the nurse", "a young man", "an old woman",
           "the driver", "the children", "her father", "his mother", "the neighbours", "a tourist", "the waiter",
           "the manager", "my cousin", "the students", "a police officer", "the pilot", "the baker", "the mayor",
           "my best friend", "the new doctor", "a group of workers", "the twins", "the coach", "our guests",
           "the shop owner", "the soldiers", "my uncle", "the fishermen", "a stranger", "the old king",
           "the little girl", "the engineer", "the singer", "her husband", "his wife", "the judge", "the campers",
           "Anna", "David", "Maria", "Tom", "Sarah", "James", "Li", "Ahmed", "Lucy", "Peter")
_ANIMALS = ("the horse", "a black cat", "the puppy", "the cows", "a fox", "the ducks", "an owl", "the sheep",
            "a spider", "the rabbit", "the goats", "a huge bear", "the parrot", "the bees", "a frog")
_THINGS = ("the letter", "a cup of tea", "the car", "an apple", "the newspaper", "the door", "a ticket",
           "the old piano", "the dishes", "a new coat", "the garden gate", "the map", "a basket of fruit",
           "the photographs", "the bill", "a sandwich", "the window", "the lamp", "a heavy box", "the shoes",
           "the money", "a birthday cake", "the homework", "the report", "a bottle of milk", "the radio",
           "the fence", "the keys to the shed", "a wooden chair", "the carpet", "the medicine", "a postcard",
           "the vegetables", "the blanket", "an envelope", "the boat", "the tent", "a pair of gloves",
           "the recipe", "the suitcase", "the paint", "a bag of rice", "the flowers", "the song", "the film")
_PLACES = ("the kitchen", "the station", "the park", "the hospital", "the village", "the office", "the beach",
           "the forest", "the city", "the church", "the river", "the hill", "the farm", "the school", "the market",
           "the harbour", "the garage", "the bank", "the island", "the valley", "the factory", "the stadium",
           "the cinema", "the post office", "the lake", "the border", "the castle", "the cafe", "the theatre",
           "the supermarket", "the zoo", "the bus stop", "the playground", "the desert", "the north of the country")
_PREPOSITIONS = ("in", "near", "behind", "outside", "at", "across", "beside", "inside", "around", "far from")
_TIMES = ("yesterday", "last week", "on Tuesday", "every evening", "this afternoon", "after lunch", "at noon",
          "in the spring", "during the holidays", "before dinner", "early on Sunday", "late at night",
          "two days ago", "last summer", "on her birthday", "after the storm", "in December", "before sunrise",
          "at the end of the month", "for the first time", "once a year", "on Friday night", "last autumn")
_ADJECTIVES = ("tired", "happy", "angry", "nervous", "proud", "hungry", "quiet", "busy", "worried", "calm",
               "surprised", "cold", "lonely", "excited", "bored", "sick", "confused", "grateful", "late", "ready")
_THING_ADJECTIVES = ("broken", "expensive", "cheap", "empty", "full", "dirty", "clean", "heavy", "wet", "old",
                     "beautiful", "strange", "warm", "bright", "dark", "small", "enormous", "useful", "missing")
# (base, past, past participle, third person present) of verbs that take an object
_TRANSITIVE = (("carry", "carried", "carried", "carries"), ("open", "opened", "opened", "opens"),
               ("find", "found", "found", "finds"), ("buy", "bought", "bought", "buys"),
               ("sell", "sold", "sold", "sells"), ("paint", "painted", "painted", "paints"),
               ("wash", "washed", "washed", "washes"), ("hide", "hid", "hidden", "hides"),
               ("bring", "brought", "brought", "brings"), ("send", "sent", "sent", "sends"),
               ("fix", "fixed", "fixed", "fixes"), ("lose", "lost", "lost", "loses"),
               ("read", "read", "read", "reads"), ("write", "wrote", "written", "writes"),
               ("cook", "cooked", "cooked", "cooks"), ("borrow", "borrowed", "borrowed", "borrows"),
               ("drop", "dropped", "dropped", "drops"), ("take", "took", "taken", "takes"),
               ("check", "checked", "checked", "checks"), ("deliver", "delivered", "delivered", "delivers"),
               ("steal", "stole", "stolen", "steals"), ("move", "moved", "moved", "moves"),
               ("order", "ordered", "ordered", "orders"), ("share", "shared", "shared", "shares"),
               ("clean", "cleaned", "cleaned", "cleans"), ("pack", "packed", "packed", "packs"),
               ("keep", "kept", "kept", "keeps"), ("throw away", "threw away", "thrown away", "throws away"),
               ("pick up", "picked up", "picked up", "picks up"), ("leave", "left", "left", "leaves"),
               ("see", "saw", "seen", "sees"), ("watch", "watched", "watched", "watches"),
               ("forget", "forgot", "forgotten", "forgets"), ("describe", "described", "described", "describes"))
# (base, past, third person present) of verbs without an object
_INTRANSITIVE = (("sleep", "slept", "sleeps"), ("wait", "waited", "waits"), ("laugh", "laughed", "laughs"),
                 ("arrive", "arrived", "arrives"), ("leave", "left", "leaves"), ("sing", "sang", "sings"),
                 ("work", "worked", "works"), ("swim", "swam", "swims"), ("shout", "shouted", "shouts"),
                 ("run", "ran", "runs"), ("rest", "rested", "rests"), ("dance", "danced", "dances"),
                 ("cry", "cried", "cries"), ("walk", "walked", "walks"), ("stay", "stayed", "stays"),
                 ("climb", "climbed", "climbs"), ("sit", "sat", "sits"), ("disappear", "disappeared", "disappears"))
_MANNER = ("slowly", "quietly", "carefully", "quickly", "happily", "suddenly", "alone", "together", "again",
           "all day", "for hours", "without a word", "in silence", "with great care")
_WEATHER = ("it rained", "it snowed", "the wind was strong", "the sun came out", "the roads were icy",
            "the sky was grey", "it was very hot", "a storm was coming", "the fog was thick")
_BECAUSE = ("because it was late", "because the shop was closed", "because nobody else could", "so that nobody "
            "would see", "because the price had gone down", "although it was raining", "while the others slept",
            "before anyone noticed", "as soon as the bell rang", "because she had promised", "since he was bored",
            "when the lights went out", "until the work was done")


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def _place(rng) -> str:
    return f"{rng.choice(_PREPOSITIONS)} {rng.choice(_PLACES)}"


def _grammar_sentence(rng) -> str:
    who = rng.choice(_PEOPLE + _PEOPLE + _ANIMALS)
    other = rng.choice(_PEOPLE)
    thing = rng.choice(_THINGS)
    base, past, participle, present = rng.choice(_TRANSITIVE)
    i_base, i_past, i_present = rng.choice(_INTRANSITIVE)
    plural = who.split()[-1].endswith("s") and not who.endswith(("ss", "us")) or who.endswith(("men", "sheep", "children"))
    was = "were" if plural else "was"
    thing_was = "were" if thing.split()[-1].endswith("s") and not thing.startswith(("a ", "an ")) else "was"
    forms = (
        lambda: f"{who} {past} {thing} {_place(rng)} {rng.choice(_TIMES)}.",
        lambda: f"{rng.choice(_TIMES)}, {who} {past} {thing} {rng.choice(_MANNER)}.",
        lambda: f"{thing} {thing_was} {participle} by {other} {rng.choice(_TIMES)}.",
        lambda: f"{who} {i_past} {_place(rng)} {rng.choice(_BECAUSE)}.",
        lambda: f"{who} {i_past} {rng.choice(_MANNER)} {rng.choice(_TIMES)}.",
        lambda: f"{who} {was} {rng.choice(_ADJECTIVES)} {rng.choice(_BECAUSE)}.",
        lambda: f"{rng.choice(_WEATHER)}, so {who} {i_past} {_place(rng)}.",
        lambda: f"{who} {'' if plural else present + ' '}{base + ' ' if plural else ''}{thing} "
                f"{rng.choice(('every morning', 'once a week', 'on weekends', 'every day', 'twice a month'))}.",
        lambda: f"{thing} {_place(rng)} {thing_was} {rng.choice(_THING_ADJECTIVES)}.",
        lambda: f"did {who} {base} {thing} {rng.choice(_TIMES)}?",
        lambda: f"please {base} {thing} {rng.choice(_BECAUSE).split(' ', 1)[0] == 'before' and 'now' or 'before you go'}.",
        lambda: f"{who} {past} {thing}, and {other} {i_past} {_place(rng)}.",
        lambda: f"{other} said that {who} had {participle} {thing} {rng.choice(_TIMES)}.",
        lambda: f"there {thing_was} {thing} {_place(rng)}, but {who} never {' it '.join(past.split(' ', 1))}"
                f"{'' if ' ' in past else ' it'}.",
        lambda: f"{who} wanted to {i_base} {_place(rng)}, but {other} {past} {thing} first.",
    )
    return _capitalised(" ".join(rng.choice(forms)().split()))


def grammar_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences of everyday English from a small hand-written grammar (fifteen
    sentence forms: past and present, passive, questions, requests, subordinate and coordinated clauses)
    over a lexicon of people, animals, things, places, times and about fifty verbs.  Distillation data
    with grammar and the words of ordinary life, built offline from ``seed`` (deterministic)."""
    import random

    rng = random.Random(f"grammar_sentences:{seed}")
    sentences: dict[str, None] = {}
    for _ in range(count * 20):
        if len(sentences) == count:
            break
        sentences.setdefault(_grammar_sentence(rng))
    if len(sentences) < count:
        raise ValueError(f"the grammar gave {len(sentences)} distinct sentences, {count} were asked for")
    return list(sentences)


def shared_word_runs(sentences, heldout=HELDOUT_SENTENCES, length: int = 5) -> set[tuple[str, ...]]:
    """The runs of ``length`` consecutive words (lower case, punctuation dropped) that appear both in
    ``sentences`` and in the ``heldout`` ones: empty when no training sentence nearly copies a held-out one."""

    def runs(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(words[i:i + length]) for i in range(len(words) - length + 1)}

    held = set().union(*(runs(s) for s in heldout))
    return held & set().union(*(runs(s) for s in sentences))


CORPORA = ("docstrings", "mixed", "english")


def distillation_sentences(corpus: str, count: int, vocabulary) -> list[str]:
    """``count`` distillation sentences of ``corpus`` (one of :data:`CORPORA`), none of them a held-out
    one nor sharing a run of five words with one; ``vocabulary`` is the tokenizer's (``get_vocab()``),
    which :func:`word_sentences` draws from.  The one definition used by ``bench/distill_quality.py``
    and ``python -m attnrewrite distill --model minilm``, so the two cannot drift apart.

    - ``"docstrings"``: sentences of the standard library's docstrings (train split);
    - ``"mixed"``: half docstrings, half :func:`word_sentences`;
    - ``"english"``: half :func:`grammar_sentences`, a quarter each of the two above.

    Raises:
        ValueError: an unknown corpus, or sentences that overlap the held-out ones.
    """
    if corpus == "docstrings":
        sentences = docstring_sentences(count, seed=0)
    elif corpus == "mixed":  # the words of everyday English beside the docstrings' grammar
        sentences = docstring_sentences(count - count // 2, seed=0) + word_sentences(vocabulary, count // 2)
    elif corpus == "english":  # half sentences of everyday English from a grammar, a quarter each of the two above
        quarter = count // 4
        sentences = (grammar_sentences(count - 2 * quarter, seed=0) + docstring_sentences(quarter, seed=0)
                     + word_sentences(vocabulary, quarter))
    else:
        raise ValueError(f"unknown distillation corpus {corpus!r}; known: {', '.join(CORPORA)}")
    overlap = set(sentences) & set(HELDOUT_SENTENCES)
    if overlap:
        raise ValueError(f"distillation sentences overlap the held-out ones: {sorted(overlap)[:3]}")
    near_copies = shared_word_runs(sentences, length=5)
    if near_copies:
        raise ValueError(f"distillation sentences share runs of 5 words with the held-out ones: {sorted(near_copies)[:3]}")
    return sentences
