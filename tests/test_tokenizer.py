"""Tokenizers: exact round trips on the real book, the char vocabulary, BPE determinism,
offline GPT-2 with hash checks, meta.json loading and its errors."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bookgpt import tokenizer as T
from bookgpt.config import UserError
from prepare import clean_text, decode_text

# Session-scoped, so hypothesis tests may use them too.
@pytest.fixture(scope="session")
def book(book_path: Path) -> str:
    return clean_text(decode_text(book_path.read_bytes()))[0]


@pytest.fixture(scope="session")
def small_bpe(book: str) -> T.BPETokenizer:
    return T.train_bpe(book[:300_000], 400)


@pytest.fixture(scope="session")
def gpt2(gpt2_dir: Path) -> T.GPT2Tokenizer:
    return T.gpt2_from_dir(gpt2_dir)


# ----------------------------------------------------------------------------- the real book

def test_char_vocabulary_of_the_book_is_104(book: str) -> None:
    tok = T.CharTokenizer.from_text(book)
    assert tok.vocab_size == 104 == len(set(book))
    assert tok.dtype == np.uint8
    assert tok.chars == "".join(sorted(set(book)))
    assert "\n" in tok.chars and "\r" not in tok.chars and "“" in tok.chars


@pytest.mark.parametrize("kind", T.KINDS)
def test_round_trip_on_the_real_book(kind: str, book: str) -> None:
    vocab_text = book if kind != "bpe" else book[:500_000]  # a smaller training slice keeps this fast
    tok = T.make_tokenizer(kind, vocab_text, vocab_size=512)
    ids = tok.encode_array(book)
    assert ids.dtype == (np.uint8 if kind in ("char", "byte") else np.uint16)
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == book
    assert tok.decode_bytes(ids) == book.encode("utf-8")
    assert tok.encode("Pierre said “Well!”") == tok.encode_array("Pierre said “Well!”").tolist()
    # the compression each kind should give on English prose, roughly
    chars_per_token = len(book) / ids.size
    expected = {"char": (1.0, 1.0), "byte": (0.97, 0.99), "gpt2": (3.5, 4.5), "bpe": (1.8, 2.5)}[kind]  # bpe at 512
    assert expected[0] <= chars_per_token <= expected[1], chars_per_token


# ----------------------------------------------------------------------------- char

def test_char_unknown_characters_are_named() -> None:
    tok = T.CharTokenizer.from_text("abc \n")
    with pytest.raises(UserError, match=r"does not know: 'é', '€'$"):
        tok.encode("a €é b é")


def test_char_many_unknown_characters_are_summarised() -> None:
    tok = T.CharTokenizer("a")
    with pytest.raises(UserError, match=r"'b', .* and 5 more$"):
        tok.encode("bcdefghijklmnop")


@given(vocab=st.text(min_size=1), text=st.text())
def test_char_encodes_known_and_reports_unknown(vocab: str, text: str) -> None:
    tok = T.CharTokenizer.from_text(vocab)
    unknown = set(text) - set(vocab)
    if unknown:
        with pytest.raises(UserError) as e:
            tok.encode(text)
        assert all(repr(c) in str(e.value) for c in sorted(unknown)[:10])
    else:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_char_rejects_unsorted_or_repeated_chars() -> None:
    for chars in ("", "ba", "aab"):
        with pytest.raises(UserError):
            T.CharTokenizer(chars)


# ----------------------------------------------------------------------------- byte and bpe

@given(st.text())
def test_byte_round_trip(text: str) -> None:
    tok = T.ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@settings(max_examples=200)
@given(st.text())
def test_bpe_round_trip(small_bpe: T.BPETokenizer, text: str) -> None:
    tok = small_bpe
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_bpe_dropout_segments_at_random_and_decodes_back(small_bpe: T.BPETokenizer, book: str) -> None:
    tok, text = small_bpe, book[300_000:340_000]  # text the BPE did not learn from
    # no dropout: tiktoken's tokens, piece for piece (the same split pattern, the same merge order)
    assert np.array_equal(tok.encode_dropout(text, 0.0, random.Random(0)), tok.encode_array(text))
    a, b = (tok.encode_dropout(text, 0.1, random.Random(seed)) for seed in (1, 2))
    assert tok.decode(a) == text and tok.decode(b) == text and not np.array_equal(a, b)
    # fewer merges: more, shorter tokens, and more of them the higher the rate
    n = len(tok.encode(text))
    assert n < len(a) < len(tok.encode_dropout(text, 0.5, random.Random(1))) < len(text.encode("utf-8"))
    assert np.array_equal(tok.encode_dropout(text, 0.1, random.Random(1)), a)  # a seed gives one segmentation
    assert list(tok.encode_dropout(text, 1.0, random.Random(0))) == list(text.encode("utf-8"))  # no merge at all
    with pytest.raises(UserError, match=r"BPE dropout must be in \[0, 1\]"):
        tok.encode_dropout(text, 1.5, random.Random(0))


@settings(max_examples=100)
@given(st.text(), st.floats(0, 1))
def test_bpe_dropout_round_trip(small_bpe: T.BPETokenizer, text: str, p: float) -> None:
    assert small_bpe.decode(small_bpe.encode_dropout(text, p, random.Random(0))) == text


@given(st.text())
def test_gpt2_round_trip(gpt2: T.GPT2Tokenizer, text: str) -> None:
    assert gpt2.decode(gpt2.encode(text)) == text


def test_decode_bytes_can_split_a_character_for_streaming() -> None:
    tok = T.ByteTokenizer()
    ids = tok.encode("é")
    assert len(ids) == 2
    assert tok.decode_bytes(ids[:1]) + tok.decode_bytes(ids[1:]) == "é".encode()
    assert tok.decode(ids[:1]) == "\ufffd"  # half a character decodes to a replacement, not an exception


def test_ids_outside_the_vocabulary_are_an_error(small_bpe: T.BPETokenizer) -> None:
    for tok in (T.CharTokenizer("ab"), T.ByteTokenizer(), small_bpe):
        with pytest.raises(ValueError, match="outside"):
            tok.decode([tok.vocab_size])
        with pytest.raises(ValueError, match="outside"):
            tok.decode([-1])


def test_bpe_training_is_deterministic_and_sized(book: str) -> None:
    a, b = T.train_bpe(book[:200_000], 300), T.train_bpe(book[:200_000], 300)
    assert a.files() == b.files()
    assert a.vocab_size == 300
    assert set(a.ranks.values()) == set(range(300))
    assert all(a.ranks[bytes([i])] == i for i in range(256))  # the 256 bytes come first


def test_bpe_ranks_file_is_tiktoken_format(small_bpe: T.BPETokenizer) -> None:
    tok = small_bpe
    data = tok.files()[T.BPE_RANKS_FILE]
    first = data.splitlines()[65]
    assert first == b"QQ== 65"  # base64 of b"A", then its rank
    assert T.ranks_from_bytes(data, "x") == tok.ranks
    with pytest.raises(UserError, match="not a valid tiktoken ranks file"):
        T.ranks_from_bytes(b"QQ== 65 extra\n", "x")


def test_bpe_vocab_size_out_of_range() -> None:
    with pytest.raises(UserError, match="between 256 and 65536"):
        T.train_bpe("some text", 100)


# ----------------------------------------------------------------------------- gpt2

def test_gpt2_offline_matches_known_ids(gpt2: T.GPT2Tokenizer, gpt2_dir: Path) -> None:
    tok = gpt2
    assert tok.vocab_size == 50257 and tok.dtype == np.uint16
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.encode("<|endoftext|>") != [50256]  # special tokens stay plain text
    assert tok.to_meta() == {"kind": "gpt2", "gpt2_dir": str(gpt2_dir.resolve())}


def test_gpt2_pattern_is_tiktokens() -> None:
    from tiktoken_ext.openai_public import r50k_pat_str

    assert T.GPT2_PATTERN == r50k_pat_str


def test_gpt2_hash_mismatch_is_a_clear_error(gpt2_dir: Path, tmp_path: Path) -> None:
    shutil.copy(gpt2_dir / "vocab.bpe", tmp_path / "vocab.bpe")
    data = (gpt2_dir / "encoder.json").read_bytes()
    (tmp_path / "encoder.json").write_bytes(data.replace(b'"!": 0', b'"!": 1', 1))
    with pytest.raises(UserError, match=r"encoder.json has the wrong sha256"):
        T.gpt2_from_dir(tmp_path)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(UserError, match="not found"):
        T.gpt2_from_dir(tmp_path)


def test_gpt2_dir_from_environment(gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(T.GPT2_DIR_ENV, str(gpt2_dir))
    assert T.load_gpt2().encode("Hello world") == [15496, 995]
    monkeypatch.setenv(T.GPT2_DIR_ENV, str(tmp_path))  # set but wrong: an error, not a silent download
    with pytest.raises(UserError, match="not found"):
        T.load_gpt2()


def test_gpt2_without_network_or_folder_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(T.GPT2_DIR_ENV)

    def offline(name: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(T.tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="--gpt2_dir=DIR or set BOOKGPT_GPT2_DIR"):
        T.load_gpt2()


# ----------------------------------------------------------------------------- meta.json

def _save(tmp_path: Path, tok: T.Tokenizer) -> dict:
    meta = {"tokenizer": tok.to_meta(), "vocab_size": tok.vocab_size, "dtype": tok.dtype.name, "splits": {}}
    for name, data in tok.files().items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return meta


@pytest.mark.parametrize("kind", T.KINDS)
def test_load_tokenizer_rebuilds_the_same_tokenizer(kind: str, small_bpe: T.BPETokenizer, tmp_path: Path) -> None:
    text = "It was in July, 1805, and the speaker was the well-known Anna Pávlovna Schérer.\n" * 20
    tok = small_bpe if kind == "bpe" else T.make_tokenizer(kind, text)
    _save(tmp_path, tok)
    again = T.load_tokenizer(tmp_path)
    assert (again.kind, again.vocab_size) == (tok.kind, tok.vocab_size)
    assert again.encode(text) == tok.encode(text)
    assert again.to_meta() == tok.to_meta()


def test_read_meta_errors_say_run_prepare(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no meta.json .* python prepare.py"):
        T.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt.*re-run prepare.py"):
        T.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"tokenizer": {"kind": "char"}}')
    with pytest.raises(UserError, match="lacks vocab_size, dtype, splits"):
        T.read_meta(tmp_path)


def test_meta_problems_are_user_errors(small_bpe: T.BPETokenizer, tmp_path: Path) -> None:
    meta = _save(tmp_path, small_bpe)
    with pytest.raises(UserError, match="unknown tokenizer kind 'wordpiece'"):
        T.tokenizer_from_meta({"tokenizer": {"kind": "wordpiece"}}, tmp_path)
    with pytest.raises(UserError, match="missing tokenizer details"):
        T.tokenizer_from_meta({"tokenizer": {"kind": "char"}}, tmp_path)
    with pytest.raises(UserError, match="says vocab_size 5"):
        T.tokenizer_from_meta({**meta, "vocab_size": 5}, tmp_path)
    (tmp_path / T.BPE_RANKS_FILE).write_bytes(b"AA== 0\n")  # another run's ranks file
    with pytest.raises(UserError, match="does not match"):
        T.load_tokenizer(tmp_path)
    (tmp_path / T.BPE_RANKS_FILE).unlink()
    with pytest.raises(UserError, match="is missing"):
        T.load_tokenizer(tmp_path)


def test_sha256_constants_match_the_shared_files(gpt2_dir: Path) -> None:
    for name, expected in T.GPT2_FILE_HASHES.items():
        assert hashlib.sha256((gpt2_dir / name).read_bytes()).hexdigest() == expected


def test_a_plain_quote_in_a_char_prompt_names_the_books_quotes() -> None:
    from bookgpt.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("“Well,” he said. It’s so.\n")
    with pytest.raises(UserError, match=r"""does not know: "'", 'x'; the book writes ’ “ ” instead: use those$"""):
        tok.encode("it's x")
    with pytest.raises(UserError, match=r"does not know: 'x'$"):  # no quote asked for: no advice about quotes
        tok.encode("x")
