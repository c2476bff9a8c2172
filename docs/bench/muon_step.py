"""Muon's step on wp_best_gpu's 32 hidden matrices: operations launched and time, one matrix at a time
(the Muon of an earlier revision, read with git show) against optim.Muon (matrices of one shape batched).

    python docs/bench/muon_step.py [REVISION]     # default d2abaa0, the last revision with the per-matrix Muon

An "op" is an aten operation that computes (views are left out); on a GPU each is at least one kernel
launch. Run from the repository root.
"""
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bookgpt import optim  # noqa: E402

VIEWS = {"expand", "view", "_unsafe_view", "transpose", "t", "unbind", "select", "alias", "detach", "permute", "slice"}
SHAPES = [(1536, 512), (512, 512), (2048, 512), (512, 2048)] * 8  # c_attn, attn c_proj, c_fc, mlp c_proj


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.split(".")[0] not in VIEWS
        return func(*args, **(kwargs or {}))


def old_muon(revision: str) -> type:
    source = subprocess.run(["git", "show", f"{revision}:train.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_train.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_train"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Muon


def measure(name: str, cls: type) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in SHAPES]
    opt = cls(params, lr=0.02)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # allocates the momentum buffers
    with Count() as c:
        opt.step()
    t0 = time.perf_counter()
    opt.step()
    print(f"{name}: {c.n:,} ops per step, {(time.perf_counter() - t0) * 1e3:,.0f} ms", flush=True)


if __name__ == "__main__":
    revision = sys.argv[1] if len(sys.argv) > 1 else "d2abaa0"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Newton-Schulz of optim.Muon in "
          f"{optim.newton_schulz_dtype(torch.device('cpu'))} on this CPU")
    measure(f"one matrix at a time ({revision})", old_muon(revision))
    measure("batched by shape (optim.Muon)", optim.Muon)
    if optim.newton_schulz_dtype(torch.device("cpu")) != torch.bfloat16:  # the precision's share, apart
        optim.newton_schulz_dtype = lambda device: torch.bfloat16
        measure("batched by shape, Newton-Schulz forced to bf16", optim.Muon)
