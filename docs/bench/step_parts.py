"""Where one training step of a config goes, part by part: each piece of the model (forward + backward) and of the
optimizer timed alone at the config's own shapes and dtypes, times the number of times a step runs it.

    python docs/bench/step_parts.py [config/wp_bpe_cpu.toml ...] [--key=value ...]   # from the repository root

The parts are the model's own modules and functions (model.py, bookgpt/kernels.py, bookgpt/optim.py) on inputs
shaped and typed as a step gives them (bf16 autocast: a float32 residual stream, bf16 products). What the sum
misses of bench.py's measured step is what no part holds: autograd's bookkeeping, views, the other small ops.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bookgpt import kernels  # noqa: E402
from bookgpt.common import autocast, resolve_dtype  # noqa: E402
from bookgpt.config import GPTConfig, parse_config  # noqa: E402
from bookgpt.optim import make_optimizers, optimizer_step  # noqa: E402
from bookgpt.training import TrainConfig  # noqa: E402
from model import GPT, apply_rope, rope_tables  # noqa: E402


def timed(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def fwd_bwd(f, *inputs: torch.Tensor):
    """A function that runs f on fresh leaves of `inputs` and back-propagates a ones gradient."""
    def run() -> None:
        leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        with ctx:
            y = f(*leaves)
        y.backward(torch.ones_like(y))
    return run


cfg = parse_config(TrainConfig, sys.argv[1:] or ["config/wp_bpe_cpu.toml"])
cfg.vocab_size = cfg.vocab_size or 2048
dtype = resolve_dtype(cfg.dtype, "cpu")
ctx = autocast("cpu", dtype)
half = torch.bfloat16 if dtype == "bfloat16" else torch.float32
B, T, C, nh, L, V = cfg.batch_size, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size
hd, p = C // nh, cfg.dropout
torch.manual_seed(0)
model = GPT(GPTConfig.from_dict(vars(cfg)))
block = model.blocks[0]
x32 = torch.randn(B, T, C)  # the residual stream
xh = torch.randn(B, T, C, dtype=half)  # a branch's output
q = torch.randn(B, T, 3, nh, hd, dtype=half).permute(2, 0, 3, 1, 4)[0]  # a head view of c_attn's output
q32 = torch.randn(B, nh, T, hd)
cos, sin = rope_tables(hd, T, cfg.rope_base)
hidden = block.mlp.c_fc.out_features
parts = [  # (part, calls per step, milliseconds per call)
    ("linear c_attn", L, timed(fwd_bwd(block.attn.c_attn, x32))),
    ("linear attn c_proj", L, timed(fwd_bwd(block.attn.c_proj, xh))),
    ("linear c_fc", L, timed(fwd_bwd(block.mlp.c_fc, x32))),
    ("linear mlp c_proj", L, timed(fwd_bwd(block.mlp.c_proj, torch.randn(B, T, hidden, dtype=half)))),
    ("linear lm_head (tied)", 1, timed(fwd_bwd(model.lm_head, x32))),
    ("attention softmax(QK^T)V + its dropout", L,
     timed(fwd_bwd(lambda a, b, c: kernels.explicit_causal_attention(a, b, c, p), q, q, q))),
    ("RMSNorm of the residual stream", 2 * L + 1, timed(fwd_bwd(block.ln_1, x32))),
    ("QK-norm (bf16 heads, float32 gain)", 2 * L, timed(fwd_bwd(block.attn.q_norm, q))),
    ("RoPE (q and k, float32)", 2 * L, timed(fwd_bwd(lambda a: apply_rope(a, cos, sin), q32))),
    ("q, k cast to the values' dtype", 2 * L, timed(fwd_bwd(lambda a: a.to(half), q32))),
    ("ReLU^2", L, timed(fwd_bwd(lambda h: F.relu(h).square(), torch.randn(B, T, hidden, dtype=half)))),
    ("dropout of a branch (bf16)", 2 * L, timed(fwd_bwd(lambda a: kernels.dropout(a, p), xh))),
    ("dropout of the embeddings (float32)", 1, timed(fwd_bwd(lambda a: kernels.dropout(a, p), x32))),
    ("residual add (float32 + bf16)", 2 * L, timed(fwd_bwd(lambda a, b: a + b, x32, xh))),
    ("head transpose to (B, T, C)", L, timed(fwd_bwd(lambda a: a.transpose(1, 2).contiguous().view(B, T, C), q))),
    ("cross-entropy of float32 logits", 1,
     timed(fwd_bwd(lambda z: F.cross_entropy(z.float().flatten(0, 1), torch.randint(V, (B * T,))),
                   torch.randn(B, T, V, dtype=half)))),
]
if cfg.value_embeds:
    parts.append(("value embedding added to v", 2 * cfg.value_embeds,
                  timed(fwd_bwd(lambda v, e: v + e.view(B, T, nh, hd).transpose(1, 2).to(v.dtype), q, x32))))
if cfg.unet_skips:
    w = torch.ones(())
    parts.append(("U-net skip (w * skip + x)", L // 2, timed(fwd_bwd(lambda a, b, s: a + s * b, x32, x32, w))))

# the optimizers' step on the model's own parameters, with gradients in place
params = [q for q in model.parameters() if q.requires_grad]
for q_ in params:
    q_.grad = torch.randn_like(q_) * 1e-3
optimizers = make_optimizers(model, cfg, "cpu")
scaler = torch.amp.GradScaler("cpu", enabled=False)
for o in optimizers:
    parts.append((f"{type(o).__name__} step", 1, timed(o.step, reps=5, warmup=2)))
parts.append(("gradient clipping (global norm)", 1,
              timed(lambda: torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip), reps=5, warmup=2)))

x = torch.randint(V, (B, T))
model.train()


def whole_step() -> None:
    with ctx:
        _, loss = model(x, x)
    loss.backward()
    optimizer_step(optimizers, scaler, params, cfg.grad_clip)


step = timed(whole_step, reps=5, warmup=2)
total = sum(n * ms for _, n, ms in parts)
print(f"{torch.get_num_threads()} threads, {dtype}, batch {B} x {T}, {L} x {C}, dropout {p}: one step {step:,.0f} ms "
      f"(model.forward + backward + optimizer_step, median of 5)\n")
print(f"| part | calls a step | ms a call | ms a step | share of the step |\n|---|---:|---:|---:|---:|")
for name, n, ms in sorted(parts, key=lambda r: -r[1] * r[2]):
    print(f"| {name} | {n} | {ms:.2f} | {n * ms:.0f} | {100 * n * ms / step:.1f}% |")
print(f"| **sum of the parts** | | | **{total:.0f}** | {100 * total / step:.1f}% |")
