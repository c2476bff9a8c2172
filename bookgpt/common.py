"""What every stage shares: about the machine, the device, the precision, autocast, waiting for
queued GPU work, the device's random state and torch.compile with a fallback; and bits per byte and
the one reader of a run's metrics.jsonl.

Read torch's sources before trusting a GPU path you cannot run: each helper here says which
behaviour of torch it works around, so the scripts above it need not know.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bookgpt.config import UserError

# ----------------------------------------------------------------------------- device and precision

def resolve_device(name: str = "auto") -> str:
    """auto picks cuda, then mps, then cpu. cuda:N is checked against the GPUs visible here and
    made the current device: torch's per-device defaults (new tensors on "cuda", the RNG that
    dropout draws from, is_bf16_supported, NCCL's object collectives) follow the current device,
    not the one a tensor was moved to."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
        index = name.partition(":")[2]
        if index:
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise UserError(f"device={name} but this machine has {torch.cuda.device_count()} GPU(s), "
                                  f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of them or device=cuda")
            torch.cuda.set_device(int(index))
        elif name != "cuda":
            raise UserError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
        return name
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but MPS is not available here; use device=cpu or device=auto")
    if name not in ("cpu", "mps"):
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
    return name


def native_bf16(device: str) -> bool:
    """Whether the hardware does bf16 arithmetic itself. torch.cuda.is_bf16_supported() says yes
    on a T4 (sm75) because bf16 *tensors* work there, emulated: no tensor cores, no flash
    attention, and Inductor refuses to compile it. Only sm80+ (Ampere on) counts here."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX-512-BF16 or AMX
    return False


def resolve_dtype(name: str, device: str) -> str:
    """auto: bf16 where the hardware does it natively (Ampere+ GPUs, AVX-512-BF16/AMX CPUs), fp16
    on older GPUs such as the T4 (train.py adds a GradScaler), float32 on Apple's MPS and on CPUs
    without bf16 units. An explicit bfloat16 on a GPU that only emulates it is refused."""
    if name == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if native_bf16(device) else "float16"
        return "bfloat16" if native_bf16(device) else "float32"
    if name == "bfloat16" and device.startswith("cuda") and not native_bf16(device):
        raise UserError(f"dtype=bfloat16 is only emulated on this GPU ({torch.cuda.get_device_name()}); "
                          f"use dtype=float16 or dtype=auto")
    return name


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: weights stay float32, matmuls run in dtype."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def sync(device: str | torch.device) -> None:
    """Wait until the work queued on `device` is done, so a timer measures the work, not its launch.
    torch.cuda.synchronize() without an argument waits for the *current* device only."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Kernels that give the same bits every run, for the duration. On a GPU two runs of one seed otherwise
    drift from the first step: flash attention's backward and Inductor's scatter-add (an embedding's
    backward) accumulate with atomics, in whatever order the threads arrive, unless
    torch.use_deterministic_algorithms(True) (not warn_only, which keeps flash attention's fast order);
    cuBLAS needs a fixed workspace for it, read when its first handle is made; and Inductor's deterministic
    mode stops it timing alternative kernels, which could choose differently in two processes."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch._inductor.config as inductor_config
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with inductor_config.patch(deterministic=True) if hasattr(inductor_config, "deterministic") \
                else contextlib.nullcontext():  # Inductor's switch: torch 2.9 and later
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ----------------------------------------------------------------------------- random state

def device_rng_state(device: str) -> torch.Tensor | None:
    """The state of the generator that dropout on `device` draws from (None on a CPU, whose
    generator is torch.get_rng_state()). Only this device's: a process on cuda:1 saving every
    visible GPU's state could not restore it on a machine with one GPU."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_rng_state(device)
    if kind == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_rng_state(saved: torch.Tensor | list[torch.Tensor] | None, device: str) -> bool:
    """Restore what device_rng_state saved; returns False when there is nothing to restore for
    this device. Checkpoints from before this function saved a list of every visible GPU's
    state: this device's entry is taken when the list has one."""
    kind = torch.device(device).type
    if kind not in ("cuda", "mps") or saved is None:
        return False
    if isinstance(saved, (list, tuple)):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        if index >= len(saved):
            return False
        saved = saved[index]
    if kind == "cuda":
        torch.cuda.set_rng_state(saved.cpu(), device)
    else:
        torch.mps.set_rng_state(saved.cpu())
    return True


# ----------------------------------------------------------------------------- compile

class CompiledWithFallback(torch.nn.Module):
    """torch.compile(module), falling back to the eager module when the compiler fails.

    torch.compile is lazy: wrapping the model never fails; a compiler that cannot work here (no C++
    toolchain, an op it cannot lower, a GPU Triton does not support) raises at the first forward,
    and the backward graph is compiled at the first backward unless torch is told otherwise. So
    this module compiles the backward together with the forward, and on the first calls in each
    mode (training and evaluation compile separate graphs) catches what the compiled call raises,
    prints one warning and runs `module` eagerly from then on. An error that eager mode raises too
    (a real bug, out of memory) still surfaces, from the eager call. Once a mode has run compiled,
    nothing is caught."""

    def __init__(self, module: torch.nn.Module, warn: Callable[[str], Any] = print) -> None:
        super().__init__()
        self.module = module  # registered: state_dict, .train() and .to() reach the real parameters
        self._compiled = [torch.compile(module)]  # in a list, so it is not registered a second time
        self.proven: set[tuple[bool, bool]] = set()
        self.error = ""
        self.warn = warn

    @property
    def compiled(self) -> bool:
        return bool(self._compiled)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._compiled:
            return self.module(*args, **kwargs)
        mode = (self.training, torch.is_grad_enabled())
        if mode in self.proven:
            return self._compiled[0](*args, **kwargs)
        try:
            with _backward_compiled_with_forward():
                out = self._compiled[0](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - anything the compiler raises; eager re-raises real errors
            while getattr(e, "inner_exception", None) or e.__cause__:  # dynamo wraps the backend's own error
                e = getattr(e, "inner_exception", None) or e.__cause__
            self.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            self.warn(f"warning: torch.compile failed ({self.error}); continuing in eager mode")
            self._compiled.clear()
            return self.module(*args, **kwargs)
        self.proven.add(mode)
        return out


def _backward_compiled_with_forward() -> contextlib.AbstractContextManager:
    """AOTAutograd lowers the backward graph at the first backward by default, where a failure would
    escape CompiledWithFallback; this switch (present in torch 2.5+) lowers it with the forward."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is None or not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


# ----------------------------------------------------------------------------- units and run files

def bits_per_byte(loss_nats: float, split: dict[str, int]) -> float:
    """Mean nats per token -> bits per UTF-8 byte of the text those tokens encode."""
    return loss_nats / math.log(2) * split["tokens"] / split["bytes"]


def likelihood_figures(total_nats: float, n_tokens: int, n_bytes: int, n_chars: int) -> dict[str, float]:
    """Everything users quote, from one total: per token, per byte (the headline) and per character."""
    loss = total_nats / n_tokens
    exp = lambda x: math.exp(x) if x < 700 else math.inf  # noqa: E731  (a diverged dynamic evaluation)
    return {"bpb": bits_per_byte(loss, {"tokens": n_tokens, "bytes": n_bytes}), "loss": loss, "ppl": exp(loss),
            "bits_per_token": loss / math.log(2), "bpc": bits_per_byte(loss, {"tokens": n_tokens, "bytes": n_chars}),
            "ppl_char": exp(total_nats / n_chars),
            "tokens": n_tokens, "bytes": n_bytes, "chars": n_chars}


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """A run's metrics.jsonl (train.py writes it): its records in file order, each a JSON object
    with a "kind" ("train", "eval", "teacher", "summary") and an integer "iter", and how many lines
    were skipped: a kill or a full disk in the middle of an append leaves a partial last line. A
    missing file has no records."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            skipped += bool(line.strip())
            continue
        if isinstance(r, dict) and isinstance(r.get("kind"), str) and isinstance(r.get("iter"), int):
            records.append(r)
        else:
            skipped += 1
    return records, skipped


def records_of(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of one kind, by step."""
    return sorted((r for r in records if r["kind"] == kind), key=lambda r: r["iter"])
