"""Forward + backward of the CPU attention (bookgpt.kernels.explicit_causal_attention) with its queries in 1, 2, 4
and 8 bands, eager and compiled, at the preset's shape: bf16, dropout 0.2, medians of interleaved repetitions.

    python docs/bench/attention_bands.py [B nh T hd]     # from the repository root; default 32 4 256 64
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bookgpt.kernels import explicit_causal_attention  # noqa: E402

B, nh, T, hd = (int(a) for a in sys.argv[1:5]) if len(sys.argv) > 4 else (32, 4, 256, 64)
torch.manual_seed(0)
qkv = [torch.randn(B, nh, T, hd, dtype=torch.bfloat16) for _ in range(3)]
grad = torch.randn(B, nh, T, hd, dtype=torch.bfloat16)


def with_bands(n: int):
    return lambda q, k, v: explicit_causal_attention(q, k, v, 0.2, bands=n)


runs = {}
for n in (1, 2, 4, 8):
    runs[f"{n} band(s), eager"] = with_bands(n)
    runs[f"{n} band(s), compiled"] = torch.compile(with_bands(n))


def fwd_bwd(f) -> None:
    leaves = [t.detach().requires_grad_() for t in qkv]
    f(*leaves).backward(grad)


for f in runs.values():  # compile and warm up
    fwd_bwd(f)
    fwd_bwd(f)
times = {name: [] for name in runs}
for _ in range(7):  # interleaved: a change in machine load hits every variant alike
    for name, f in runs.items():
        t0 = time.perf_counter()
        fwd_bwd(f)
        times[name].append(time.perf_counter() - t0)
print(f"attention forward + backward, ({B}, {nh}, {T}, {hd}) bf16, dropout 0.2, {torch.get_num_threads()} threads:")
for name, t in times.items():
    print(f"  {name:22s} {statistics.median(t) * 1e3:7.1f} ms")
