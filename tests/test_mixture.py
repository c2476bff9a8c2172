"""mixture.py: the mixture weights fitted by EM are the best weights."""
from __future__ import annotations

import itertools

import numpy as np

from bookgpt.eval.mixture import mixture_weights


def loglik(w: np.ndarray, p: np.ndarray) -> float:
    return float(np.log(w @ p).sum())


def test_two_components_get_the_best_weight() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 1, (2, 5000))
    w = mixture_weights(p)
    grid = np.linspace(0, 1, 1001)
    assert 0 < w[0] < 1 and abs(w.sum() - 1) < 1e-12
    assert loglik(w, p) >= max(loglik(np.array([v, 1 - v]), p) for v in grid) - 1e-6
    # a model that is always better gets all the weight; one always worse almost none
    assert mixture_weights(np.array([np.full(100, 0.9), np.full(100, 0.1)]))[0] > 0.99
    assert mixture_weights(np.array([np.full(100, 0.1), np.full(100, 0.9)]))[0] < 0.01


def test_three_components_beat_every_weight_on_a_grid() -> None:
    rng = np.random.default_rng(1)
    # three models, each better on its own third of the targets
    p = rng.uniform(0.05, 0.3, (3, 3000))
    for k in range(3):
        p[k, k * 1000:(k + 1) * 1000] *= 3
    w = mixture_weights(p)
    assert abs(w.sum() - 1) < 1e-9 and (w > 0.2).all()
    grid = [np.array([a, b, 1 - a - b]) for a, b in itertools.product(np.linspace(0, 1, 51), repeat=2) if a + b <= 1]
    assert loglik(w, p) >= max(loglik(v, p) for v in grid) - 1e-6
    # one component alone: all the weight
    assert mixture_weights(p[:1]) == np.array([1.0])
