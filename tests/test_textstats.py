"""textstats.py: memorisation of copies and of shuffled text, the longest copied span, style statistics, themes."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from bookgpt.eval import textstats as T


def test_memorisation_of_a_copy_is_total_and_of_shuffled_text_near_zero(book_text: str) -> None:
    train, held = book_text[:300_000], book_text[300_000:400_000]
    index = T.TrainIndex(train)
    words = train.split(" ")
    copies = [" ".join(words[i:i + 80]) for i in (100, 5000, 20000)]  # whole words, verbatim
    m = T.memorisation(index, copies)
    assert m["char30_share"] == 1.0 and m["word8_share"] == 1.0
    assert m["char30_found"] == m["char_ngrams"] == sum(len(c) - 29 for c in copies)
    assert m["longest_spans"] == [len(c) for c in copies]
    shuffled = held.split()
    random.Random(0).shuffle(shuffled)
    s = T.memorisation(index, [" ".join(shuffled[i:i + 100]) for i in range(0, 400, 100)])
    assert s["char30_share"] < 0.01 and s["word8_share"] == 0.0
    assert s["char30_found"] == round(s["char30_share"] * s["char_ngrams"])
    assert s["longest_span"] < 30


def test_longest_span_on_a_hand_made_example() -> None:
    index = T.TrainIndex("the cat sat on the mat")
    assert index.longest_spans(["a cat sat on a mat", "xyz", ""]) == [" cat sat on ", "", ""]
    m = T.memorisation(index, ["a cat sat on a mat"], char_n=5, word_n=2)
    # char 5-grams of "a cat sat on a mat": 14, of which " cat ", "cat s", ..., "t on " (8) occur in train
    assert m["char_ngrams"] == 14 and m["char5_share"] == pytest.approx(8 / 14)
    # word 2-grams: a cat, cat sat, sat on, on a, a mat -> "cat sat", "sat on" occur
    assert m["word_ngrams"] == 5 and m["word2_share"] == pytest.approx(2 / 5)


def test_style_statistics_on_a_hand_made_example() -> None:
    text = "“Pierre, come here!” said Natásha. Pierre smiled. Zzyzx qwerty."
    s = T.style_stats([text], vocab_lower={"pierre", "come", "here", "said", "natásha", "smiled"})
    assert s["words"] == 9 and s["sentences"] == 4  # ! . . . end four sentences
    assert s["mean_word_len"] == pytest.approx(sum(map(len, "Pierre come here said Natásha Pierre smiled Zzyzx qwerty".split())) / 9)
    assert s["unknown_word_share"] == pytest.approx(2 / 9)
    assert s["names_per_kword"]["Pierre"] == pytest.approx(2 / 9 * 1000)
    assert s["names_per_kword"]["Natásha"] == pytest.approx(1 / 9 * 1000)
    assert s["punct_per_kchar"][","] == pytest.approx(1000 / len(text))
    assert s["dialogue_share"] == pytest.approx(len("“Pierre, come here!”") / len(text))
    assert s["distinct"]["1"] == pytest.approx(8 / 9)  # Pierre twice
    assert T.style_distance(s, s)["word_len_tvd"] == 0.0
    assert T.tvd([1, 0], [0, 1]) == 1.0 and T.tvd([0.5, 0.5], [0.25, 0.75]) == 0.25


def test_names_places_and_content_words() -> None:
    text = "Pierre and Natásha left Moscow for the Bald Hills; a Russian in Russia. Pierre’s hat was old."
    assert T.entity_counts(text) == Counter({"Pierre": 2, "Natásha": 1, "Moscow": 1, "Bald Hills": 1, "Russia": 1})
    # lower-cased, without function words and without the names and their possessives (counted above)
    assert T.content_counts(text) == Counter({"left": 1, "russian": 1, "hat": 1, "old": 1})
    assert T.content_counts("The soldiers marched, and the soldiers sang.") == Counter({"soldiers": 2, "marched": 1, "sang": 1})


def test_jensen_shannon_divergence_and_derangement() -> None:
    a, b = Counter(war=1), Counter(war=1, peace=1)
    assert T.jsd(a, a) == 0.0 and T.jsd(Counter(war=3), Counter(peace=1)) == 1.0
    # the mixture is war 3/4, peace 1/4: KL(a||m) = log2(4/3), KL(b||m) = (log2(2/3) + log2(2)) / 2
    assert T.jsd(a, b) == T.jsd(b, a) == pytest.approx((math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2)
    assert T.jsd(Counter(), Counter()) == 0.0 and T.jsd(Counter(), a) == 1.0  # nobody named by either / by one
    for n in (2, 3, 10):
        pair = T.derangement(n, seed=n)
        assert sorted(pair) == list(range(n)) and all(pair[i] != i for i in range(n))


def test_themes_follow_the_prompt(book_text: str) -> None:
    """A text that continues its own prompt is closer to that prompt's real continuation than to another's;
    the pooled figures do not depend on the pairing."""
    chapters = [book_text[i:i + 3000] for i in range(200_000, 2_200_000, 400_000)]
    th = T.themes(chapters, chapters, book_text[:1_000_000], seed=0)
    assert th["content_per_prompt"]["own"] == 0.0 and th["content_per_prompt"]["shuffled"] > 0.3
    assert th["entities_per_prompt"]["own"] == 0.0 and th["entities_jsd_to_real"] == th["content_jsd_to_real"] == 0.0
    assert th["content_jsd_to_book"]["generated"] == th["content_jsd_to_book"]["reference"] > 0.0
    assert th["entities_per_kword"]["generated"] == th["entities_per_kword"]["reference"] > 5  # the book names a lot
    swapped = T.themes(chapters[1:] + chapters[:1], chapters, book_text[:1_000_000], seed=0)
    assert swapped["content_per_prompt"]["own"] > th["content_per_prompt"]["own"]
    assert swapped["content_jsd_to_real"] == 0.0  # the same texts pooled
    words = [w for c in chapters for w in c.split()]
    random.Random(0).shuffle(words)
    babble = T.themes([" ".join(words[i::5]) for i in range(5)], chapters, book_text[:1_000_000], seed=0)
    assert babble["content_per_prompt"]["own"] > 0.3  # the right words, but not each prompt's
