"""baselines.py: Kneser-Ney and unigram by hand, KN is a distribution, compressors given train, the cache."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from bookgpt.eval import baselines as B


def test_kneser_ney_matches_a_hand_calculation() -> None:
    # train "aab", order 2, discount D = 0.75.
    # Order 1 uses continuation counts: "a" follows 1 distinct byte (a in "aa"), "b" 1 (a in "ab").
    # So N1+(..) = 2 and the mass freed is D * 2 types = 1.5, spread uniformly over 256 bytes:
    #   p1(a) = p1(b) = (1 - 0.75 + 1.5 / 256) / 2 = 0.1279296875
    # Order 2 uses raw counts: c(aa) = c(ab) = 1, c(a.) = 2, freed mass again 0.75 * 2 = 1.5:
    #   p2(b | a) = (1 - 0.75 + 1.5 * p1(b)) / 2 = 0.220947265625
    # Held-out "ab": "a" has no context, so it gets p1(a); "b" gets p2(b | a).
    p1_a, p2_b_a = 0.1279296875, 0.220947265625
    np.testing.assert_allclose(B.kn_probs(B.kn_levels(b"aab", 2), b"ab"), [p1_a, p2_b_a])
    assert B.ngram_kn_bpb(b"aab", b"ab", 2) == pytest.approx(-(math.log2(p1_a) + math.log2(p2_b_a)) / 2)
    # an unseen context ("b" is never followed by anything in train) falls back to order 1
    assert B.kn_probs(B.kn_levels(b"aab", 2), b"ba")[1] == pytest.approx(p1_a)


def test_unigram_matches_a_hand_calculation() -> None:
    # add-one: p(a) = (2 + 1) / (3 + 256), p(z) = 1 / 259
    assert B.unigram_bpb(b"aab", b"az") == pytest.approx(-(math.log2(3 / 259) + math.log2(1 / 259)) / 2)


@pytest.mark.parametrize("order, modified", [(1, False), (3, False), (5, True), (8, False)])
def test_kneser_ney_is_a_distribution(order: int, modified: bool) -> None:
    train = b"the cat sat on the mat; the cat ate the rat. " * 3 + bytes(range(40, 60))
    levels = B.kn_levels(train, order, modified)
    for context in (b"the ca", b"zzzzzzz", b"at", b""):
        probs = [B.kn_probs(levels, context + bytes([w]))[-1] for w in range(256)]
        assert sum(probs) == pytest.approx(1.0) and min(probs) > 0


@pytest.mark.parametrize("vocab, order", [(2, 7), (11, 5), (2048, 5), (3000, 3)])
def test_kneser_ney_over_tokens_is_a_distribution(vocab: int, order: int) -> None:
    rng = np.random.default_rng(vocab)
    train = np.concatenate([np.tile(rng.integers(0, vocab, 12), 30), rng.integers(0, vocab, 200)])
    levels = B.kn_levels(train, order, modified=True, vocab_size=vocab)
    for context in (train[:order], rng.integers(0, vocab, order), train[5:7]):
        probs = [B.kn_probs(levels, np.append(context, w))[-1] for w in range(vocab)]
        assert sum(probs) == pytest.approx(1.0) and min(probs) > 0
    # the seen sequence is predicted far better than uniform
    assert -np.log2(B.kn_probs(levels, train[:60])).mean() < 0.5 * math.log2(vocab)


def test_token_and_byte_kneser_ney_agree_on_bytes() -> None:
    train, held = b"the cat sat on the mat; the cat ate the rat. " * 3, b"the rat sat on the cat"
    as_ids = lambda b: np.frombuffer(b, dtype=np.uint8).astype(np.int64)  # noqa: E731
    np.testing.assert_allclose(B.kn_probs(B.kn_levels(as_ids(train), 5, True, vocab_size=256), as_ids(held)),
                               B.kn_probs(B.kn_levels(train, 5, True), held))
    assert B.max_order(256) == 8 and B.max_order(2048) == 5 and B.max_order(104) == 9
    with pytest.raises(ValueError, match=r"must be 1..5"):
        B.kn_levels(as_ids(train), 6, vocab_size=2048)


def test_higher_order_helps_on_repetitive_text() -> None:
    train = b"Pierre went to see Natasha. " * 20
    held = b"Pierre went to see Natasha. "
    bpbs = [B.ngram_kn_bpb(train, held, n) for n in (1, 2, 4, 8)]
    assert bpbs[0] > 3 > bpbs[1] > bpbs[2] and bpbs[3] < 0.5


def test_compressor_given_train() -> None:
    rng = random.Random(0)
    train = " ".join(rng.choice(["war", "peace", "Pierre", "Moscow", "the", "and"]) for _ in range(5000)).encode()
    copy = train[1000:3000]
    noise = bytes(rng.randrange(256) for _ in range(2000))
    for name in B.COMPRESSORS:
        assert B.compressor_bpb(train, noise, name) > 7.5  # random bytes do not compress
    assert B.compressor_bpb(train, copy, "xz") < 0.2  # a passage it has already seen costs almost nothing


def test_baselines_are_cached_per_dataset(tmp_path: Path) -> None:
    train, held = b"abracadabra " * 50, b"cadabra abra "
    logs: list[str] = []
    first, cached = B.cached_baselines(tmp_path, "val", train, held, {"sha256_clean": "x"}, 3, logs.append)
    assert not cached and set(first) == {"unigram", "kn2", "kn3", "mkn3", "zlib", "bz2", "xz"}
    assert first["kn3"]["bpb"] == pytest.approx(B.ngram_kn_bpb(train, held, 3))
    again, cached = B.cached_baselines(tmp_path, "val", train, held, {"sha256_clean": "x"}, 3, logs.append)
    assert cached and again == first
    _, cached = B.cached_baselines(tmp_path, "val", train, held + b"!", {"sha256_clean": "x"}, 3, logs.append)
    assert not cached  # another text: computed again
