"""The measured CPU kernels behind model.py's one switch, `kernels.install(model)` (GPT(config) calls it;
GPT(config, cpu_kernels=False) is the textbook model). Each replaces a torch op only where it wins (docs/benchmarks.md,
the 2-core AVX-512 machine) and is that op elsewhere: `dropout` (every dropout, on a CPU; its random draw is an
operator of its own, `keep_mask`, so torch.compile takes the model in one graph), `explicit_causal_attention`
(bf16/fp16 on a CPU, no KV cache), `Linear` + `sampling_weights` (an (in, out) weight layout while sampling on a CPU).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


def install(model: nn.Module) -> None:
    """The switch: each nn.Linear of `model` becomes a Linear, each nn.Dropout a Dropout (subclasses without state
    of their own: parameters and state_dict keys stay), each `cpu_attention` hook explicit_causal_attention."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
        elif type(m) is nn.Dropout:
            m.__class__ = Dropout
        elif hasattr(m, "cpu_attention"):
            m.cpu_attention = explicit_causal_attention


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout with a faster mask on CPUs. torch draws a CPU mask one element at a time, 64 random bits each
    (its parallel Bernoulli is for Intel CPUs only): 40% of a bf16 training step here. Each 64-bit draw gives
    four 16-bit uniforms instead (p is kept to 1/65536), from the same seeded generator, so resume stays exact:
    3x faster (docs/benchmarks.md, "What made it faster" 3). Compiled, the mask's multiplication fuses with the
    work around it."""
    if not training or p == 0:
        return x  # (F.dropout would too, one dispatch later: this runs twice per block per sampled token)
    if not 0 < p < 1 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * keep_mask(x.detach(), p).to(x.dtype).mul_(1.0 / (1.0 - p))  # as F.dropout: 0 or 1/(1-p)


@torch.library.custom_op("bookgpt::keep_mask", mutates_args=())
def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool mask in x's shape, each element True with probability 1 - p: four 16-bit uniforms from each 64-bit
    draw of the global generator. An operator of its own, so torch.compile calls it as it is, where eager would
    (after x), and fuses the multiplication after it."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None).view(torch.int16)[:n]
    return bits.view(x.shape) >= round(p * 65536) - 32768


@keep_mask.register_fake
def _(x: torch.Tensor, p: float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.bool)


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                              bands: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), causal) v with the scores written out. For bf16 on a CPU, forward + backward at
    T=256: 2x faster than SDPA's CPU flash kernel, 3x than the math path SDPA takes with dropout
    (docs/benchmarks.md, "What made it faster" 2). The CPU softmax accumulates bf16 in float32: the same
    probabilities as upcasting first, in half the time. The queries go in `bands` bands (by default up to four,
    of at least 64 queries), each scored against the keys up to its last position only: the scores above the
    diagonal, which the mask would zero, are mostly never computed (at T=256, 62.5% of the (T, T) scores are),
    the same outputs in less time (docs/benchmarks.md, "What made it faster" 6)."""
    B, nh, T, hd = q.shape
    q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    bands = bands or max(1, min(4, T // 64))
    bounds = [T * i // bands for i in range(bands + 1)]
    out = []
    for start, end in zip(bounds, bounds[1:]):
        # mask and scale inside the product: no extra passes over the scores
        future = torch.full((end - start, end), float("-inf"), dtype=q.dtype, device=q.device).triu(1 + start)
        att = torch.baddbmm(future, q[:, start:end], k[:, :end].transpose(1, 2), alpha=hd ** -0.5)
        att = dropout(att.softmax(dim=-1), dropout_p)
        out.append(att @ v[:, :end])
    return torch.cat(out, dim=1).view(B, nh, T, hd)


class Linear(nn.Linear):
    """nn.Linear that uses `weight_t`, an (in, out) contiguous copy of the weight in the compute dtype, when
    sampling_weights has set it: a sampled token is one row times every matrix, and on a CPU x @ W(in, out)
    streams the weights faster than x @ W.T (docs/benchmarks.md, "Sampling" 1). Used only while the weight
    is unchanged since the copy (its version counter) and the dtypes fit; training never sets it."""

    weight_t: torch.Tensor | None = None
    weight_t_version: int = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_t
        if (w is None or w.device != x.device or self.weight_t_version != self.weight._version
                or (w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type))):
            return super().forward(x)
        y = x @ w
        return y if self.bias is None else y + self.bias.to(y.dtype)


@contextlib.contextmanager
def sampling_weights(model: nn.Module) -> Iterator[None]:
    """Give every Linear of `model` (a GPT) its weight_t in model.compute_dtype() for the duration, on a CPU
    (the only device where the layout was measured to matter)."""
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.weight.device.type == "cpu"]
    dtype = model.compute_dtype()
    with torch.no_grad():
        for m in linears:
            m.weight_t, m.weight_t_version = m.weight.t().to(dtype).contiguous(), m.weight._version
    try:
        yield
    finally:
        for m in linears:
            m.weight_t = None
