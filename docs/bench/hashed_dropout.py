"""Dropout masks hashed from each element's index inside the compiled loops (a counter-based generator), against
the bits kernels.keep_mask draws: tried for the CPU training step and not kept (docs/benchmarks.md, "What made it
faster" 8).

    python docs/bench/hashed_dropout.py micro                  # attention's softmax + dropout, compiled, forward
                                                               # and backward, at the preset's four query bands
    python docs/bench/hashed_dropout.py step [bench.py args]   # bench.py with every CPU dropout hashed; alternate
                                                               # it with `python bench.py [the same args]`
Run from the repository root.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bookgpt import kernels  # noqa: E402


@torch.library.custom_op("bench::draw_seed", mutates_args=())
def draw_seed(x: torch.Tensor) -> torch.Tensor:
    """One int32 from the global generator, where eager would draw it (after x), once for forward and backward."""
    return torch.randint(-2 ** 31, 2 ** 31, (), dtype=torch.int32)


@draw_seed.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=torch.int32)


def hashed_keep_mask(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """True with probability 1 - p: MurmurHash3's finaliser of (index * golden ratio + seed), int32 arithmetic that
    wraps; elementwise integer work Inductor vectorises into the loop that uses the mask."""
    h = torch.arange(x.numel(), dtype=torch.int32).view(x.shape) * -0x61C88647 + seed  # 0x9E3779B9 as an int32
    h = (h ^ ((h >> 16) & 0xFFFF)) * -0x7A143595  # 0x85EBCA6B
    h = (h ^ ((h >> 13) & 0x7FFFF)) * -0x3D4D51CB  # 0xC2B2AE35
    h = h ^ ((h >> 16) & 0xFFFF)
    return (h & 0xFFFFFF) >= round(p * (1 << 24))


def hashed_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    if not 0 < p < 1 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    keep = hashed_keep_mask(x, p, draw_seed(x.detach()))
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def micro() -> None:
    bands = [torch.randn(128, 64, end, dtype=torch.bfloat16, requires_grad=True) for end in (64, 128, 192, 256)]
    runs = {"drawn (keep_mask)": torch.compile(lambda a: kernels.dropout(a.softmax(-1), 0.2)),
            "hashed": torch.compile(lambda a: hashed_dropout(a.softmax(-1), 0.2))}

    def once(f) -> float:
        t = time.perf_counter()
        for a in bands:
            f(a).sum().backward()
        return time.perf_counter() - t

    times = {name: [] for name in runs}
    for rep in range(8):  # interleaved; the first round compiles
        for name, f in runs.items():
            dt = once(f)
            if rep:
                times[name].append(dt)
    for name, ts in times.items():
        print(f"{name:18s} {statistics.median(ts) * 1e3:7.1f} ms (median of {len(ts)}) for the four bands")
    x = torch.ones(128, 64, 256, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(lambda a: hashed_dropout(a, 0.2))
    torch.manual_seed(3)
    y = compiled(x)
    torch.manual_seed(3)
    eager = hashed_keep_mask(x, 0.2, draw_seed(x))
    print(f"hashed: kept {(y != 0).float().mean().item():.4f} (1 - p = 0.8); compiled mask == eager mask: "
          f"{torch.equal(y != 0, eager)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["micro"]:
        micro()
    elif sys.argv[1:2] == ["step"]:
        kernels.dropout = hashed_dropout  # every Dropout module and the attention's probabilities call it
        import bench
        sys.argv = ["bench.py"] + sys.argv[2:]
        bench.main(sys.argv[1:])
    else:
        print(__doc__)
        raise SystemExit(2)
