"""tests/testdata.py: where the tests look for the book and GPT-2's files, in order."""
from __future__ import annotations

from pathlib import Path

import pytest

import testdata


def test_the_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOOKGPT_BOOK", raising=False)
    monkeypatch.delenv("BOOKGPT_GPT2_DIR", raising=False)
    monkeypatch.setattr(testdata, "ROOT", tmp_path / "repo")  # no ../shared beside this one
    monkeypatch.setattr(testdata, "FETCHED", tmp_path / "repo" / "data" / "raw" / "testdata")
    monkeypatch.delenv("BOOKGPT_TEST_DATA", raising=False)
    assert testdata.book() is None and testdata.gpt2_dir() is None  # a bare clone: make test fetches
    fetched = testdata.FETCHED
    (fetched / "data").mkdir(parents=True)
    (fetched / "data" / "pg2600.txt").write_text("book")
    assert testdata.book() == fetched / "data" / "pg2600.txt"
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "tokenizers" / "gpt2").mkdir(parents=True)
    (mine / "data" / "pg2600.txt").write_text("book")
    (mine / "tokenizers" / "gpt2" / "vocab.bpe").write_text("merges")
    monkeypatch.setenv("BOOKGPT_TEST_DATA", str(mine))  # a folder laid out as ../shared: searched first
    assert testdata.book() == mine / "data" / "pg2600.txt" and testdata.gpt2_dir() == mine / "tokenizers" / "gpt2"
    monkeypatch.setenv("BOOKGPT_BOOK", str(tmp_path / "elsewhere.txt"))  # named outright: first of all
    assert testdata.book() == tmp_path / "elsewhere.txt"
