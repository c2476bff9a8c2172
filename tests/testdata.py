"""Where the tests find War and Peace and GPT-2's BPE files, and the step `make test` runs first to fetch
them once when they are nowhere on this machine (tests themselves never touch the network).

    python tests/testdata.py        # make test does this: say where the data is, or fetch it, or say what to do

Each file is looked for, in order, at:
  1. $BOOKGPT_BOOK (the Gutenberg file) and $BOOKGPT_GPT2_DIR (a folder with vocab.bpe and encoder.json);
  2. $BOOKGPT_TEST_DATA, a folder laid out as ../shared is: data/pg2600.txt, tokenizers/gpt2/;
  3. ../shared beside the repository (where CI keeps them);
  4. data/raw/testdata/ in the repository, where this script downloads them.
Other editions of the book that the cleaning tests also read (data/pg2600_2019_edition.txt and
data/warpeace_input_cr.txt) are used when the folder that holds the book has them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FETCHED = ROOT / "data" / "raw" / "testdata"
BOOK = Path("data") / "pg2600.txt"
GPT2 = Path("tokenizers") / "gpt2"
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # where tiktoken gets them
WHAT_TO_DO = ("the tests need War and Peace (pg2600.txt) and GPT-2's BPE files (vocab.bpe, encoder.json): run "
              "make test once online, or put them in ../shared/data/ and ../shared/tokenizers/gpt2/ beside the "
              "repository, or set BOOKGPT_BOOK=FILE and BOOKGPT_GPT2_DIR=FOLDER")


def folders() -> list[Path]:
    """The folders laid out as ../shared is, in the order they are searched."""
    found = [Path(os.environ["BOOKGPT_TEST_DATA"])] if os.environ.get("BOOKGPT_TEST_DATA") else []
    return found + [ROOT.parent / "shared", FETCHED]


def book() -> Path | None:
    if os.environ.get("BOOKGPT_BOOK"):
        return Path(os.environ["BOOKGPT_BOOK"])
    return next((f / BOOK for f in folders() if (f / BOOK).is_file()), None)


def gpt2_dir() -> Path | None:
    if os.environ.get("BOOKGPT_GPT2_DIR"):
        return Path(os.environ["BOOKGPT_GPT2_DIR"])
    return next((f / GPT2 for f in folders() if (f / GPT2 / "vocab.bpe").is_file()), None)


def fetch() -> None:
    """Download what is missing into data/raw/testdata/, each file checked against its known sha256."""
    sys.path.insert(0, str(ROOT))
    from prepare import DEFAULT_SHA256, DEFAULT_URL, download, sha256
    from bookgpt.tokenizer import GPT2_FILE_HASHES

    wanted = [] if book() else [(DEFAULT_URL, FETCHED / BOOK, DEFAULT_SHA256)]
    if not gpt2_dir():
        wanted += [(GPT2_URL + name, FETCHED / GPT2 / name, digest) for name, digest in GPT2_FILE_HASHES.items()]
    for url, dest, digest in wanted:
        download(url, dest, timeout=30)
        if sha256(dest.read_bytes()) != digest:
            dest.unlink()
            raise ValueError(f"{url} is not the file the tests were written for: its sha256 differs")


def main() -> None:
    if not (book() and gpt2_dir()):
        print(f"fetching the test data into {FETCHED.relative_to(ROOT)}/ (once)...", flush=True)
        try:
            fetch()
        except Exception as e:  # offline: requests' errors come as UserError from prepare.download
            print(f"error: could not fetch the test data ({str(e).split(';')[0]}); {WHAT_TO_DO}", file=sys.stderr)
            raise SystemExit(2) from None
    print(f"test data: the book {book()}, GPT-2's files in {gpt2_dir()}")


if __name__ == "__main__":
    main()
