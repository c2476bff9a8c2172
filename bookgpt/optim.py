"""Optimisation: its keys (OptimConfig), Muon, the AdamW parameter groups, the learning-rate and dropout schedules,
the step that clips and updates every optimizer together (or none of them), and an average of the weights.

    optimizers = make_optimizers(model, cfg, device)   # cfg: an OptimConfig (a TrainConfig is one)
    stepped = optimizer_step(optimizers, scaler, params, grad_clip)
    ema = WeightAverage(model, 0.99); ema.update(); with ema.swapped_in(): ...
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from bookgpt.common import native_bf16
from bookgpt.config import opt


@dataclass
class OptimConfig:
    """The optimiser's and the schedules' keys: training.TrainConfig inherits them (after the model's)."""
    optimizer: str = opt("muon", "muon (Muon for the hidden matrices, AdamW for the rest), or adamw", ("adamw", "muon"))
    learning_rate: float = opt(2e-3, "peak AdamW learning rate")
    min_lr: float = opt(2e-4, "AdamW's learning rate at the end of the decay (Muon's ends at the same fraction)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    muon_lr: float = opt(0.02, "Muon learning rate (optimizer=muon)")
    muon_momentum: float = opt(0.95, "Muon momentum")
    muon_weight_decay: float = opt(0.0, "decoupled weight decay on Muon's matrices (weight_decay is AdamW's)")
    muon_wd_schedule: str = opt("lr", "lr: each step shrinks Muon's matrices by its current rate x muon_weight_decay, "
                                      "fading as the rate decays; constant: by muon_lr x muon_weight_decay to the end",
                                ("lr", "constant"))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    lr_schedule: str = opt("cosine", "cosine (warmup, cosine decay) or wsd (warmup, stable, linear decay)",
                           ("cosine", "wsd"))
    warmup_iters: int = opt(50, "linear warmup steps")
    lr_decay_iters: int = opt(0, "steps until min_lr (0 = max_iters)")
    decay_frac: float = opt(0.2, "wsd: share of the run spent decaying")
    dropout_ramp: float = opt(0.0, "dropout rises over this share of the run in four stages, 0, 1/3, 2/3 and all of "
                                   "`dropout` (0 = the same rate throughout; 1 = all of it in the last quarter)")


# ----------------------------------------------------------------------------- Muon

@functools.cache
def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (fast, and precise enough for an update's
    direction); float32 elsewhere: a CPU without AVX-512-BF16 emulates bf16 products ~45x slower."""
    return torch.bfloat16 if native_bf16(str(device)) else torch.float32


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G (the U V^T of its SVD) with a quintic Newton-Schulz
    iteration whose coefficients push singular values towards 1 fast (modded-nanogpt's Muon).
    G is one matrix (r, c) or a stack of equal-shaped ones (n, r, c), done in one batched pass."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(newton_schulz_dtype(G.device))
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update for each 2D weight is orthogonalised (Newton-Schulz).
    Only for hidden matrices; embeddings, the head and gains stay with AdamW.

    Matrices of one shape (every block's c_attn, say) are stepped together: their momentum with
    multi-tensor kernels, their Newton-Schulz iterations as one batched product. A per-matrix loop
    launches ~56 small kernels for each matrix, which on a GPU costs more than the arithmetic.

    Weight decay is decoupled, as AdamW's: each step shrinks a matrix by decay_lr * weight_decay before
    the update, where decay_lr is the current lr (decay_with_lr, so the shrink fades as the schedule
    decays the rate) or else the rate Muon was built with (a constant shrink to the end of the run)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, decay_with_lr: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      decay_with_lr=decay_with_lr, peak_lr=lr))

    def __setstate__(self, state: dict) -> None:  # load_state_dict goes through here
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before these options had none: their behaviour then
            group.setdefault("weight_decay", 0.0)
            group.setdefault("decay_with_lr", True)
            group.setdefault("peak_lr", group["lr"])

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for (rows, cols), params in by_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
                g = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
                update = zeropower_via_newtonschulz5(torch.stack(g))
                if group["weight_decay"]:  # decoupled: shrink, then step
                    decay_lr = group["lr"] if group["decay_with_lr"] else group["peak_lr"]
                    torch._foreach_mul_(params, 1 - decay_lr * group["weight_decay"])
                torch._foreach_add_(params, list(update.unbind(0)),
                                    alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)


# ----------------------------------------------------------------------------- optimizers and schedule

def make_optimizers(model: torch.nn.Module, cfg: OptimConfig, device: str) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices only (not gains, biases); with optimizer=muon the
    hidden matrices (not embeddings or head) go to Muon instead."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # token and position tables (value embeddings too) and the head: AdamW, never Muon
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} | {id(model.lm_head.weight)}
    hidden = [p for p in params.values() if p.dim() >= 2 and id(p) not in embed]
    matrices = [p for p in params.values() if p.dim() >= 2 and (cfg.optimizer == "adamw" or id(p) in embed)]
    others = [p for p in params.values() if p.dim() < 2]
    fused = device.startswith(("cuda", "cpu"))  # one kernel for all tensors: optimizer steps ~3x faster on CPU too
    adamw = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                               {"params": others, "weight_decay": 0.0}],
                              lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if cfg.optimizer == "adamw":
        return [adamw]
    return [adamw, Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                         weight_decay=cfg.muon_weight_decay, decay_with_lr=cfg.muon_wd_schedule == "lr")]


def lr_factor(cfg: OptimConfig, it: int, progress: float) -> float:
    """Learning-rate multiplier in [min_lr/learning_rate, 1]: linear warmup, then cosine or
    warmup-stable-decay. `progress` in [0, 1] is how far through the budget the run is."""
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    floor = cfg.min_lr / cfg.learning_rate
    progress = min(max(progress, 0.0), 1.0)
    if cfg.lr_schedule == "wsd":
        decay_start = 1.0 - cfg.decay_frac
        if progress < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * (progress - decay_start) / max(cfg.decay_frac, 1e-9)
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))


def dropout_at(dropout: float, ramp: float, progress: float) -> float:
    """The dropout rate `progress` (0 to 1) through the run: `dropout` throughout, or with ramp > 0
    (dropout_ramp) rising over that share of the run in four equal stages, 0, 1/3, 2/3 and all of
    `dropout`, which it keeps to the end (four rates, so a compiled model recompiles at most three times)."""
    if ramp <= 0:
        return dropout
    return dropout * min(math.floor(4 * max(progress, 0.0) / ramp), 3) / 3


def set_lr(optimizers: list[torch.optim.Optimizer], cfg: OptimConfig, factor: float) -> None:
    """Scale each optimizer's peak rate (AdamW's learning_rate, Muon's muon_lr) by `factor`."""
    for o in optimizers:
        base = cfg.muon_lr if isinstance(o, Muon) else cfg.learning_rate
        for group in o.param_groups:
            group["lr"] = base * factor


# ----------------------------------------------------------------------------- the update

def optimizer_step(optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler,
                   params: Iterable[torch.Tensor], grad_clip: float) -> bool:
    """Clip the global gradient norm and step every optimizer, or, under fp16's GradScaler when a
    gradient overflowed, step none of them; then update the scale and clear the gradients.

    GradScaler decides per optimizer: unscale_ records an overflow only for the optimizer whose
    gradients hold it. The clip is shared, so one inf gradient makes the global norm inf, clipping
    multiplies *every* gradient by 1/inf or NaN, and an optimizer whose own gradients were finite
    (Muon, beside AdamW) would step on zeros or NaNs. So the decision is taken once, for all.
    Returns whether the optimizers stepped. Reads a value on the host only under fp16 (GradScaler
    does that anyway); bf16 and float32 steps never wait for the GPU here."""
    params = [p for p in params if p.grad is not None]
    stepped = True
    if scaler.is_enabled():
        for o in optimizers:
            scaler.unscale_(o)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        stepped = bool(torch.isfinite(norm))
        if stepped and grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        if stepped:
            for o in optimizers:
                scaler.step(o)
        scaler.update()  # an overflow lowers the scale (every overflow was recorded by unscale_)
    else:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        for o in optimizers:
            o.step()
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    return stepped


# ----------------------------------------------------------------------------- weight averaging

class WeightAverage:
    """An exponential moving average of a model's parameters, kept in float32 beside them. After each
    step avg += (1 - d) * (param - avg) with d = min(decay, (1 + t) / (10 + t)) at update t, so the
    random initial weights fade within the first steps whatever the decay. It is scored and saved by
    swapping it into the model (`swapped_in`), which puts the trained weights back afterwards."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.names, self.params = zip(*model.named_parameters())  # a tied weight once
        self.avg = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.avg, [p.float() for p in self.params], 1.0 - d)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "avg": dict(zip(self.names, self.avg))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for name, a in zip(self.names, self.avg):
            a.copy_(state["avg"][name])
