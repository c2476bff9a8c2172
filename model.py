"""The GPT as a textbook: a decoder-only transformer, small enough to read in one sitting.

Token embedding (+ learned positions or rotary), pre-norm blocks of causal self-attention (one
F.scaled_dot_product_attention call: flash / memory-efficient kernels on GPU, fused on CPU) and an MLP, a final
norm, and an output head tied to the embedding by default. `generate` samples with a KV cache that gives the same
tokens as recomputing the whole context every step.

The one switch: GPT(config) ends with `kernels.install(self)`, which swaps in the measured CPU kernels of
bookgpt/kernels.py (a faster dropout mask, softmax(QK^T)V written out for bf16, a sampling weight layout);
GPT(config, cpu_kernels=False) is the textbook model. Parameters, and so checkpoints, are the same either way.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bookgpt import kernels
from bookgpt.config import GPTConfig, UserError

# Under bf16 autocast QK-norm normalises bf16 queries and keys with float32 gains: torch computes that
# unfused (correctly) and warns once per process that its fused kernel wants one dtype. Not news to a user.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-5) if config.norm == "rmsnorm" else nn.LayerNorm(dim, bias=config.bias)


def rope_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the last dim by position-dependent angles. x: (B, nh, T, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class KVCache:
    """Every layer's keys and values for one generation: kv[layer] is (2, B, nh, block_size, hd), keys then values."""

    def __init__(self, n_layer: int, batch: int, n_head: int, length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.kv = [torch.zeros(2, batch, n_head, length, head_dim, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0  # number of positions filled


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True  # scaled init, see GPT._init_weights
        self.attn_dropout_p = config.dropout  # of the attention probabilities, inside the attention call
        self.resid_dropout = nn.Dropout(config.dropout)
        self.cpu_attention = None  # kernels.install: its explicit_causal_attention, for bf16 on a CPU
        self.gate = nn.Linear(config.n_embd, config.n_head, bias=False) if config.attn_gate else None
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, layer: int = 0, ve: torch.Tensor | None = None) -> torch.Tensor:
        """ve: this block's value embedding of the tokens (B, T, C), added to the values, or None."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd)
        q, k, v = qkv.unbind(0)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if ve is not None:
            v = v + ve.view(B, T, self.n_head, self.head_dim).transpose(1, 2).to(v.dtype)
        if cache is None:
            causal = True
        else:
            # Write this step's keys and values (one copy), then attend over everything cached so far.
            start, end = cache.pos, cache.pos + T
            if start and T > 1:
                raise ValueError("a KV cache prefill must start at position 0")
            kv = cache.kv[layer]
            kv[:, :, :, start:end] = qkv[1:] if rope is None and not self.qk_norm and ve is None else torch.stack((k, v))
            k, v = kv[:, :, :, :end].unbind(0)
            causal = start == 0  # a prefill from 0 is causal; one new query sees all keys
        q, k = q.to(v.dtype), k.to(v.dtype)  # normed q, k can be float32 under autocast (MPS, CUDA): SDPA wants one dtype
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if (cache is None and self.cpu_attention and q.device.type == "cpu"
                and q.dtype in (torch.bfloat16, torch.float16)):  # where the measured CPU kernel wins
            y = self.cpu_attention(q, k, v, dropout_p)  # kernels.explicit_causal_attention
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, dropout_p=dropout_p)
        if self.gate is not None:  # each head's output scaled by its gate for this token (Qiu et al., 2025)
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1).to(y.dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = int(config.mlp_ratio * config.n_embd)
        if self.kind == "swiglu":  # two input matrices: 2/3 of the width keeps the parameter count
            hidden = 8 * math.ceil(2 * hidden / 3 / 8)
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "relu2" and h.dtype == torch.float16:
            return self.dropout(relu2_proj_fp16(h, self.c_proj))
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))


def relu2_proj_fp16(h: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """proj(relu(h)^2) for float16 h (fp16 autocast, a T4's path). float16 holds up to 65,504, so the square of
    an activation above 256 would be inf in the forward pass, where a GradScaler cannot help. Square in float32
    and give the fp16 product each row divided by its largest value (at least 1), multiplying it back after."""
    h = F.relu(h).float().square()
    scale = h.detach().amax(dim=-1, keepdim=True).clamp_min(1.0)
    y = F.linear((h / scale).half(), proj.weight) * scale
    return y if proj.bias is None else y + proj.bias


class Block(nn.Module):
    def __init__(self, config: GPTConfig, index: int = 0) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.drop_path = config.drop_path * index / max(config.n_layer - 1, 1)  # deeper blocks are skipped more
        self.path_mask = nn.Dropout(self.drop_path)  # one value per sequence, see drop_branch

    def forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None, layer: int = 0,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_branch(self.attn(self.ln_1(x), rope, cache, layer, ve))
        return x + self.drop_branch(self.mlp(self.ln_2(x)))

    def drop_branch(self, y: torch.Tensor) -> torch.Tensor:
        """Stochastic depth (Huang et al., 2016) on a branch's output (B, T, C): dropout of one value per sequence."""
        return y * self.path_mask(y.new_ones(y.shape[0], 1, 1)) if self.training and self.drop_path else y


def training_flops(model: nn.Module, n_layer: int, n_embd: int, seq_len: int) -> int:
    """Training FLOPs per token of a GPT-shaped model (forward + backward = 3x forward), PaLM appendix B style: 6 per
    weight of every matrix a token goes through (output head included, a tied one once), plus 12 * n_layer * n_embd * T
    for the attention scores and the weighted sum of values. bench.py counts nanoGPT's model the same way."""
    matmul = sum(m.weight.numel() for m in {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)}.values())
    return 6 * matmul + 12 * n_layer * n_embd * seq_len


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, cpu_kernels: bool = True) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("vocab_size must be set to the data's vocabulary size to build a model")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # the order the blocks run in: layer looping (loop_blocks = k) runs the middle k twice, 0 1 2 3 2 3 4 5
        self.looped = range((config.n_layer - config.loop_blocks) // 2, (config.n_layer + config.loop_blocks) // 2)
        self.order = list(range(self.looped.stop)) + list(range(self.looped.start, config.n_layer))
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.n_embd)
                                          for _ in range(config.value_embeds))
        # a skip from block i's output into block n_layer - 1 - i, for the first half's blocks
        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2)) if config.unet_skips else None
        # multi-token prediction: a block on top of the last whose output predicts the token after next (training only)
        self.mtp = Block(config, config.n_layer - 1) if config.mtp_weight > 0 else None
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        if cpu_kernels:  # the one switch: off, the model stays the textbook one above
            kernels.install(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path: str = "checkpoint", device: str = "cpu") -> "GPT":
        """The model a checkpoint (checkpoint.load_checkpoint's dict) holds, in eval mode on `device`."""
        try:
            model = cls(GPTConfig(**ckpt["model_config"]))
            model.load_state_dict(ckpt["model"])
        except (TypeError, ValueError, RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} does not match this version of model.py: {first}") from None
        return model.to(device).eval()

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init; projections into the residual stream are scaled by 1/sqrt(2 * n_layer)
        # so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual", False)
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=0.0 if residual and self.config.zero_init else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (shared ones once). non_embedding drops the position table and the value tables, and
        the token table too when it is not also the output head (a lookup costs no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
            n -= sum(t.weight.numel() for t in self.value_embeds)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (see training_flops), a looped block's counted each time it runs."""
        looped = 6 * sum(m.weight.numel() for i in self.looped for m in self.blocks[i].modules()
                         if isinstance(m, nn.Linear))
        return looped + training_flops(self, len(self.order), self.config.n_embd, seq_len or self.config.block_size)

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops

    def set_dropout(self, p: float) -> None:
        """Change every dropout rate of the model (embedding, attention, residual) to p, as a dropout
        schedule does during training. The model's config keeps the rate it was built with."""
        self.drop.p = p
        for block in [*self.blocks, *([self.mtp] if self.mtp is not None else [])]:
            block.attn.resid_dropout.p = block.mlp.dropout.p = block.attn.attn_dropout_p = p

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab) and the mean cross-entropy if targets are given."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        n, k = self.config.n_layer, self.config.value_embeds
        tables = [t(idx) for t in self.value_embeds]
        ves = tables + [None] * (n - 2 * k) + tables  # block i's value embedding: the first k and the last k
        skips = {}  # block i's latest output, for the skip into block n - 1 - i
        for layer, i in enumerate(self.order):  # the cache keeps one layer per block run: a looped block has two
            if self.skip_weights is not None and i >= n - len(self.skip_weights):
                x = x + self.skip_weights[n - 1 - i] * skips[n - 1 - i]
            x = self.blocks[i](x, rope, cache, layer, ves[i])
            if self.skip_weights is not None and i < len(self.skip_weights):
                skips[i] = x
        if cache is not None:
            cache.pos += T
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
            if self.mtp is not None and self.training:  # position t also predicts token t + 2, targets[:, t + 1]
                ahead = self.head(self.mtp(x, rope)[:, :-1])
                loss = loss + self.config.mtp_weight * F.cross_entropy(
                    ahead.float().flatten(0, 1), targets[:, 1:].reshape(-1), ignore_index=-1)
        return logits, loss

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream (B, T, C) -> logits (B, T, vocab): final norm, output head, optional soft cap."""
        logits = self.lm_head(self.ln_f(x))
        if self.config.logit_softcap > 0:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype | None = None) -> KVCache:
        """A cache in the dtype attention computes in (autocast's, when it is on): a float32 cache
        under bf16 autocast would be cast whole, every token, to meet the bf16 queries."""
        c, dtype = self.config, dtype or self.compute_dtype()
        return KVCache(len(self.order), batch, c.n_head, c.block_size, c.n_embd // c.n_head, device, dtype)

    def compute_dtype(self) -> torch.dtype:
        """The dtype matrix products run in right now: autocast's if it is on for this device."""
        device = self.lm_head.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lm_head.weight.dtype

    sampling_weights = kernels.sampling_weights  # on a CPU with the kernels: the (in, out) layout while sampling

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None, use_cache: bool = True,
                        allowed: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
        """Yield the next token ids (B,) one step at a time. The context window moves in jumps: when it is
        full, the oldest quarter is dropped and the rest is re-read (into the cache, or recomputed without
        one), so every token sees at least 3/4 of block_size of context and the cache never changes the output.
        `allowed(seq, tokens_left_after_this_one)` -> (B, vocab) bool, if given, says which tokens may come next
        (bookgpt/sampling.py's Utf8Guard keeps byte-level samples valid UTF-8)."""
        block = self.config.block_size
        keep = block - max(1, block // 4)
        seq = idx
        window = max(0, seq.size(1) - block)  # index of the first token in the context window
        cache = None
        with self.sampling_weights():
            for i in range(max_new_tokens):
                if seq.size(1) - window > block:  # full: jump the window forward
                    window = seq.size(1) - keep
                    cache = None
                if use_cache and cache is not None:
                    logits, _ = self(seq[:, -1:], cache=cache)
                else:
                    if use_cache:
                        cache = self.new_cache(seq.size(0), seq.device)
                    logits, _ = self(seq[:, window:], cache=cache)
                mask = allowed(seq, max_new_tokens - 1 - i) if allowed is not None else None
                nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator, mask)
                seq = torch.cat((seq, nxt[:, None]), dim=1)
                yield nxt

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 allowed: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache,
                                        allowed))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1) if new else idx


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                     top_p: float | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution (B, V) a token is drawn from: the tokens `allowed` (a (B, V) bool mask) only, at
    `temperature` (> 0), cut to the top_k and to the top_p of the mass, renormalised."""
    logits = logits.float() / temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens more likely than it already hold top_p of the mass
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float = 0.8, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits (B, V); temperature <= 0 is greedy (argmax). Draws exactly one uniform number per
    row from `generator`, so two runs with the same seed make the same choices whatever path computed the logits."""
    if temperature <= 0:
        logits = logits.float()
        return (logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))).argmax(dim=-1)
    cdf = next_token_probs(logits, temperature, top_k, top_p, allowed).cumsum(dim=-1)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(cdf.size(-1) - 1)
