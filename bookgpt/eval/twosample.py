"""Can a reader tell? A two-sample test of style: a classifier learns to tell the generated continuations from the
real ones of the same prompts, and its cross-validated accuracy says how distinguishable they are (0.5: it cannot
tell them apart; 1: always). Beside it the same classifier on two sets of real passages, the control, near 0.5:
the real continuations of the even-numbered prompts against those of the odd-numbered ones. The prompts are spread
through the held-out split in order, so the two sets come from the same passages (the same people and events) and
share no text. (Random passages would not do: drawn from the held-out split they overlap one another, and a held-out
piece whose twin was learnt scores on its own side, 0.84 for two sets of such passages; drawn from the train split
they differ from the held-out continuations in subject, which the held-out split's few long blocks concentrate.)

The texts are cut into pieces of `chars` characters: each generated continuation and the real continuation of its
prompt piece by piece at the same places, so length is never a cue. The features are TF-IDF weights of character
1-5-grams (spelling, punctuation, rhythm) and, beside them, word 1-2-grams (vocabulary, repetition); the classifier
is scikit-learn's logistic regression with its regularisation chosen by an inner cross-validation. The outer one
holds out whole prompts (5 folds grouped by prompt): a prompt's pieces are never on both sides of a split."""
from __future__ import annotations

from typing import Any, Sequence

from bookgpt.config import UserError

FEATURES = {"char 1-5-grams": ("char", (1, 5)), "word 1-2-grams": ("word", (1, 2))}
HEADLINE = "char 1-5-grams"
FOLDS = 5


def require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UserError("the two-sample test of style needs scikit-learn: pip install scikit-learn "
                        "(or pass --two_sample_chars=0 to skip it)") from None


def pieces(generated: Sequence[str], real: Sequence[str], chars: int) -> tuple[list[str], list[str], list[int]]:
    """Each generated continuation and its real one cut into pieces of `chars` characters at the same places (as
    far as the shorter goes), and each pair's prompt (its group)."""
    a, b, groups = [], [], []
    for prompt, (gen, ref) in enumerate(zip(generated, real)):
        for start in range(0, min(len(gen), len(ref)) - chars + 1, chars):
            a.append(gen[start:start + chars])
            b.append(ref[start:start + chars])
            groups.append(prompt)
    return a, b, groups


def distinguishability(a: Sequence[str], b: Sequence[str], groups: Sequence[int], analyzer: str = "char",
                       ngrams: tuple[int, int] = (1, 5)) -> float:
    """The mean held-out accuracy of a classifier telling `a` from `b` (a[i] and b[i] in group groups[i]), over
    FOLDS folds that keep each group whole."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline

    if len(set(groups)) < FOLDS:
        raise UserError(f"the two-sample test needs pieces from at least {FOLDS} prompts, got {len(set(groups))}: "
                        "pass more --num_prompts or longer --gen_tokens, or a smaller --two_sample_chars")
    texts, labels = [*a, *b], [1] * len(a) + [0] * len(b)
    model = make_pipeline(TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, lowercase=False, sublinear_tf=True),
                          GridSearchCV(LogisticRegression(max_iter=2000), {"C": [1.0, 10.0, 100.0]}, cv=3))
    scores = cross_val_score(model, texts, labels, groups=[*groups, *groups], cv=GroupKFold(FOLDS),
                             scoring="accuracy")
    return float(scores.mean())


def two_sample_test(generated: Sequence[str], real: Sequence[str], chars: int, control: bool = True,
                    features: Sequence[str] = tuple(FEATURES)) -> dict[str, Any]:
    """The generated continuations against the real ones (both in prompt order) with each of `features`; with
    `control`, also the real continuations of the even-numbered prompts against the odd-numbered ones'.
    Too few prompts: {"skipped": why}."""
    a, b, groups = pieces(generated, real, chars)
    base = {"chars": chars, "pieces": len(a), "prompts": len(set(groups)), "folds": FOLDS}
    if len(set(groups)) < FOLDS:
        return {**base, "skipped": f"pieces of {chars} characters from {len(set(groups))} prompts; the test needs "
                                   f"{FOLDS} or more (more --num_prompts or --gen_tokens)"}
    out = {**base, "generated_vs_real": {f: distinguishability(a, b, groups, *FEATURES[f]) for f in features}}
    if control:
        even, odd, pairs = pieces(real[0::2], real[1::2], chars)
        out["control_pieces"] = len(even)
        out["real_vs_real"] = ({f: distinguishability(even, odd, pairs, *FEATURES[f]) for f in features}
                               if len(set(pairs)) >= FOLDS else {f: None for f in features})
    return out
