"""Mixtures of per-token probabilities, for evaluate.py: a model mixed with a Kneser-Ney n-gram over its own
tokens, and an ensemble of runs trained on the same data.

Every mixture is p = sum_k w_k p_k for each token, the components' probabilities of the token that comes. The
weights are fitted on val (EM climbs to the weights of the highest val likelihood) and the fitted mixture is
then scored on the headline split, so test never chooses anything. Each figure is reported beside the single
model's static one, never instead of it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from bookgpt.common import likelihood_figures
from bookgpt.eval.baselines import kn_levels, kn_probs


def mixture_weights(p: np.ndarray, steps: int = 1000) -> np.ndarray:
    """The weights w (>= 0, summing to 1) of sum_k w_k p[k] that give these targets the highest likelihood.
    p: (components, targets), each component's probability of each target. By EM: the log-likelihood is
    concave in w, so EM climbs to its maximum."""
    p = np.asarray(p, dtype=np.float64)
    w = np.full(len(p), 1.0 / len(p))
    for _ in range(steps):
        new = w * np.mean(p / (w @ p), axis=1)
        if np.max(np.abs(new - w)) < 1e-7:
            return new
        w = new
    return w


def figures(scored: dict, name: str, p: np.ndarray) -> dict[str, float]:
    """likelihood_figures of these per-token probabilities of split `name`'s tokens."""
    lk = scored[name]["likelihood"]
    return likelihood_figures(-math.fsum(np.log(p)), len(p), lk["bytes"], lk["chars"])


class NgramMixture:
    """Per-token nll mixed token by token with a modified Kneser-Ney n-gram over the same tokens, fitted on train:
    p = w p_model + (1 - w) p_ngram. Each order's weight is fitted on val; the order with the best val bpb is
    scored on the headline split with that weight, and the n-gram alone beside it. The n-gram's probabilities
    per (order, split) are computed once, so a second mixture (dynamic evaluation's, an ensemble's) reuses them."""

    def __init__(self, orders: Sequence[int], train_tokens: np.ndarray, tokens: dict[str, np.ndarray], vocab_size: int,
                 timings: dict[str, float], log: Callable[[str], None]) -> None:
        self.orders, self.train_tokens, self.tokens, self.vocab_size = orders, train_tokens, tokens, vocab_size
        self.timings, self.log, self.probs = timings, log, {}

    def ngram_probs(self, order: int, name: str) -> np.ndarray:
        if (order, name) not in self.probs:
            t0 = time.perf_counter()
            levels = kn_levels(self.train_tokens, order, modified=True, vocab_size=self.vocab_size)
            self.probs[order, name] = kn_probs(levels, self.tokens[name])[1:]
            self.timings[f"n-gram of order {order} on {name}"] = time.perf_counter() - t0
        return self.probs[order, name]

    def __call__(self, token_nll: dict[str, np.ndarray], scored: dict, split: str, of: str = "the model") -> dict[str, Any]:
        """The mixture of `token_nll` (by split) on `split`, with its order and weight and every order's val bpb."""
        if not self.orders:
            return {}
        p_model = {name: np.exp(-nll) for name, nll in token_nll.items()}
        on_val = {}
        for order in self.orders:
            p_ngram = self.ngram_probs(order, "val")
            w = float(mixture_weights(np.stack([p_model["val"], p_ngram]))[0])
            on_val[order] = {"weight": w, "bpb": figures(scored, "val", w * p_model["val"] + (1 - w) * p_ngram)["bpb"],
                             "ngram_bpb": figures(scored, "val", p_ngram)["bpb"]}
            self.log(f"{of} mixed with a {order}-gram over tokens on val: weight {w:.3f}, {on_val[order]['bpb']:.4f} "
                     f"bpb (the n-gram alone {on_val[order]['ngram_bpb']:.4f})")
        order = min(on_val, key=lambda o: on_val[o]["bpb"])
        w = on_val[order]["weight"]
        p_ngram = self.ngram_probs(order, split)  # (for --split=val, the val figures once more)
        out = figures(scored, split, w * p_model[split] + (1 - w) * p_ngram)
        ngram_alone = figures(scored, split, p_ngram)["bpb"]
        self.log(f"  on {split}: {out['bpb']:.4f} bpb (the {order}-gram alone {ngram_alone:.4f})")
        return {**out, "order": order, "weight": w, "ngram_bpb": ngram_alone, "chosen_on": "val",
                "val_bpb_by_order": {str(o): r["bpb"] for o, r in on_val.items()}}


def ensemble(runs: list[str], token_nll: list[dict[str, np.ndarray]], scored: dict, split: str,
             log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Runs trained on the same data, mixed token by token: p = sum_k w_k p_k over the runs' per-token nll
    (`token_nll[k]` by split; the first is the evaluated run). The weights are fitted on val and the
    mixture scored on `split`. Returns its figures with the weights and each run's own bpb on `split`, and
    the ensemble's nll per token on val and `split` (for an n-gram mixture)."""
    p = {name: np.stack([np.exp(-nll[name]) for nll in token_nll]) for name in ("val", split)}
    w = mixture_weights(p["val"])
    mixed = {name: w @ p[name] for name in p}
    val_bpb = figures(scored, "val", mixed["val"])["bpb"]
    out = figures(scored, split, mixed[split])
    log(f"ensemble of {len(runs)} runs, weights {', '.join(f'{x:.3f}' for x in w)} (fitted on val: {val_bpb:.4f} "
        f"bpb): {out['bpb']:.4f} bpb on {split}")
    return ({**out, "runs": runs, "weights": [float(x) for x in w], "val_bpb": val_bpb, "chosen_on": "val",
             "runs_bpb": [figures(scored, split, row)["bpb"] for row in p[split]]},
            {name: -np.log(m) for name, m in mixed.items()})
