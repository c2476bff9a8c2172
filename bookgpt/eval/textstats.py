"""Statistics of text, for judging what a model writes: how much of it is copied verbatim from the
training text (memorisation: shares of char and word n-grams found there, the longest copied span),
how close its style is to the book's (word and sentence lengths, punctuation, dialogue, names,
unknown words, distinct n-grams), and whether it carries the book's themes and its prompt's (who and
where it names, what it talks about). evaluate.py applies them to generated and to real continuations,
and holds the generated ones to two caps (copying, misspelling) when it chooses a sampling temperature.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Sequence

import numpy as np

from bookgpt.eval.baselines import find_sorted

# ----------------------------------------------------------------------------- memorisation

WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")  # letters, with inner apostrophes (don’t)
# The caps generated text is held to, as multiples of the real continuations' rates: 30-character spans
# found in the training text (copying), and words never seen there (mostly misspellings).
COPY_CAP, MISSPELL_CAP = 2.0, 1.5
_BASE = 0x9E3779B97F4A7C15  # odd, so it is invertible mod 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2**64 (numpy's uint64 products wrap, which is what we want)."""
    out = np.full(n, base, dtype=np.uint64)
    out[:1] = 1
    return np.cumprod(out, dtype=np.uint64)


class RollingHash:
    """Polynomial hashes mod 2**64 of every length-n window of a sequence, for any n, from one
    prefix sum: hash(i, n) = (G[i+n] - G[i]) * B**(i+n-1) with G[k] = sum_{j<k} x_j * B**-j.
    Equal windows get equal hashes wherever they are; two different windows collide with chance
    about 2**-64 per pair, so a false match over a report's texts is a ~1e-9 event."""

    def __init__(self, symbols: np.ndarray) -> None:
        x = symbols.astype(np.uint64) + np.uint64(1)  # no zero symbols
        with np.errstate(over="ignore"):
            self.prefix = np.concatenate([[np.uint64(0)], np.cumsum(x * _powers(_BASE_INV, len(x)), dtype=np.uint64)])
        self.pow = _powers(_BASE, len(x))

    def windows(self, n: int) -> np.ndarray:
        if n > len(self.pow):  # longer than the sequence
            return np.zeros(0, dtype=np.uint64)
        with np.errstate(over="ignore"):
            return (self.prefix[n:] - self.prefix[:-n]) * self.pow[n - 1:]


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class TrainIndex:
    """The training text, ready for 'does this string / word sequence occur in it?' questions."""

    def __init__(self, text: str) -> None:
        self.chars = RollingHash(code_points(text))
        words = WORD_RE.findall(text)
        self.word_id = {w: i for i, w in enumerate(dict.fromkeys(words), start=1)}  # 0 = not in train
        self.words = RollingHash(np.array([self.word_id[w] for w in words], dtype=np.int64))
        self.vocab_lower = {w.lower() for w in self.word_id}
        self._tables: dict[tuple[str, int], np.ndarray] = {}

    def table(self, kind: str, n: int) -> np.ndarray:
        """Sorted hashes of every char (kind='char') or word n-gram of the train text; the last few kept."""
        if (kind, n) not in self._tables:
            if len(self._tables) > 4:
                self._tables.pop(next(iter(self._tables)))
            self._tables[(kind, n)] = np.sort((self.chars if kind == "char" else self.words).windows(n))
        return self._tables[(kind, n)]

    def found(self, text: str, kind: str, n: int) -> np.ndarray:
        """For each char/word n-gram of `text`, whether it occurs verbatim in train."""
        symbols = (code_points(text) if kind == "char"
                   else np.array([self.word_id.get(w, 0) for w in WORD_RE.findall(text)], dtype=np.int64))
        found = find_sorted(self.table(kind, n), RollingHash(symbols).windows(n))[1]
        if kind == "word" and len(found):  # a word never seen in train cannot be part of a verbatim match
            found &= np.convolve(symbols == 0, np.ones(n, dtype=int), mode="valid") == 0
        return found

    def longest_spans(self, texts: list[str]) -> list[str]:
        """For each text, its longest substring that occurs verbatim in train.

        "Some substring of length L occurs in train" is monotone in L, so each text is a binary
        search over L; the texts search together, so one pass over train answers all that probe the same L."""
        lo = [0] * len(texts)                # a span this long is known to occur
        hi = [len(t) + 1 for t in texts]     # a span this long is known not to
        where = [0] * len(texts)
        while any(h - l > 1 for l, h in zip(lo, hi)):
            probes: dict[int, list[int]] = {}
            for i, (l, h) in enumerate(zip(lo, hi)):
                if h - l > 1:
                    probes.setdefault((l + h) // 2, []).append(i)
            for n, members in probes.items():
                for i in members:
                    hits = np.flatnonzero(self.found(texts[i], "char", n))
                    if len(hits):
                        lo[i], where[i] = n, int(hits[0])
                    else:
                        hi[i] = n
        return [t[w:w + n] for t, w, n in zip(texts, where, lo)]


def memorisation(index: TrainIndex, texts: list[str], char_n: int = 30, word_n: int = 8) -> dict[str, Any]:
    """How much of `texts` is copied from train: the share of their char `char_n`-grams and word
    `word_n`-grams found verbatim there (pooled over texts), and the longest verbatim spans."""
    char_hits = [index.found(t, "char", char_n) for t in texts]
    word_hits = [index.found(t, "word", word_n) for t in texts]
    spans = index.longest_spans(texts)
    n_char, n_word = sum(len(h) for h in char_hits), sum(len(h) for h in word_hits)
    char_found = int(sum(h.sum() for h in char_hits))
    longest = max(spans, key=len) if spans else ""
    return {f"char{char_n}_share": char_found / n_char if n_char else 0.0, f"char{char_n}_found": char_found,
            f"word{word_n}_share": float(sum(h.sum() for h in word_hits) / n_word) if n_word else 0.0,
            "char_ngrams": n_char, "word_ngrams": n_word,
            "longest_span": len(longest), "longest_span_mean": float(np.mean([len(s) for s in spans])) if spans else 0.0,
            "longest_span_text": longest, "longest_spans": [len(s) for s in spans]}


# ----------------------------------------------------------------------------- style

# The main characters as this translation (Maude) spells them, accents included.
NAMES = ("Pierre", "Natásha", "Andrew", "Nicholas", "Mary", "Sónya", "Rostóv", "Kutúzov", "Napoleon",
         "Denísov", "Dólokhov", "Borís", "Hélène", "Pétya")
PUNCT = ",.;:!?—"
QUOTES = "“”\"‘"
WORD_LEN_BINS = 13   # 1..12 letters, 13+
SENT_LEN_BINS = 11   # 1-5, 6-10, ..., 46-50, 51+ words
SENTENCE_END = re.compile(r"[.!?]+[”’\"]?(?=\s|$)")
DIALOGUE = re.compile(r"“[^“”]*”|\"[^\"]*\"")


def _hist(values: Sequence[int], bins: int, width: int = 1) -> np.ndarray:
    h = np.bincount(np.minimum((np.asarray(values, dtype=np.int64) - 1) // width, bins - 1), minlength=bins)
    return h / max(h.sum(), 1)


def tvd(p: Sequence[float], q: Sequence[float]) -> float:
    """Total variation distance between two distributions: 0 identical, 1 disjoint."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def distinct_n(words: list[str], n: int) -> float:
    grams = list(zip(*(words[i:] for i in range(n))))
    return len(set(grams)) / len(grams) if grams else 0.0


def style_stats(texts: list[str], vocab_lower: set[str] | None = None) -> dict[str, Any]:
    """Style statistics of some text, pooled over `texts` (each a separate piece: sentences and
    n-grams do not run across them). vocab_lower: the book's words, to count unknown ones."""
    words = [w for t in texts for w in WORD_RE.findall(t)]
    sentences = [len(WORD_RE.findall(s)) for t in texts for s in SENTENCE_END.split(t)]
    sentences = [n for n in sentences if n > 0]
    chars = sum(len(t) for t in texts)
    kchars, kwords = max(chars, 1) / 1000, max(len(words), 1) / 1000
    counts = Counter(c for t in texts for c in t if c in PUNCT or c in QUOTES)
    names = Counter(w for w in words if w in NAMES)
    per_text = [WORD_RE.findall(t) for t in texts]
    return {
        "chars": chars, "words": len(words), "sentences": len(sentences),
        "mean_word_len": float(np.mean([len(w) for w in words])) if words else 0.0,
        "mean_sentence_len": float(np.mean(sentences)) if sentences else 0.0,
        "word_len_hist": _hist([len(w) for w in words], WORD_LEN_BINS).tolist(),
        "sentence_len_hist": _hist(sentences, SENT_LEN_BINS, width=5).tolist(),
        "punct_per_kchar": {c: counts[c] / kchars for c in PUNCT},
        "quotes_per_kchar": sum(counts[c] for c in QUOTES) / kchars,
        "dialogue_share": sum(len(m) for t in texts for m in DIALOGUE.findall(t)) / max(chars, 1),
        "unknown_word_share": (sum(w.lower() not in vocab_lower for w in words) / max(len(words), 1)
                               if vocab_lower is not None else 0.0),
        "distinct": {str(n): float(np.mean([distinct_n(w, n) for w in per_text])) if texts else 0.0 for n in (1, 2, 3)},
        "names_per_kword": {n: names[n] / kwords for n in NAMES},
    }


def style_distance(stats: dict[str, Any], book: dict[str, Any]) -> dict[str, float]:
    """How far a text's statistics are from the book's (0 = the same)."""
    return {"word_len_tvd": tvd(stats["word_len_hist"], book["word_len_hist"]),
            "sentence_len_tvd": tvd(stats["sentence_len_hist"], book["sentence_len_hist"]),
            "punct_mix_tvd": tvd(_normalise(stats["punct_per_kchar"]), _normalise(book["punct_per_kchar"])),
            "punct_rate_ratio": sum(stats["punct_per_kchar"].values()) / max(sum(book["punct_per_kchar"].values()), 1e-9),
            "names_rate_ratio": sum(stats["names_per_kword"].values()) / max(sum(book["names_per_kword"].values()), 1e-9)}


def _normalise(d: dict[str, float]) -> list[float]:
    total = sum(d.values()) or 1.0
    return [v / total for v in d.values()]


# ----------------------------------------------------------------------------- themes

# Who and where: the principal characters (NAMES and a few family names) and places, as this translation spells them.
PLACES = ("Moscow", "Petersburg", "Russia", "Borodinó", "Smolénsk", "Austerlitz", "Bald Hills", "Otrádnoe",
          "Vílna", "Vienna", "France")
ENTITIES = NAMES + ("Bolkónski", "Bezúkhov", "Kurágin", "Anatole", "Vasíli", "Bagratión") + PLACES
ENTITY_RE = re.compile(r"(?<![^\W\d_])(?:" + "|".join(map(re.escape, sorted(ENTITIES, key=len, reverse=True)))
                       + r")(?![^\W\d_])")  # whole words: Russia is not Russian
ENTITY_WORDS = frozenset(w.lower() for e in ENTITIES for w in e.split())
# What about: words left when English function words (and the names above) are taken out.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves
said say says one two also yet upon us shall may might must o oh ah let like well
""".split())


def entity_counts(text: str) -> Counter:
    """How often each principal character and place is named in `text`."""
    return Counter(ENTITY_RE.findall(text))


def content_counts(text: str) -> Counter:
    """Counts of `text`'s content words: lower-cased, without function words and the entities' names."""
    words = (w.lower() for w in WORD_RE.findall(text))
    return Counter(w for w in words if w not in STOP_WORDS and re.split("['’]", w)[0] not in ENTITY_WORDS)


def jsd(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence of two count distributions, in bits: 0 the same, 1 disjoint.
    Two empty ones agree (0: neither names anyone); one empty against one that is not is 1."""
    tp, tq = sum(p.values()), sum(q.values())
    if not tp or not tq:
        return float(bool(tp) != bool(tq))
    keys = list(p.keys() | q.keys())
    a = np.array([p[k] for k in keys], dtype=np.float64) / tp
    b = np.array([q[k] for k in keys], dtype=np.float64) / tq
    m = (a + b) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return min(max(0.5 * kl(a) + 0.5 * kl(b), 0.0), 1.0)


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation without fixed points (n >= 2): text i is paired with another prompt's text."""
    order = np.random.default_rng(seed).permutation(n)
    pair = np.empty(n, dtype=np.int64)
    pair[order] = np.roll(order, -1)  # each text in the random cycle is paired with the next
    return pair.tolist()


def themes(gens: list[str], refs: list[str], book: str, seed: int = 0) -> dict[str, Any]:
    """Whether generated continuations carry the book's themes and their own prompt's, against the real
    continuations of the same prompts (refs[i] continues the prompt gens[i] continues).

    Pooled over all texts: who and where is named (rate and mix) and the content-word mix, each as a JSD to the book and
    to the real continuations. Per prompt: the JSD of each generated continuation to its own prompt's real continuation,
    and to another prompt's (a shuffled-prompt control); a model that follows its prompt is closer to its own."""
    book_e, book_c = entity_counts(book), content_counts(book)
    ge, re_ = [entity_counts(t) for t in gens], [entity_counts(t) for t in refs]
    gc, rc = [content_counts(t) for t in gens], [content_counts(t) for t in refs]
    pool = lambda cs: sum(cs, Counter())  # noqa: E731
    words = lambda texts: max(sum(len(WORD_RE.findall(t)) for t in texts), 1) / 1000  # noqa: E731
    other = derangement(len(gens), seed) if len(gens) > 1 else []

    def per_prompt(g: list[Counter], r: list[Counter]) -> dict[str, float | None]:
        return {"own": float(np.mean([jsd(a, b) for a, b in zip(g, r)])) if g else None,
                "shuffled": float(np.mean([jsd(g[i], r[j]) for i, j in enumerate(other)])) if other else None}

    return {
        "entities_per_kword": {"book": sum(book_e.values()) / words([book]),
                               "generated": sum(pool(ge).values()) / words(gens),
                               "reference": sum(pool(re_).values()) / words(refs)},
        "entities_jsd_to_book": {"generated": jsd(pool(ge), book_e), "reference": jsd(pool(re_), book_e)},
        "content_jsd_to_book": {"generated": jsd(pool(gc), book_c), "reference": jsd(pool(rc), book_c)},
        "entities_jsd_to_real": jsd(pool(ge), pool(re_)),
        "content_jsd_to_real": jsd(pool(gc), pool(rc)),
        "entities_per_prompt": per_prompt(ge, re_),
        "content_per_prompt": per_prompt(gc, rc),
        "top_content_words": {"generated": [w for w, _ in pool(gc).most_common(12)],
                              "reference": [w for w, _ in pool(rc).most_common(12)]},
    }


# ----------------------------------------------------------------------------- the caps

def judge(index: TrainIndex, gens: list[str], refs: list[str], book: str | None = None,
          seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Memorisation and style of the generated continuations, beside the real ones'; given the book (the train
    text), its style too, the distances of both to it, and the themes."""
    mem = {"generated": memorisation(index, gens), "reference": memorisation(index, refs)}
    style = {"generated": style_stats(gens, index.vocab_lower), "reference": style_stats(refs, index.vocab_lower)}
    if book is not None:
        style["book"] = stats = style_stats([book], index.vocab_lower)
        style["generated_distance"] = style_distance(style["generated"], stats)
        style["reference_distance"] = style_distance(style["reference"], stats)
        style["themes"] = themes(gens, refs, book, seed)
    return mem, style


def against_caps(mem: dict[str, Any], style: dict[str, Any]) -> dict[str, float]:
    """How many times the real continuations' rate the generated text copies 30-character spans of the
    training text and writes words never seen there (mostly misspellings); 1 = the real text's rate."""
    def ratio(generated: float, real: float) -> float:
        return generated / real if real else (1.0 if not generated else math.inf)
    return {"copy_ratio": ratio(mem["generated"]["char30_share"], mem["reference"]["char30_share"]),
            "misspell_ratio": ratio(style["generated"]["unknown_word_share"], style["reference"]["unknown_word_share"])}


def within_caps(ratios: dict[str, float]) -> bool:
    return ratios["copy_ratio"] <= COPY_CAP and ratios["misspell_ratio"] <= MISSPELL_CAP


def choose_temperature(trials: list[dict[str, float]]) -> dict[str, float]:
    """Of the temperatures whose samples stay within both caps (not copying the book or misspelling too much),
    the one a classifier tells from the real text least often ("distinguishable", when the two-sample test ran),
    else the highest: the model's own distribution as far as it goes. If none is within, the one nearest the caps."""
    within = [t for t in trials if within_caps(t)]
    if within:
        return min(within, key=lambda t: (t.get("distinguishable", 0.0), -t["temperature"]))
    return min(trials, key=lambda t: max(t["copy_ratio"] / COPY_CAP, t["misspell_ratio"] / MISSPELL_CAP))
