"""The two-sample test of style: chance for two sets of real passages, near 1 for an obviously different text,
pieces cut at the same places, prompts held out whole, and the temperature it helps choose."""
from __future__ import annotations

import random

import pytest

from bookgpt.eval.textstats import choose_temperature
from bookgpt.eval.twosample import FOLDS, distinguishability, pieces, two_sample_test


def passages(text: str, n: int, chars: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [text[(s := rng.randrange(len(text) - chars)):s + chars] for _ in range(n)]


def test_real_against_real_is_chance_and_a_different_text_is_told_at_once(book_text: str) -> None:
    body = book_text[len(book_text) // 10:]
    a, b = passages(body, 100, 400, seed=0), passages(body, 100, 400, seed=1)
    groups = list(range(100))
    assert 0.38 <= distinguishability(a, b, groups) <= 0.62  # the control: it cannot tell
    # the same passages with each word's letters reversed: the same letters and words' lengths, other n-grams
    reversed_words = [" ".join(w[::-1] for w in p.split(" ")) for p in b]
    assert distinguishability(a, reversed_words, groups) >= 0.95
    assert distinguishability(a, reversed_words, groups, "word", (1, 2)) >= 0.95


def test_pieces_are_cut_at_the_same_places_and_grouped_by_prompt() -> None:
    gen, ref = ["abcdefghij", "klmnopq"], ["ABCDEFGHIJKL", "KLMNO"]
    a, b, groups = pieces(gen, ref, 3)
    assert a == ["abc", "def", "ghi", "klm"] and b == ["ABC", "DEF", "GHI", "KLM"] and groups == [0, 0, 0, 1]


def test_too_few_prompts_skip_the_test_with_the_reason() -> None:
    out = two_sample_test(["a" * 40] * (FOLDS - 1), ["b" * 40] * (FOLDS - 1), 10)
    assert out["pieces"] == 4 * (FOLDS - 1) and "skipped" in out and "generated_vs_real" not in out


def test_a_sample_that_copies_its_prompts_real_continuation_is_not_told(book_text: str) -> None:
    """Every piece of a prompt stays in one fold: a generated text equal to the real one scores 0.5, not more;
    the control (even prompts' real continuations against the odd ones', neighbours in the text) is chance."""
    start = len(book_text) // 10
    real = [book_text[start + i * 1000:start + i * 1000 + 800] for i in range(40)]  # prompts in order, no overlap
    out = two_sample_test(real, real, 400)
    assert out["prompts"] == 40 and out["pieces"] == 80 and out["control_pieces"] == 40
    assert all(acc <= 0.5 for acc in out["generated_vs_real"].values())
    assert all(0.3 <= acc <= 0.7 for acc in out["real_vs_real"].values())


def test_the_temperature_within_the_caps_that_reads_most_like_the_book_is_chosen() -> None:
    t = lambda temperature, told, misspell=1.0: {"temperature": temperature, "copy_ratio": 0.5,
                                                 "misspell_ratio": misspell, "distinguishable": told}
    assert choose_temperature([t(0.6, 0.95), t(0.7, 0.90), t(0.8, 0.92)])["temperature"] == 0.7
    assert choose_temperature([t(0.7, 0.90), t(0.9, 0.80, misspell=2.0)])["temperature"] == 0.7  # 0.9 misspells
    assert choose_temperature([t(0.7, 0.90), t(0.8, 0.90)])["temperature"] == 0.8  # a tie: the warmer


def test_without_scikit_learn_evaluate_says_how_to_get_it_or_skip_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from bookgpt.config import UserError
    from bookgpt.eval.twosample import require_sklearn
    real_import = builtins.__import__

    def no_sklearn(name: str, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(UserError, match=r"pip install scikit-learn .*--two_sample_chars=0"):
        require_sklearn()
