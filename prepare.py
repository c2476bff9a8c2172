"""Prepare a book for training: fetch, clean, split, tokenize, write bins + meta.json.

    python prepare.py                                   # War and Peace, BPE-2048: the presets' data
    python prepare.py --tokenizer=char                  # characters, for the wp_char_* presets
    python prepare.py --input=../shared/data/pg2600.txt # offline: a local copy
    python prepare.py --bpe_dropout=0.1                 # also train_dropout.bin, for train.py --train_split

Writes <out_dir>/train.bin, val.bin (and test.bin with --test_fraction>0): flat arrays of token
ids (uint8 or uint16, see meta.json) for np.memmap; and meta.json, written last, so a complete
meta.json means complete bins. The text is split at newlines before tokenizing, so each split
decodes back to exactly its part of the cleaned text. With --bpe_dropout, train_dropout.bin holds
the train split segmented dropout_copies more times at random (BPE-dropout), one copy after another.
"""
from __future__ import annotations

import os
import random
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bookgpt.config import UserError, atomic_write_bytes, atomic_write_json, cli, opt, parse_config
from bookgpt.tokenizer import (DEFAULT_BPE_VOCAB, DEFAULT_KIND, KINDS, META_FILE, Tokenizer, check_bpe_vocab_size,
                               default_data_dir, make_tokenizer, require_rustbpe, sha256)

DEFAULT_URL = "https://www.gutenberg.org/cache/epub/2600/pg2600.txt"
# sha256 of DEFAULT_URL as tested (the same bytes as ../shared/data/pg2600.txt). Gutenberg
# rewrites its files now and then, so a different hash is a warning, not an error.
DEFAULT_SHA256 = "aa4a454fb73861c0c84c662ed1fa3ddd71bbd7a237783932c05d5f3b2cdd6718"
MIN_SPLIT_CHARS = 32  # a split shorter than this is a mistake, not a dataset


@dataclass
class PrepareConfig:
    tokenizer: str = opt(DEFAULT_KIND, "bpe (learned from the train split) | char | byte | gpt2")
    vocab_size: int = opt(DEFAULT_BPE_VOCAB, "vocabulary size of the bpe tokenizer (256..65536); ignored by the others")
    input: str = opt(DEFAULT_URL, "URL (downloaded once, cached in raw_dir) or path of a plain-text book")
    out_dir: str = opt("", "output folder; default data/war_and_peace_<tokenizer>, with the bpe vocabulary size "
                              "(data/war_and_peace_bpe2048, where the presets look)")
    split_layout: str = opt("blocks", "blocks: passages of about block_fraction of the text, cut at paragraph "
                                      "breaks, spread through the book to val and test; tail: the last val_fraction "
                                      "and test_fraction of the text, in that order (nanoGPT's split)")
    val_fraction: float = opt(0.05, "fraction of the text for the validation split (every choice is made on it)")
    test_fraction: float = opt(0.05, "fraction of the text for the test split (read only by evaluate.py; 0 = none)")
    block_fraction: float = opt(0.01, "split_layout=blocks: the size of a block, as a fraction of the text")
    bpe_dropout: float = opt(0.0, "bpe: also write train_dropout.bin, the train split segmented at random with each "
                                  "merge skipped at this rate (BPE-dropout), for train.py --train_split=train_dropout")
    dropout_copies: int = opt(4, "segmentations of the train split in train_dropout.bin")
    encoding: str = opt("utf-8", "text encoding of the input, e.g. cp1252 or latin-1 for older files")
    gpt2_dir: str = opt("", "folder with GPT-2's vocab.bpe + encoder.json for offline gpt2 (or $BOOKGPT_GPT2_DIR)")
    raw_dir: str = opt("data/raw", "where downloaded books are cached")
    timeout: float = opt(30.0, "seconds to wait for the server when downloading")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- fetch

def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def cache_path(url: str, raw_dir: str | Path) -> Path:
    # The URL's hash keeps two books that share a file name apart.
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1]) or "book.txt"
    return Path(raw_dir) / f"{sha256(url.encode())[:12]}-{name}"


def download(url: str, dest: Path, timeout: float) -> None:
    """Stream `url` into `dest` with a progress bar; a temp file and rename keep `dest` whole or absent."""
    import requests
    from tqdm import tqdm

    how = "download it yourself and pass --input=path/to/book.txt"
    try:
        with requests.get(url, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0)) or None
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    except requests.Timeout:
        raise UserError(f"download of {url} timed out after {timeout:g}s; {how}") from None
    except requests.HTTPError as e:
        raise UserError(f"download of {url} failed (HTTP {e.response.status_code}); {how}") from None
    except requests.RequestException as e:
        raise UserError(f"download of {url} failed ({type(e).__name__}: could not connect); {how}") from None


def fetch(cfg: PrepareConfig) -> tuple[bytes, str]:
    """The raw bytes of the book and where they came from (URL or absolute path)."""
    if is_url(cfg.input):
        path = cache_path(cfg.input, cfg.raw_dir)
        if path.is_file():
            print(f"using cached download {path}")
        else:
            print(f"downloading {cfg.input}")
            download(cfg.input, path, cfg.timeout)
        raw = path.read_bytes()
        if cfg.input == DEFAULT_URL and sha256(raw) != DEFAULT_SHA256:
            warn(f"{path} differs from the edition bookgpt was tested with (sha256 {sha256(raw)[:12]}...); "
                 "Gutenberg updates its files, so continuing")
        return raw, cfg.input
    path = Path(cfg.input).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise UserError(f"input file {what}: {cfg.input} (pass --input=PATH to a plain-text book, or a URL)")
    return path.read_bytes(), str(path.resolve())


# ----------------------------------------------------------------------------- clean

def decode_text(raw: bytes, encoding: str = "utf-8", name: str = "input") -> str:
    """Bytes to text, refusing empty, binary and wrongly-encoded input with a clear error."""
    if not raw.strip():
        raise UserError(f"{name} is empty")
    if b"\x00" in raw:
        raise UserError(f"{name} looks binary (it contains NUL bytes); expected a plain-text book"
                        " (a UTF-16 file? convert it: iconv -f utf-16 -t utf-8 IN > OUT)")
    try:
        return raw.decode(encoding)
    except LookupError:
        raise UserError(f"unknown --encoding {encoding!r}; try utf-8, cp1252 or latin-1") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not valid {encoding} (byte {raw[e.start]:#04x} at offset {e.start}); "
                        f"pass its encoding, e.g. --encoding=cp1252, or convert it: "
                        f"iconv -f cp1252 -t utf-8 IN > OUT") from None


def normalize_newlines(text: str) -> str:
    """Drop a leading byte-order mark; CRLF (Windows) and lone CR (classic Mac) become LF."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


# Gutenberg's markers vary between editions: THE/THIS, a title or a number, spaces or none.
_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG\b.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG\b.*$", re.IGNORECASE | re.MULTILINE)
# Older editions repeat the end in words just before the END marker.
_END_WORDS = re.compile(r"\n[ \t]*End of (?:the )?Project Gutenberg.*\s*\Z", re.IGNORECASE)


def strip_gutenberg(text: str) -> tuple[str, list[str]]:
    """The book between the START and END markers (LF newlines expected), and any warnings.

    Without markers the whole text is kept, with a warning. Leading blank lines and trailing
    whitespace are trimmed; the result ends with one newline (or is empty).
    """
    warnings = []
    start = _START.search(text)
    end = _END.search(text, start.end() if start else 0)
    if start and end:
        body = _END_WORDS.sub("\n", text[start.end():end.start()])
    elif start or end:
        which = "START" if start else "END"
        warnings.append(f"found a Project Gutenberg {which} marker but not its partner; keeping the text on its side of it")
        body = text[start.end():] if start else text[:end.start()]  # type: ignore[union-attr]
    else:
        warnings.append("no Project Gutenberg START/END markers found; using the whole file")
        body = text
    body = re.sub(r"\A(?:[ \t]*\n)+", "", body).rstrip()
    return (body + "\n" if body else ""), warnings


def clean_text(text: str) -> tuple[str, list[str]]:
    """Decoded file text -> the book: newlines normalised, Gutenberg header and licence removed."""
    return strip_gutenberg(normalize_newlines(text))


# ----------------------------------------------------------------------------- split

def _cut(text: str, target: int) -> int:
    """Index just after the first newline at or after `target` (else the last one before it)."""
    i = text.find("\n", target)
    if i == -1:
        i = text.rfind("\n", 0, target)
    return i + 1  # 0 when there is no newline at all


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise UserError(f"bad split fractions val={val_fraction} test={test_fraction}: "
                        "need 0 < val_fraction, 0 <= test_fraction and val_fraction + test_fraction < 1")


def _check_sizes(splits: dict[str, str]) -> dict[str, str]:
    for name, part in splits.items():
        if len(part) < MIN_SPLIT_CHARS:
            raise UserError(f"text too short for the requested splits: the {name} split would have {len(part)} "
                            f"characters (at least {MIN_SPLIT_CHARS}, cut at a newline); use a longer text "
                            "or other --val_fraction/--test_fraction")
    return splits


def split_text(text: str, val_fraction: float, test_fraction: float = 0.0) -> dict[str, str]:
    """The tail layout: train, val, (test) by position, cut at newlines; they concatenate back to `text`."""
    _check_fractions(val_fraction, test_fraction)
    n = len(text)
    a = _cut(text, int(n * (1 - val_fraction - test_fraction)))
    b = _cut(text, int(n * (1 - test_fraction))) if test_fraction > 0 else n
    return _check_sizes({"train": text[:a], "val": text[a:b]} | ({"test": text[b:]} if test_fraction > 0 else {}))


def block_bounds(text: str, block_fraction: float) -> list[int]:
    """Start offsets of round(1 / block_fraction) blocks of about equal length, then len(text). Each
    block ends at the first paragraph break (a blank line) after its share of the text, or at a newline
    when there is none within a quarter of a block."""
    n, k = len(text), max(1, round(1 / block_fraction))
    bounds = [0]
    for i in range(1, k):
        target = max(i * n // k, bounds[-1] + 1)
        para = text.find("\n\n", target, target + n // (4 * k))
        cut = para + 2 if para != -1 else _cut(text, target)
        if bounds[-1] < cut < n:
            bounds.append(cut)
    return bounds + [n]


def assign_blocks(n_blocks: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Each block's split. Val and test blocks are spread evenly through the book, each split's
    share running at its fraction (error diffusion), test half a period behind val."""
    share, owed = {"val": val_fraction, "test": test_fraction}, {"val": 0.5, "test": 1e-9}  # 1e-9: rounding
    owners = []
    for _ in range(n_blocks):
        for k in owed:
            owed[k] += share[k]
        due = [k for k in owed if owed[k] >= 1]
        owner = max(due, key=owed.__getitem__) if due else "train"
        if due:
            owed[owner] -= 1
        owners.append(owner)
    return owners


def split_blocks(text: str, val_fraction: float, test_fraction: float,
                 block_fraction: float = 0.01) -> tuple[dict[str, str], dict[str, Any]]:
    """The blocks layout: the text cut into blocks of whole paragraphs, every so many going to val
    and to test. The end of a novel is a poor sample of it (War and Peace ends with a philosophical
    essay), so held-out text comes from all through the book. Returns the splits (each its blocks
    in book order) and the layout for meta.json, from which the blocks concatenate back to `text`."""
    _check_fractions(val_fraction, test_fraction)
    if not 0 < block_fraction <= min(val_fraction, test_fraction or 1):
        raise UserError(f"block_fraction={block_fraction} must be above 0 and at most the smaller held-out "
                        f"fraction, so each held-out split gets whole blocks")
    bounds = block_bounds(text, block_fraction)
    owners = assign_blocks(len(bounds) - 1, val_fraction, test_fraction)
    names = ["train", "val"] + (["test"] if test_fraction > 0 else [])
    splits = {name: "".join(text[a:b] for a, b, o in zip(bounds, bounds[1:], owners) if o == name) for name in names}
    return _check_sizes(splits), {"kind": "blocks", "block_fraction": block_fraction, "bounds": bounds,
                                  "owners": owners}


def join_blocks(splits: dict[str, str], layout: dict[str, Any]) -> str:
    """The text back from its splits and their layout (the inverse of split_blocks)."""
    taken = dict.fromkeys(splits, 0)
    parts = []
    for a, b, owner in zip(layout["bounds"], layout["bounds"][1:], layout["owners"]):
        parts.append(splits[owner][taken[owner]:taken[owner] + b - a])
        taken[owner] += b - a
    return "".join(parts)


# ----------------------------------------------------------------------------- write

def write_output(out_dir: Path, tok: Tokenizer, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Replace the output files one by one, atomically, meta.json last.

    Everything slow is already done. The old meta.json goes first, so an interruption in the
    middle leaves no meta.json (later stages then say "run prepare.py") rather than a meta.json
    that describes bins from another run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    for name, data in tok.files().items():
        atomic_write_bytes(out_dir / name, data)
    for split in ("train", "val", "test", "train_dropout"):
        if split in arrays:
            atomic_write_bytes(out_dir / f"{split}.bin", arrays[split].tobytes())
        else:
            (out_dir / f"{split}.bin").unlink(missing_ok=True)  # a stale test.bin from an earlier run
    atomic_write_json(out_dir / META_FILE, meta)


# ----------------------------------------------------------------------------- main

def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the whole stage; returns the meta.json it wrote."""
    if cfg.tokenizer not in KINDS:
        raise UserError(f"unknown tokenizer '{cfg.tokenizer}'; choose one of {', '.join(KINDS)}")
    if cfg.split_layout not in ("blocks", "tail"):
        raise UserError(f"bad value for 'split_layout': {cfg.split_layout!r}; use one of blocks, tail")
    if cfg.tokenizer == "bpe":  # before any download
        check_bpe_vocab_size(cfg.vocab_size)
        require_rustbpe()
    if cfg.bpe_dropout and (cfg.tokenizer != "bpe" or not 0 < cfg.bpe_dropout < 1 or cfg.dropout_copies < 1):
        raise UserError(f"--bpe_dropout needs --tokenizer=bpe, a rate in (0, 1) and dropout_copies >= 1, got "
                        f"{cfg.tokenizer}, {cfg.bpe_dropout}, {cfg.dropout_copies}")
    out_dir = Path(cfg.out_dir or default_data_dir(cfg.tokenizer, cfg.vocab_size))
    t0 = time.perf_counter()

    raw, source = fetch(cfg)
    text, warnings = clean_text(decode_text(raw, cfg.encoding, name=source))
    for w in warnings:
        warn(w)
    if not text:
        raise UserError(f"{source} has no text left after removing the Project Gutenberg header and licence")
    if cfg.split_layout == "blocks":
        splits, layout = split_blocks(text, cfg.val_fraction, cfg.test_fraction, cfg.block_fraction)
    else:
        splits, layout = split_text(text, cfg.val_fraction, cfg.test_fraction), {"kind": "tail"}

    # char: the vocabulary is every character of the book, so val/test are always encodable.
    # bpe: merges are learned from the training split only, so val/test stay unseen.
    vocab_text = splits["train"] if cfg.tokenizer == "bpe" else text
    tok = make_tokenizer(cfg.tokenizer, vocab_text, cfg.vocab_size, cfg.gpt2_dir or None)
    if cfg.tokenizer == "bpe" and tok.vocab_size < cfg.vocab_size:
        warn(f"the text only supports {tok.vocab_size} BPE tokens, fewer than --vocab_size={cfg.vocab_size}")

    arrays, counts = {}, {}
    for name, part in splits.items():
        ids = tok.encode_array(part)
        if tok.decode(ids) != part:  # cheap insurance: the bins must decode to exactly the text
            raise RuntimeError(f"{tok.kind} tokenizer did not round-trip the {name} split")
        arrays[name] = ids
        counts[name] = {"tokens": int(ids.size), "chars": len(part), "bytes": len(part.encode("utf-8"))}

    if cfg.bpe_dropout:  # segmentation k draws from Random(k): the same file every time
        arrays["train_dropout"] = np.concatenate([tok.encode_dropout(splits["train"], cfg.bpe_dropout, random.Random(k))
                                                  for k in range(cfg.dropout_copies)])
    meta = {"tokenizer": tok.to_meta(), "vocab_size": tok.vocab_size, "dtype": tok.dtype.name, "source": source,
            "sha256_raw": sha256(raw), "sha256_clean": sha256(text.encode("utf-8")),
            "fractions": {"val": cfg.val_fraction, "test": cfg.test_fraction}, "layout": layout, "splits": counts,
            **({"train_dropout": {"bpe_dropout": cfg.bpe_dropout, "copies": cfg.dropout_copies,
                                  "tokens": int(arrays["train_dropout"].size)}} if cfg.bpe_dropout else {}),
            "prepared_with": "prepare.py", "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_output(out_dir, tok, arrays, meta)

    print(f"{tok.kind} tokenizer, vocab {tok.vocab_size}, {tok.dtype.name}; {len(text):,} characters of text")
    for name, c in counts.items():
        print(f"  {name:5s} {c['tokens']:>10,} tokens {c['chars']:>10,} chars {c['bytes']:>10,} bytes")
    if cfg.bpe_dropout:
        print(f"  train_dropout.bin: {meta['train_dropout']['tokens']:,} tokens, {cfg.dropout_copies} segmentations "
              f"of train with BPE dropout {cfg.bpe_dropout:g}")
    print(f"wrote {out_dir}/ in {time.perf_counter() - t0:.1f}s")
    return meta


def main(argv: list[str]) -> dict[str, Any]:
    return prepare(parse_config(PrepareConfig, argv, prog="prepare.py", doc=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    cli(main)
