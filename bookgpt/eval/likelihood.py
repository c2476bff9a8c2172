"""The model's passes over held-out text for evaluate.py (the strided full pass that scores every token once,
dynamic evaluation's pass and Krause et al.'s gradient RMS), and where the generation checks' prompts start."""
from __future__ import annotations

import copy
import math
import random
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bookgpt.common import autocast


def strided_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n_scored) per window: the model reads tokens[start:end], predicts
    tokens[start+1:end+1] and the last n_scored of those predictions count.

    Targets 1..n_tokens-1 are each scored once (token 0 has no context to be predicted from).
    The first window scores all its targets; every later one moves `stride` tokens on and scores
    only the new ones, so each has at least block_size - stride + 1 tokens of context. The last
    window ends at the last token and is still a full block (HF's recipe shortens it instead)."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size={block_size}, got {stride}")
    windows: list[tuple[int, int, int]] = []
    done = 0  # targets 1..done are scored
    while done < n_tokens - 1:
        end = min(done + stride if done else block_size, n_tokens - 1)
        windows.append((max(0, end - block_size), end, end - done))
        done = end
    return windows


def strided_batches(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int, stride: int,
                    batch_size: int, device: str, dtype: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of windows: the nll (nats, float32 from the logits even under autocast) of the last m
    predictions of each row, shape (rows, m), and a mask of those that count (the last n_scored of each
    row). Read row by row, the counted entries are the targets 1..len(tokens)-1 in order."""
    tokens = np.asarray(tokens, dtype=np.int64)
    windows = strided_windows(len(tokens), block_size, stride)
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        # every window is a full block except when the whole text is shorter than one
        length = batch[0][1] - batch[0][0]
        xy = torch.from_numpy(np.stack([tokens[s:s + length + 1] for s, _, _ in batch])).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        with autocast(device, dtype):
            logits, _ = model(x)
        m = max(n for _, _, n in batch)  # only the last m positions of any row are scored
        nll = F.cross_entropy(logits[:, -m:].float().flatten(0, 1), y[:, -m:].reshape(-1), reduction="none")
        first = torch.tensor([m - n for _, _, n in batch], device=device)
        yield nll.view(len(batch), m), torch.arange(m, device=device)[None, :] >= first[:, None]


@torch.inference_mode()
def strided_nll(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int, stride: int,
                batch_size: int = 16, device: str = "cpu", dtype: str = "float32") -> tuple[float, int]:
    """Total negative log-likelihood (nats) of tokens[1:] under `model`, and how many tokens that is."""
    # one float32 sum per batch, left on the device: nothing waits for the GPU until the end; a mask, not
    # nll[scored]: boolean indexing waits for the GPU to count the selected elements
    sums = [torch.where(scored, nll, 0.0).sum()
            for nll, scored in strided_batches(model, tokens, block_size, stride, batch_size, device, dtype)]
    # summed in float64 on the host, exactly enough for a 3 MB book (MPS has no float64, and a float32 running
    # total would drift over thousands of batches)
    return (math.fsum(torch.stack(sums).cpu().tolist()) if sums else 0.0), max(len(tokens) - 1, 0)


@torch.inference_mode()
def strided_token_nll(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int, stride: int,
                      batch_size: int = 16, device: str = "cpu", dtype: str = "float32") -> np.ndarray:
    """strided_nll's pass, one nll (nats) per token of tokens[1:] (for mixing with another model)."""
    parts = [nll.cpu().numpy()[scored.cpu().numpy()]
             for nll, scored in strided_batches(model, tokens, block_size, stride, batch_size, device, dtype)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def dynamic_token_nll(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int, stride: int,
                      lr: float, device: str = "cpu", dtype: str = "float32", decay: float = 0.0,
                      grad_rms: list[torch.Tensor] | None = None) -> np.ndarray:
    """strided_token_nll with dynamic evaluation (Krause et al., 2018): the windows are read in order, one at a time,
    and after scoring a window the model takes one step on the tokens it just scored. Every token is still predicted
    before the model learns from it (a prequential code, as bz2 and xz adapt while they read), so this is a fair
    held-out figure, but of a model that keeps learning from the text it is scored on: it is reported beside the static
    one, never instead. Works on a copy; `model` is left as it was.

    The step is plain SGD, or with `grad_rms` (train_gradient_rms) Krause et al.'s: each gradient
    divided by its RMS over training batches, and with `decay` a pull back towards the trained weights,
    theta += -lr * g / (rms + floor) + min(decay * rms / mean(rms), 1) * (theta_trained - theta)
    (without grad_rms: theta += -lr * g + decay * (theta_trained - theta))."""
    model = copy.deepcopy(model).train(False)
    params = [p.requires_grad_(True) for p in model.parameters()]
    trained = [p.detach().clone() for p in params] if decay else []
    if grad_rms is not None:
        mean_rms = torch.cat([r.flatten() for r in grad_rms]).mean()
        # a weight whose gradient was ~0 on the sampled batches (the embedding of a token they lack) must not
        # take an unbounded step: the floor is a tenth of its tensor's mean RMS (or of all of them; none: SGD)
        floors = [0.1 * (r.mean() if r.mean() > 0 else mean_rms) for r in grad_rms]
        scale = [1.0 / (r + f) if f > 0 else None for r, f in zip(grad_rms, floors)]
        pull = [torch.clamp(decay * r / mean_rms, max=1.0) if mean_rms > 0 else min(decay, 1.0) for r in grad_rms]
    else:
        scale, pull = [None] * len(params), [min(decay, 1.0)] * len(params)
    tokens_t = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)
    parts = []
    for start, end, n in strided_windows(len(tokens_t), block_size, stride):
        xy = tokens_t[start:end + 1][None]
        with autocast(device, dtype):
            logits, _ = model(xy[:, :-1])
        nll = F.cross_entropy(logits[0, -n:].float(), xy[0, -n:], reduction="none")
        parts.append(nll.detach())
        (nll.sum() / n).backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                step = -lr * (p.grad if scale[i] is None else p.grad * scale[i])
                if decay:
                    step += pull[i] * (trained[i] - p)
                p.add_(step)
                p.grad = None
    # float64 on the host (MPS has none)
    return torch.cat(parts).cpu().numpy().astype(np.float64) if parts else np.zeros(0)


def train_gradient_rms(model: torch.nn.Module, tokens: np.ndarray, block_size: int, device: str = "cpu",
                       dtype: str = "float32", batches: int = 16, batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """The RMS of each parameter's gradient over `batches` random batches of the training split (the mean
    loss per batch, as dynamic_nll's steps use): Krause et al.'s normaliser. Works on a copy."""
    model = copy.deepcopy(model).train(False)
    params = [p.requires_grad_(True) for p in model.parameters()]
    squares = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    rng = np.random.default_rng(seed)
    tokens = np.asarray(tokens, dtype=np.int64)
    for _ in range(batches):
        starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
        xy = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts])).to(device)
        with autocast(device, dtype):
            logits, _ = model(xy[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].reshape(-1)).backward()
        with torch.no_grad():
            for sq, p in zip(squares, params):
                sq += p.grad.float() ** 2
                p.grad = None
    return [(sq / batches).sqrt() for sq in squares]


def pick_prompts(text: str, num: int, prompt_chars: int, room: int, seed: int) -> list[int]:
    """Start offsets of `num` prompts, one drawn at random from each of `num` equal stretches of
    `text` (so they spread over the split), moved to the next word start, leaving `room`
    characters after each prompt for its real continuation where the stretch allows."""
    rng = random.Random(seed)
    stretch = len(text) // max(num, 1)
    starts = []
    for i in range(num):
        lo, hi = i * stretch, max(i * stretch, (i + 1) * stretch - prompt_chars - room)
        s = rng.randint(lo, hi)
        while 0 < s < hi and not (text[s - 1].isspace() and not text[s].isspace()):
            s += 1
        starts.append(s)
    return starts

