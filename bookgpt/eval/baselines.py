"""Baselines a model must beat, in bits per UTF-8 byte of held-out text, each fitted on the train split:
a byte unigram, byte-level interpolated (and modified) Kneser-Ney n-grams of orders 2..8, and the
compressors zlib, bz2 and xz given the train text first. A model that does not beat the 8-gram has not
learned more than it. Results are cached per data folder and split (evaluate.py reads them).

The Kneser-Ney code works on any alphabet: bytes, or a model's own tokens (evaluate.py --mix_ngram
mixes the model with an n-gram over its tokens, symbol for symbol).
"""
from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bookgpt.config import atomic_write_json


def unigram_bpb(train: bytes, heldout: bytes) -> float:
    """Order-0 byte model with add-one smoothing: what byte frequencies alone are worth."""
    counts = np.bincount(np.frombuffer(train, dtype=np.uint8), minlength=256) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[np.frombuffer(heldout, dtype=np.uint8)].sum() / len(heldout))


def symbol_bits(vocab_size: int) -> int:
    """Bits one symbol of the alphabet takes in an n-gram key: 8 for bytes, 11 for a 2,048-token BPE."""
    return max(1, (vocab_size - 1).bit_length())


def max_order(vocab_size: int = 256) -> int:
    """The longest n-gram whose symbols fit in 64 bits: 8 for bytes, 5 for a 2,048-token BPE."""
    return 64 // symbol_bits(vocab_size)


def as_symbols(seq: bytes | np.ndarray) -> np.ndarray:
    return np.frombuffer(seq, dtype=np.uint8) if isinstance(seq, (bytes, bytearray)) else np.asarray(seq)


def ngram_keys(data: np.ndarray, n: int, bits: int = 8) -> np.ndarray:
    """Every n-gram of a symbol array packed exactly into a uint64 (n * bits <= 64), newest symbol lowest.

    key >> bits is then the n-gram's context, key & (2**(bits(n-1)) - 1) its suffix one symbol shorter."""
    keys = np.zeros(max(len(data) - n + 1, 0), dtype=np.uint64)
    if len(keys) == 0:
        return keys
    for j in range(n):  # symbol j places back from the newest
        keys |= data[n - 1 - j:len(data) - j].astype(np.uint64) << np.uint64(bits * j)
    return keys


def kn_discounts(counts: np.ndarray, modified: bool) -> np.ndarray:
    """Discount for an n-gram seen c times is D[min(c, 3)]. Interpolated KN: 0.75 throughout,
    the textbook value (our estimate of D from counts of counts scores worse on this book).
    Modified KN (Chen & Goodman): D1, D2, D3+ estimated from how many n-grams occur 1..4 times."""
    d = np.array([0.0, 0.75, 0.75, 0.75])
    if modified:
        n1, n2, n3, n4 = (int((counts == c).sum()) for c in (1, 2, 3, 4))
        if min(n1, n2, n3, n4) > 0:
            y = n1 / (n1 + 2 * n2)
            est = np.array([0.0, 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3])
            d = np.where((est > 0) & (est < [1, 1, 2, 3]), est, d)
    return d


@dataclass
class KNLevel:
    """One order's table: sorted n-gram keys with their (continuation) counts, and per context
    the total count and the probability mass freed by discounting (given to the lower order)."""
    keys: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    context_total: np.ndarray
    context_backoff: np.ndarray
    discounts: np.ndarray
    vocab_size: int

    @classmethod
    def build(cls, keys: np.ndarray, counts: np.ndarray, modified: bool, vocab_size: int) -> "KNLevel":
        d = kn_discounts(counts, modified)
        # keys are sorted and the context is their high bits, so each context is one contiguous run
        contexts, first = np.unique(keys >> np.uint64(symbol_bits(vocab_size)), return_index=True)
        return cls(keys, counts, contexts, np.add.reduceat(counts, first),
                   np.add.reduceat(d[np.minimum(counts, 3)], first), d, vocab_size)


def kn_levels(train: bytes | np.ndarray, order: int, modified: bool = False, vocab_size: int = 256) -> list[KNLevel]:
    """Tables for orders 1..order over bytes, or over symbols 0..vocab_size-1. The top order counts n-grams; each lower
    order counts, for each n-gram, how many distinct symbols precede it (Kneser-Ney's continuation counts), which is why
    a word part seen in only one context gets little weight on its own."""
    bits = symbol_bits(vocab_size)
    if not 1 <= order <= max_order(vocab_size):
        raise ValueError(f"n-gram order must be 1..{max_order(vocab_size)} ({max_order(vocab_size)} symbols of "
                         f"{bits} bits fill a uint64), got {order}")
    data = as_symbols(train)
    levels = [KNLevel.build(*np.unique(ngram_keys(data, order, bits), return_counts=True), modified, vocab_size)]
    for n in range(order - 1, 0, -1):
        distinct_longer = levels[0].keys if n == order - 1 else np.unique(ngram_keys(data, n + 1, bits))
        suffixes = distinct_longer & np.uint64((1 << (bits * n)) - 1)
        levels.insert(0, KNLevel.build(*np.unique(suffixes, return_counts=True), modified, vocab_size))
    return levels


def find_sorted(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each query in sorted_keys and whether it is there."""
    if len(sorted_keys) == 0:
        return np.zeros(len(queries), dtype=np.int64), np.zeros(len(queries), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return i, sorted_keys[i] == queries


def kn_probs(levels: list[KNLevel], heldout: bytes | np.ndarray) -> np.ndarray:
    """P(symbol_i | up to order-1 previous symbols) for every symbol (byte) of `heldout`, interpolated KN:

        p_n(w | h) = (max(c(hw) - D(c(hw)), 0) + backoff(h) * p_{n-1}(w | h')) / c(h)

    starting from the uniform 1/vocab_size; an unseen context h leaves p_{n-1} as it is. The first
    symbols, with less context than the order, use the orders their context allows."""
    data, vocab_size = as_symbols(heldout), levels[0].vocab_size
    bits = symbol_bits(vocab_size)
    p = np.full(len(data), 1 / vocab_size)
    for n, lv in enumerate(levels, start=1):
        keys = ngram_keys(data, n, bits)
        lower = p[n - 1:]
        ci, seen_context = find_sorted(lv.contexts, keys >> np.uint64(bits))
        ki, seen = find_sorted(lv.keys, keys)
        c = np.where(seen, lv.counts[ki], 0)
        kept = np.maximum(c - lv.discounts[np.minimum(c, 3)], 0)
        mixed = (kept + lv.context_backoff[ci] * lower) / np.where(seen_context, lv.context_total[ci], 1)
        p[n - 1:] = np.where(seen_context, mixed, lower)
    return p


def ngram_kn_bpb(train: bytes, heldout: bytes, order: int, modified: bool = False) -> float:
    """Bits per byte of `heldout` under a byte-level interpolated Kneser-Ney model fitted on `train`."""
    return float(-np.log2(kn_probs(kn_levels(train, order, modified), heldout)).sum() / len(heldout))


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "zlib": lambda b: zlib.compress(b, 9),
    "bz2": lambda b: bz2.compress(b, 9),
    "xz": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}


def compressor_bpb(train: bytes, heldout: bytes, name: str) -> float:
    """Bits the compressor spends on `heldout` after having seen `train`: the growth of the
    compressed size when heldout is appended, per byte of heldout. (zlib's 32 KB window sees
    little of train; bz2 works in 900 KB blocks; xz's dictionary holds all of it.)"""
    compress = COMPRESSORS[name]
    return (len(compress(train + heldout)) - len(compress(train))) * 8 / len(heldout)


def baseline_label(name: str) -> str:
    if name.startswith("mkn"):
        return f"modified Kneser-Ney, order {name[3:]}"
    if name.startswith("kn"):
        return f"Kneser-Ney, order {name[2:]}"
    return {"unigram": "byte unigram (add-one)", "zlib": "zlib -9", "bz2": "bz2 -9", "xz": "xz -9e"}.get(name, name)


def compute_baselines(train: bytes, heldout: bytes, max_order: int = 8, log: Callable[[str], None] = print) -> dict[str, dict]:
    """{name: {"bpb": ..., "seconds": ...}} for the unigram, KN orders 2..max_order, modified KN
    at max_order (the strongest n-gram here) and the compressors; each timed on its own."""
    jobs: list[tuple[str, Callable[[], float]]] = [("unigram", lambda: unigram_bpb(train, heldout))]
    jobs += [(f"kn{n}", lambda n=n: ngram_kn_bpb(train, heldout, n)) for n in range(2, max_order + 1)]
    jobs += [(f"mkn{max_order}", lambda: ngram_kn_bpb(train, heldout, max_order, modified=True))]
    jobs += [(name, lambda name=name: compressor_bpb(train, heldout, name)) for name in COMPRESSORS]
    out = {}
    for name, job in jobs:
        t0 = time.perf_counter()
        bpb = job()
        out[name] = {"bpb": bpb, "seconds": time.perf_counter() - t0}
        log(f"  {baseline_label(name):<32} {bpb:.4f} bpb  ({out[name]['seconds']:.1f} s)")
    return out


def cached_baselines(data_dir: Path, split: str, train: bytes, heldout: bytes, meta: dict[str, Any],
                     max_order: int = 8, log: Callable[[str], None] = print) -> tuple[dict[str, dict], bool]:
    """Baselines from <data_dir>/baselines_<split>.json when it was made from these very texts,
    else computed and saved there. Returns (results, came_from_cache)."""
    key = {"version": 1, "split": split, "sha256_clean": meta.get("sha256_clean"), "max_order": max_order,
           "sha256_train": hashlib.sha256(train).hexdigest(), "sha256_heldout": hashlib.sha256(heldout).hexdigest()}
    path = Path(data_dir) / f"baselines_{split}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            log(f"  read from {path}")
            return cached["results"], True
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable: compute again
    results = compute_baselines(train, heldout, max_order, log)
    try:
        atomic_write_json(path, {"key": key, "results": results})
    except OSError as e:
        log(f"warning: could not cache baselines in {path}: {e.strerror or e}")
    return results, False
