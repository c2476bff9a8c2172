"""prepare.py: Gutenberg cleaning, newline-aligned splits, bins + meta.json, downloads (faked),
and the error paths (one line, exit status 2, no partial files)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import prepare as P
import testdata
from bookgpt.config import UserError
from bookgpt.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def cfg(tmp_path: Path, **kw) -> P.PrepareConfig:
    base = {"out_dir": str(tmp_path / "out"), "raw_dir": str(tmp_path / "raw"), "tokenizer": "char"}
    return dataclasses.replace(P.PrepareConfig(), **{**base, **kw})


def book_file(tmp_path: Path, text: str | bytes, name: str = "book.txt") -> str:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(p)


def story(lines: int = 200) -> str:
    return "".join(f"Line {i}: “Well, Prince,” said Anna Pávlovna — it was July, 1805.\n" for i in range(lines))


@pytest.fixture(scope="module")
def clean_book(book_path: Path) -> str:
    return P.clean_text(P.decode_text(book_path.read_bytes()))[0]


# ----------------------------------------------------------------------------- cleaning

HEADER = "The Project Gutenberg eBook of War and Peace\n\nTitle: War and Peace\n\n"
LICENCE = "\nUpdated editions will replace the previous one.\nSTART: FULL LICENSE\n*** START: FULL LICENSE ***\n"


@pytest.mark.parametrize("start,end", [
    ("*** START OF THE PROJECT GUTENBERG EBOOK WAR AND PEACE ***", "*** END OF THE PROJECT GUTENBERG EBOOK WAR AND PEACE ***"),
    ("*** START OF THIS PROJECT GUTENBERG EBOOK WAR AND PEACE ***", "*** END OF THIS PROJECT GUTENBERG EBOOK WAR AND PEACE ***"),
    ("***START OF THE PROJECT GUTENBERG EBOOK 2600***", "***END OF THE PROJECT GUTENBERG EBOOK 2600***"),
    ("*** Start of the Project Gutenberg EBook of War and Peace", "*** End of the Project Gutenberg EBook of War and Peace"),
])
def test_marker_variants(start: str, end: str) -> None:
    body = "CHAPTER I\n\n“Well, Prince,” she said.\n*** (a line of stars in the book stays)\n"
    text, warnings = P.strip_gutenberg(f"{HEADER}{start}\n\n\n{body}\n\n{end}{LICENCE}")
    assert text == body
    assert warnings == []


def test_end_in_words_before_the_marker_is_dropped() -> None:
    text, _ = P.strip_gutenberg("*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nThe end.\n\n"
                                "End of the Project Gutenberg EBook of X, by Y\n\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n")
    assert text == "The end.\n"


def test_no_markers_keeps_everything_and_warns() -> None:
    text, warnings = P.strip_gutenberg("\n\n  An indented first line.\nMore.  \n\n")
    assert text == "  An indented first line.\nMore.\n"
    assert warnings == ["no Project Gutenberg START/END markers found; using the whole file"]


def test_one_marker_only_warns() -> None:
    text, warnings = P.strip_gutenberg("header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n")
    assert text == "body\n" and "START marker but not its partner" in warnings[0]
    text, warnings = P.strip_gutenberg("body\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence\n")
    assert text == "body\n" and "END marker" in warnings[0]


def test_crlf_cr_and_bom() -> None:
    assert P.normalize_newlines("\ufeffa\r\nb\rc\n\r\nd") == "a\nb\nc\n\nd"
    raw = "\ufeff*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nOne\r\nTwo\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
    assert P.clean_text(P.decode_text(raw.encode("utf-8")))[0] == "One\nTwo\n"


EDITIONS = [("pg2600.txt", "WAR AND PEACE\n", True),
            ("pg2600_2019_edition.txt", "An Anonymous Volunteer, and David Widger\n", True),
            ("warpeace_input_cr.txt", "\"Well, Prince, so Genoa and Lucca", False)]


# the book always; the older editions where the folder that holds the book has them (../shared does)
@pytest.mark.parametrize("name,first,markers", [e for e in EDITIONS if e[0] == "pg2600.txt" or
                                                (testdata.book() and (testdata.book().parent / e[0]).is_file())])
def test_real_editions(book_path: Path, name: str, first: str, markers: bool) -> None:
    text, warnings = P.clean_text(P.decode_text((book_path.parent / name).read_bytes()))
    assert text.startswith(first)
    assert text.endswith("to recognize a dependence of which we are not\nconscious.\n")
    assert "\r" not in text and "\ufeff" not in text
    assert "Gutenberg" not in text and "LICENSE" not in text
    assert (warnings == []) == markers
    assert 3_190_000 < len(text) < 3_210_000


@given(st.text())
def test_cleaning_never_raises(text: str) -> None:
    out, warnings = P.clean_text(text)
    assert "\r" not in out and not out.startswith("\ufeff")
    assert out == "" or out.endswith("\n")
    assert len(warnings) <= 1


@given(st.text(alphabet=st.characters(blacklist_characters="*\r"), min_size=1), st.sampled_from(["THE", "THIS"]))
def test_text_between_markers_is_kept_exactly(body: str, which: str) -> None:
    body = P.normalize_newlines(body)
    expected = P.strip_gutenberg(body)[0]  # the same trimming, without markers
    wrapped = f"header\n*** START OF {which} PROJECT GUTENBERG EBOOK 1 ***\n{body}\n*** END OF {which} PROJECT GUTENBERG EBOOK 1 ***\nlicence"
    if "end of" not in body.lower():  # keep the 'End of the Project Gutenberg ...' rule out of it
        assert P.strip_gutenberg(wrapped)[0] == expected


# ----------------------------------------------------------------------------- decoding errors

def test_decode_errors() -> None:
    with pytest.raises(UserError, match="is empty"):
        P.decode_text(b" \n\r\n")
    with pytest.raises(UserError, match="binary.*NUL"):
        P.decode_text(b"text\x00more")
    with pytest.raises(UserError, match=r"not valid utf-8 \(byte 0xe9 at offset 3\).*--encoding=cp1252.*iconv"):
        P.decode_text("café".encode("cp1252"))
    with pytest.raises(UserError, match="unknown --encoding 'klingon'"):
        P.decode_text(b"abc", "klingon")
    assert P.decode_text("café “x”".encode("cp1252"), "cp1252") == "café “x”"


# ----------------------------------------------------------------------------- splits

@pytest.mark.parametrize("val,test", [(0.1, 0.0), (0.05, 0.1), (0.3, 0.3)])
def test_splits_cut_at_newlines_and_concatenate(clean_book: str, val: float, test: float) -> None:
    splits = P.split_text(clean_book, val, test)
    assert list(splits) == ["train", "val", "test"][: 3 if test else 2]
    assert "".join(splits.values()) == clean_book
    for part in splits.values():
        assert part.endswith("\n")
    n = len(clean_book)
    assert abs(len(splits["val"]) - val * n) < 200  # lines are short: the cut moves a little
    if test:
        assert abs(len(splits["test"]) - test * n) < 200


@pytest.mark.parametrize("val,test,block", [(0.05, 0.05, 0.01), (0.1, 0.0, 0.01), (0.05, 0.1, 0.02), (0.2, 0.2, 0.05)])
def test_blocks_are_whole_paragraphs_spread_through_the_book(clean_book: str, val: float, test: float,
                                                             block: float) -> None:
    splits, layout = P.split_blocks(clean_book, val, test, block)
    bounds, owners = layout["bounds"], layout["owners"]
    assert bounds[0] == 0 and bounds[-1] == len(clean_book) and bounds == sorted(set(bounds))  # disjoint, in order
    assert len(owners) == len(bounds) - 1 == round(1 / block)
    assert all(clean_book[b - 2:b] == "\n\n" for b in bounds[1:-1])  # every cut at a paragraph break
    assert P.join_blocks(splits, layout) == clean_book
    assert sum(map(len, splits.values())) == len(clean_book)
    size = len(clean_book) * block
    for name, fraction in (("val", val), ("test", test)):
        got = len(splits.get(name, ""))
        assert abs(got - fraction * len(clean_book)) <= 1.5 * size  # within a block of the request
        held = [i for i, o in enumerate(owners) if o == name]
        if len(held) > 1:  # spread evenly: gaps between held-out blocks differ by at most one block
            gaps = [b - a for a, b in zip(held, held[1:])]
            assert max(gaps) - min(gaps) <= 1
    assert not set(i for i, o in enumerate(owners) if o == "val") & set(i for i, o in enumerate(owners) if o == "test")
    if test:  # the book's end is not the whole test split
        assert owners.count("test") >= 2 and owners.index("test") < len(owners) // 2


def test_the_default_holds_out_passages_not_the_ending(clean_book: str) -> None:
    """War and Peace ends with the second epilogue, an essay on history: a tail split scores that."""
    tail = P.split_text(clean_book, 0.05, 0.05)
    blocks, layout = P.split_blocks(clean_book, 0.05, 0.05)
    assert "Second Epilogue".upper() in tail["test"].upper() or "EPILOGUE" in tail["test"].upper()
    assert layout["owners"].count("val") == layout["owners"].count("test") == 5
    assert blocks["val"].count("Natásha") > 0 and blocks["test"].count("Pierre") > 0  # the novel's people, not an essay


def test_split_errors() -> None:
    with pytest.raises(UserError, match="val split would have 0 characters"):
        P.split_text("x" * 1000 + "\n", 0.1)  # no newline to cut at
    with pytest.raises(UserError, match="too short"):
        P.split_text("a\n" * 100, 0.1)  # val would be 20 characters
    for val, test in [(0.0, 0.0), (1.0, 0.0), (0.5, 0.5), (0.1, -0.1)]:
        with pytest.raises(UserError, match="bad split fractions"):
            P.split_text(story(), val, test)


# ----------------------------------------------------------------------------- the whole stage

@pytest.mark.parametrize("kind", ["char", "byte", "gpt2", "bpe"])
def test_prepare_the_real_book(kind: str, book_path: Path, clean_book: str, tmp_path: Path) -> None:
    meta = P.prepare(cfg(tmp_path, tokenizer=kind, input=str(book_path), vocab_size=512))
    out = tmp_path / "out"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["source"] == str(book_path.resolve())
    assert meta["sha256_raw"] == P.DEFAULT_SHA256
    assert meta["sha256_clean"] == hashlib.sha256(clean_book.encode()).hexdigest()
    assert meta["fractions"] == {"val": 0.05, "test": 0.05} and meta["layout"]["kind"] == "blocks"  # the defaults
    assert meta["dtype"] == ("uint8" if kind in ("char", "byte") else "uint16")
    assert meta["vocab_size"] == {"char": 104, "byte": 256, "gpt2": 50257, "bpe": 512}[kind]
    tok = load_tokenizer(out)
    texts = {}
    for split in ("train", "val", "test"):
        ids = np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r")
        counts = meta["splits"][split]
        assert ids.size == counts["tokens"] == (out / f"{split}.bin").stat().st_size // ids.itemsize
        text = tok.decode(ids)
        assert (len(text), len(text.encode())) == (counts["chars"], counts["bytes"])
        texts[split] = text
    assert P.join_blocks(texts, meta["layout"]) == clean_book  # the bins are the book, block by block
    assert sum(c["chars"] for c in meta["splits"].values()) == len(clean_book)


def test_bpe_output_is_deterministic(book_path: Path, tmp_path: Path) -> None:
    files = []
    for run in ("a", "b"):
        P.prepare(cfg(tmp_path, tokenizer="bpe", vocab_size=300, input=str(book_path), out_dir=str(tmp_path / run)))
        files.append({p.name: p.read_bytes() for p in (tmp_path / run).iterdir() if p.name != "meta.json"})
    assert files[0] == files[1] and set(files[0]) == {"bpe.tiktoken", "train.bin", "val.bin", "test.bin"}


def test_custom_book_and_stale_test_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = book_file(tmp_path, story().replace("\n", "\r\n"))
    P.prepare(cfg(tmp_path, input=path, test_fraction=0.1))
    assert (tmp_path / "out" / "test.bin").exists()
    assert "no Project Gutenberg START/END markers" in capsys.readouterr().err
    meta = P.prepare(cfg(tmp_path, input=path, test_fraction=0.0))
    assert not (tmp_path / "out" / "test.bin").exists() and "test" not in meta["splits"]
    assert meta["splits"]["train"]["chars"] + meta["splits"]["val"]["chars"] == len(story())


def test_bpe_dropout_writes_random_segmentations_of_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = book_file(tmp_path, story(2000))
    meta = P.prepare(cfg(tmp_path, input=path, tokenizer="bpe", vocab_size=300, bpe_dropout=0.2, dropout_copies=3))
    out = tmp_path / "out"
    tok = load_tokenizer(out)
    train = tok.decode(np.fromfile(out / "train.bin", dtype=meta["dtype"]))
    drop = np.fromfile(out / "train_dropout.bin", dtype=meta["dtype"])
    assert meta["train_dropout"] == {"bpe_dropout": 0.2, "copies": 3, "tokens": len(drop)}
    assert tok.decode(drop) == train * 3  # three segmentations of the train split, one after another
    assert len(drop) > 3 * meta["splits"]["train"]["tokens"]  # each with fewer merges than encode's
    assert "3 segmentations of train with BPE dropout 0.2" in capsys.readouterr().out
    first = (out / "train_dropout.bin").read_bytes()
    P.prepare(cfg(tmp_path, input=path, tokenizer="bpe", vocab_size=300, bpe_dropout=0.2, dropout_copies=3))
    assert (out / "train_dropout.bin").read_bytes() == first  # the same file every time
    meta = P.prepare(cfg(tmp_path, input=path, tokenizer="bpe", vocab_size=300))
    assert not (out / "train_dropout.bin").exists() and "train_dropout" not in meta  # no stale file
    for bad in ({"tokenizer": "char", "bpe_dropout": 0.1}, {"tokenizer": "bpe", "bpe_dropout": 1.0},
                {"tokenizer": "bpe", "bpe_dropout": 0.1, "dropout_copies": 0}):
        with pytest.raises(UserError, match="--bpe_dropout needs --tokenizer=bpe"):
            P.prepare(cfg(tmp_path, input=path, **bad))


def test_encoding_option_reads_cp1252(tmp_path: Path) -> None:
    path = book_file(tmp_path, story().replace("—", "-").encode("cp1252"))
    meta = P.prepare(cfg(tmp_path, input=path, encoding="cp1252"))
    assert "á" in meta["tokenizer"]["chars"] and "“" in meta["tokenizer"]["chars"]


# ----------------------------------------------------------------------------- errors leave nothing behind

@pytest.mark.parametrize("content,match", [
    (None, "input file not found"),
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "looks binary"),
    ("Tolstóy\n".encode("cp1252") * 50, "not valid utf-8"),
    (b"*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n", "no text left"),
    (b"one line without a newline to cut at" * 10, "too short"),
])
def test_bad_input_is_a_user_error_and_writes_nothing(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = str(tmp_path / "missing.txt") if content is None else book_file(tmp_path, content)
    with pytest.raises(UserError, match=match):
        P.prepare(cfg(tmp_path, input=path))
    assert not (tmp_path / "out").exists()


def test_bad_options(tmp_path: Path) -> None:
    path = book_file(tmp_path, story())
    with pytest.raises(UserError, match="unknown tokenizer 'words'; choose one of char, byte, gpt2, bpe"):
        P.prepare(cfg(tmp_path, input=path, tokenizer="words"))
    with pytest.raises(UserError, match="--vocab_size must be between 256 and 65536"):
        P.prepare(cfg(tmp_path, input=path, tokenizer="bpe", vocab_size=70000))
    assert not (tmp_path / "out").exists()


def test_failed_run_leaves_previous_output_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    P.prepare(cfg(tmp_path, input=book_file(tmp_path, story())))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(UserError):
        P.prepare(cfg(tmp_path, input=book_file(tmp_path, b"", "empty.txt")))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived while tokenizing

    monkeypatch.setattr(P, "make_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(cfg(tmp_path, input=book_file(tmp_path, story(300), "other.txt")))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


# ----------------------------------------------------------------------------- downloads (faked: no network)

class FakeResponse:
    def __init__(self, body: bytes):
        self.body = body
        self.headers = {"content-length": str(len(body))}

    def __enter__(self) -> "FakeResponse":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def raise_for_status(self) -> None:
        pass

    def iter_content(self, chunk_size: int):
        for i in range(0, len(self.body), chunk_size):
            yield self.body[i:i + chunk_size]


def test_download_is_cached_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    import requests

    calls = []
    body = ("*** START OF THE PROJECT GUTENBERG EBOOK 2600 ***\n" + story() + "*** END OF THE PROJECT GUTENBERG EBOOK 2600 ***\n").encode()

    def fake_get(url: str, stream: bool, timeout: float) -> FakeResponse:
        calls.append((url, timeout))
        return FakeResponse(body)

    monkeypatch.setattr(requests, "get", fake_get)
    meta = P.prepare(cfg(tmp_path))  # the default URL
    assert calls == [(P.DEFAULT_URL, 30.0)]
    assert meta["source"] == P.DEFAULT_URL
    cached = list((tmp_path / "raw").iterdir())
    assert [p.read_bytes() for p in cached] == [body] and cached[0].name.endswith("-pg2600.txt")
    assert "differs from the edition bookgpt was tested with" in capsys.readouterr().err  # a warning only
    P.prepare(cfg(tmp_path))
    assert len(calls) == 1  # the second run used the cache


def test_download_failure_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"download of http://127.0.0.1:9/x failed .*--input=path"):
        P.prepare(cfg(tmp_path, input="http://127.0.0.1:9/x", timeout=2))
    assert not (tmp_path / "out").exists() and not any((tmp_path / "raw").glob("*"))


def test_bpe_without_rustbpe_is_one_line_before_any_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU box often has no rustbpe (and no internet): say so, and how to bring it as a wheel, before anything."""
    monkeypatch.setitem(sys.modules, "rustbpe", None)  # import rustbpe raises ImportError
    monkeypatch.setattr(P, "download", lambda *a, **k: pytest.fail("downloaded before checking rustbpe"))
    with pytest.raises(UserError, match=r"^rustbpe is not installed, and prepare.py learns the BPE with it: pip install "
                                        r"rustbpe \(offline: `pip download rustbpe --only-binary=:all: --python-version "
                                        rf"{sys.version_info.major}\.{sys.version_info.minor} -d wheels/`"):
        P.prepare(cfg(tmp_path, tokenizer="bpe", input="https://example.org/book.txt"))
    assert not (tmp_path / "out").exists()


def test_download_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    def slow(*args, **kwargs):
        raise requests.ConnectTimeout("timed out")

    monkeypatch.setattr(requests, "get", slow)
    with pytest.raises(UserError, match=r"timed out after 5s; download it yourself and pass --input"):
        P.prepare(cfg(tmp_path, input="https://example.invalid/book.txt", timeout=5))


# ----------------------------------------------------------------------------- the command line

def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "prepare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("input_", ["no/such/book.txt", "http://127.0.0.1:9/x"])
def test_cli_errors_are_one_line_and_status_2(input_: str, tmp_path: Path) -> None:
    r = run_prepare(f"--input={input_}", f"--out_dir={tmp_path / 'out'}", f"--raw_dir={tmp_path / 'raw'}", "--timeout=2")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_help_documents_every_option() -> None:
    r = run_prepare("--help")
    assert r.returncode == 0
    for field in dataclasses.fields(P.PrepareConfig):
        assert f"--{field.name}=" in r.stdout
