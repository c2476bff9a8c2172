"""Distillation: learn from trained runs' predictions as well as from the text (train.py's distill_from).

On a small book a model overfits long before it runs out of compute; another model's full
distribution over the next token says more per position than the one token the text has, and
an average of several models is better than any of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bookgpt.checkpoint import checkpoint_path, data_difference, load_checkpoint
from bookgpt.common import CompiledWithFallback
from bookgpt.config import UserError


def teacher_checkpoints(runs: tuple[str, ...], meta: dict[str, Any], block_size: int,
                        which: str = "best") -> list[tuple[dict[str, Any], Path]]:
    """One checkpoint of each teacher run (best.pt, or ema.pt: its weight average), checked to fit the
    student: the same data, at least its context."""
    found = []
    for run in runs:
        path = checkpoint_path(run, which)
        ckpt = load_checkpoint(path)
        if diff := data_difference(ckpt["meta"], meta):
            raise UserError(f"cannot distil from {path}: it was trained on other data ({diff}); "
                            f"teachers need the student's data_dir")
        if ckpt["model_config"]["block_size"] < block_size:
            raise UserError(f"cannot distil from {path}: its block_size {ckpt['model_config']['block_size']} is "
                            f"shorter than the student's {block_size}; use a teacher with at least that context")
        found.append((ckpt, path))
    return found


class Teacher(torch.nn.Module):
    """Trained runs whose mean next-token distribution a student learns from. forward returns the
    log of the mean probabilities as logits, and their cross-entropy with targets, as GPT.forward
    does, so train.py's estimate_loss scores the teacher too."""

    def __init__(self, models: list[torch.nn.Module], compile: bool = False) -> None:
        super().__init__()
        models = [CompiledWithFallback(m) if compile else m for m in models]  # compiled as the student is
        self.models = torch.nn.ModuleList(m.eval().requires_grad_(False) for m in models)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always in eval mode: no dropout in the targets

    @torch.no_grad()
    def probs(self, idx: torch.Tensor) -> torch.Tensor:
        """The mean of the runs' next-token probabilities, (B, T, vocab), float32."""
        return sum(F.softmax(m(idx)[0].float(), dim=-1) for m in self.models) / len(self.models)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logp = self.probs(idx).log()
        loss = None if targets is None else F.nll_loss(logp.flatten(0, 1), targets.reshape(-1))
        return logp, loss


def distill_loss(logits: torch.Tensor, loss: torch.Tensor, teacher_probs: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) x the text's cross-entropy + weight x the cross-entropy against the teacher's
    distribution (its KL divergence plus the teacher's entropy: in nats per token, like the first)."""
    soft = F.cross_entropy(logits.float().flatten(0, 1), teacher_probs.flatten(0, 1))
    return (1 - weight) * loss + weight * soft
