"""Train a GPT on a prepared book, on one device or many (torchrun + DDP).

    python train.py config/wp_char_cpu.toml --max_iters=2000
    torchrun --standalone --nproc_per_node=2 train.py config/wp_char_2x4090.toml

Writes out_dir/{config.json, meta.json, metrics.jsonl, best.pt, ckpt.pt}. best.pt is the
lowest-val checkpoint, ckpt.pt the latest; `--init_from=resume` continues from ckpt.pt
exactly (weights, optimizer, RNG streams, step). SIGINT/SIGTERM finish the step, save, exit 0.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint, save_checkpoint
from config import UserError, atomic_write_bytes, atomic_write_json, cli, config_dict, opt, parse_config
from model import GPT, GPTConfig
from tokenizer import read_meta


@dataclass
class TrainConfig:
    # where things are
    out_dir: str = opt("out/run", "run directory for checkpoints, metrics and config")
    data_dir: str = opt("data/war_and_peace_char", "folder written by prepare.py")
    init_from: str = opt("scratch", "scratch or resume (from out_dir/ckpt.pt)")
    # model (see model.GPTConfig)
    block_size: int = opt(256, "context length in tokens")
    n_layer: int = opt(6, "transformer blocks")
    n_head: int = opt(6, "attention heads")
    n_embd: int = opt(384, "embedding width")
    dropout: float = opt(0.2, "dropout probability (attention, residual, embedding)")
    bias: bool = opt(False, "biases in Linear layers and norms")
    pos_emb: str = opt("learned", "learned or rope")
    norm: str = opt("layernorm", "layernorm or rmsnorm")
    qk_norm: bool = opt(False, "normalise queries and keys")
    mlp: str = opt("gelu", "gelu, relu2 or swiglu")
    mlp_ratio: float = opt(4.0, "MLP hidden width / n_embd")
    tie_weights: bool = opt(True, "tie output head to token embedding")
    logit_softcap: float = opt(0.0, "cap * tanh(logits / cap) when > 0")
    # batches
    batch_size: int = opt(32, "sequences per micro-batch per process")
    gradient_accumulation_steps: int = opt(1, "micro-batches per step, summed over all processes")
    # optimiser
    optimizer: str = opt("adamw", "adamw, or muon (Muon for hidden matrices, AdamW for the rest)")
    learning_rate: float = opt(1e-3, "peak AdamW learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    muon_lr: float = opt(0.02, "Muon learning rate (optimizer=muon)")
    muon_momentum: float = opt(0.95, "Muon momentum")
    muon_weight_decay: float = opt(0.0, "decoupled weight decay on Muon's matrices (weight_decay is AdamW's)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    # distillation: learn from trained runs' predictions as well as from the text
    distill_from: str = opt("", "teacher runs (out_dirs, comma-separated; their best.pt), '' = off")
    distill_weight: float = opt(0.5, "share of the loss that is cross-entropy against the teachers' mean distribution")
    # schedule and budget
    lr_schedule: str = opt("cosine", "cosine (warmup, cosine decay) or wsd (warmup, stable, linear decay)")
    warmup_iters: int = opt(100, "linear warmup steps")
    lr_decay_iters: int = opt(0, "steps until min_lr (0 = max_iters)")
    decay_frac: float = opt(0.2, "wsd: share of the run spent decaying")
    max_iters: int = opt(5000, "stop after this many steps")
    max_minutes: float = opt(0.0, "stop after this much training time; the LR schedule follows it too (0 = off)")
    early_stop_patience: int = opt(0, "stop when val has not improved for this many evals (0 = off)")
    # evaluation and logging
    eval_interval: int = opt(250, "evaluate every N steps")
    eval_iters: int = opt(20, "batches per split per evaluation")
    log_interval: int = opt(10, "log train loss every N steps")
    wandb_log: bool = opt(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = opt("bookgpt", "wandb project")
    wandb_run_name: str = opt("", "wandb run name (default: out_dir's name)")
    wandb_group: str = opt("", "wandb group (sweeps set it)")
    # system
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16")
    compile: bool = opt(False, "torch.compile the model (falls back to eager if it fails)")
    seed: int = opt(1337, "seed for weights, batches and dropout")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")


CHOICES = {"init_from": ("scratch", "resume"), "optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd"),
           "dtype": ("auto", "float32", "bfloat16", "float16"), "pos_emb": ("learned", "rope"),
           "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2", "swiglu")}


def validate(cfg: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"bad value for '{key}': {getattr(cfg, key)!r}; use one of {', '.join(allowed)}")
    positive = ("block_size", "n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps",
                "eval_interval", "eval_iters", "log_interval", "max_iters")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise UserError(f"'{key}' must be positive, got {getattr(cfg, key)}")
    for key in ("max_minutes", "warmup_iters", "lr_decay_iters", "early_stop_patience"):
        if getattr(cfg, key) < 0:
            raise UserError(f"'{key}' must be 0 or more, got {getattr(cfg, key)}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 <= cfg.distill_weight <= 1.0:
        raise UserError(f"distill_weight must be in [0, 1], got {cfg.distill_weight}")


# ----------------------------------------------------------------------------- device and precision

def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but MPS is not available here; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
    return name


def resolve_dtype(name: str, device: str) -> str:
    """auto: bf16 where the hardware does it fast (Ampere+ GPUs, AVX-512-BF16/AMX CPUs), fp16 on older
    GPUs (with a GradScaler), float32 on Apple's MPS and on CPUs without bf16 units."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16"
    return "float32"


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: weights stay float32, matmuls run in dtype."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------- data

class Batches:
    """Random (x, y) windows from a split's token file.

    The memmap is opened per batch (a long-lived one grows resident memory, a nanoGPT
    complaint), and offsets come from a torch.Generator so the stream can be saved and
    resumed exactly. Each rank seeds its own generator, so ranks draw different batches."""

    def __init__(self, data_dir: Path, split: str, dtype: str, block_size: int, batch_size: int, device: str) -> None:
        self.path = data_dir / f"{split}.bin"
        self.dtype, self.block_size, self.batch_size, self.device = np.dtype(dtype), block_size, batch_size, device
        self.n_tokens = self.path.stat().st_size // self.dtype.itemsize
        if self.n_tokens <= block_size:
            raise UserError(f"{self.path} has {self.n_tokens} tokens, not more than block_size={block_size}; "
                            f"use a smaller block_size or a bigger split")

    def get(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        starts = torch.randint(self.n_tokens - self.block_size, (self.batch_size,), generator=gen).tolist()
        rows = np.stack([data[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        del data
        xy = torch.from_numpy(rows)
        if self.device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[:, :-1], xy[:, 1:]


def read_data_meta(data_dir: Path) -> dict[str, Any]:
    """meta.json of a prepared folder (tokenizer.read_meta checks it), and the bins training needs."""
    meta = read_meta(data_dir)
    for split in ("train", "val"):
        if not (data_dir / f"{split}.bin").is_file():
            raise UserError(f"{data_dir / (split + '.bin')} is missing; run prepare.py again")
    return meta


def bits_per_byte(loss_nats: float, split: dict[str, int]) -> float:
    """Mean nats per token -> bits per UTF-8 byte of the text those tokens encode."""
    return loss_nats / math.log(2) * split["tokens"] / split["bytes"]


# ----------------------------------------------------------------------------- distillation

class Teacher(torch.nn.Module):
    """Trained runs whose mean next-token distribution a student learns from (distill_from).

    On a small book a model overfits long before it runs out of compute; another model's full
    distribution over the next token says more per position than the one token the text has
    (and an average of several models is better than any of them). forward returns the log of
    the mean probabilities as logits, and their cross-entropy with targets, as GPT.forward does,
    so estimate_loss scores the teacher too."""

    def __init__(self, runs: list[str], meta: dict[str, Any], block_size: int, device: str) -> None:
        super().__init__()
        models = []
        for run in runs:
            path = checkpoint_path(run, "best")
            ckpt = load_checkpoint(path, device)
            if ckpt["meta"].get("sha256_clean") != meta.get("sha256_clean") or ckpt["meta"]["vocab_size"] != meta["vocab_size"]:
                raise UserError(f"cannot distil from {path}: it was trained on other data (vocab "
                                f"{ckpt['meta']['vocab_size']} vs {meta['vocab_size']}); teachers need the student's data_dir")
            if ckpt["model_config"]["block_size"] < block_size:
                raise UserError(f"cannot distil from {path}: its block_size {ckpt['model_config']['block_size']} is "
                                f"shorter than the student's {block_size}; use a teacher with at least that context")
            models.append(model_from_checkpoint(ckpt, path).to(device).eval().requires_grad_(False))
        self.models = torch.nn.ModuleList(models)

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


# ----------------------------------------------------------------------------- optimisation

def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G (the U V^T of its SVD) with a quintic Newton-Schulz
    iteration whose coefficients push singular values towards 1 fast (modded-nanogpt's Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update for each 2D weight is orthogonalised (Newton-Schulz).
    Only for hidden matrices; embeddings, the head and gains stay with AdamW."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def __setstate__(self, state: dict) -> None:  # load_state_dict goes through here
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before weight decay existed had none
            group.setdefault("weight_decay", 0.0)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz5(g)
                if group["weight_decay"]:  # decoupled, as AdamW's: shrink, then step
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def make_optimizers(model: GPT, cfg: TrainConfig, device: str) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices only (not gains, biases); with optimizer=muon the
    hidden matrices (not embeddings or head) go to Muon instead."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    embed = {id(model.wte.weight), id(model.lm_head.weight)} | ({id(model.wpe.weight)} if model.wpe is not None else set())
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
                         weight_decay=cfg.muon_weight_decay)]


def lr_factor(cfg: TrainConfig, it: int, progress: float) -> float:
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


# ----------------------------------------------------------------------------- the run

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    # a rank that dies makes the others fail at the next collective after this timeout, not hang
    timeout = float(os.environ.get("BOOKGPT_DIST_TIMEOUT", "300"))
    import datetime
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return d


def all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world
    return x


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second signal
    while saving changes nothing: the save is atomic and finishes."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            print(f"\n{signal.Signals(signum).name}: finishing this step, saving ckpt.pt, then exiting", flush=True)
        self.requested = True


class Metrics:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint's step are
    dropped, so the file always describes the run that the checkpoint continues."""

    def __init__(self, path: Path, resume_iter: int | None) -> None:
        self.path = path
        if resume_iter is None:
            atomic_write_bytes(path, b"")
        elif path.exists():
            records, bad = [], 0
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:  # a crash (or a full disk) in the middle of an append leaves a partial last line
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
            if bad:
                print(f"warning: dropped {bad} unreadable line(s) from {path}", file=sys.stderr)
            keep = [json.dumps(r) for r in records if isinstance(r, dict) and isinstance(r.get("iter"), int)
                    and r["iter"] <= resume_iter and r.get("kind") != "summary"]
            atomic_write_bytes(path, "".join(l + "\n" for l in keep).encode())

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir}: {e.strerror or e}; choose another --out_dir") from None


RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "config.json", "meta.json")


def remove_stale_temps(out_dir: Path) -> None:
    """A kill -9 during an atomic write leaves its temp file (.ckpt.pt.XXXX.tmp, see config.atomic_open)
    beside the intact old file; drop such leftovers of this run's own files (only those: another
    tool may be writing its own files in out_dir right now)."""
    for name in RUN_FILES:
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def check_compatible(ckpt: dict[str, Any], model_cfg: GPTConfig, meta: dict[str, Any], path: Path,
                     optimizer: str = "adamw") -> None:
    # the data first: another data_dir also changes vocab_size, and "pass the run's --data_dir" is the fix
    if ckpt["meta"].get("sha256_clean") != meta.get("sha256_clean") or ckpt["meta"]["vocab_size"] != meta["vocab_size"]:
        raise UserError(f"cannot resume from {path}: it was trained on other data than {meta.get('source', 'data_dir')} "
                        f"(vocab {ckpt['meta']['vocab_size']} vs {meta['vocab_size']}); pass the run's --data_dir")
    saved = ckpt["model_config"]
    diff = [k for k, v in asdict(model_cfg).items() if saved.get(k) != v]
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(model_cfg, k)!r}" for k in diff)
        raise UserError(f"cannot resume from {path}: the model differs ({pairs}); use the run's config "
                        f"(out_dir/config.json) or a new out_dir")
    was = ckpt.get("config", {}).get("optimizer", "adamw")
    if was != optimizer:
        raise UserError(f"cannot resume from {path}: it was trained with optimizer={was}, not {optimizer}; "
                        f"pass --optimizer={was} or start a new out_dir")


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: dict[str, Batches], cfg: TrainConfig, d: Dist,
                  ctx: contextlib.AbstractContextManager) -> dict[str, float]:
    """Mean loss over eval_iters batches per split, the same batches at every eval (a fixed
    seed per rank) so successive evals are comparable; averaged over ranks."""
    model.eval()
    out = {}
    for split, b in batches.items():
        gen = torch.Generator().manual_seed(10_000 + 7919 * d.rank + (split == "val"))
        losses = torch.zeros(cfg.eval_iters, device=b.device)
        for k in range(cfg.eval_iters):
            x, y = b.get(gen)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss
        out[split] = all_mean(losses.mean(), d).item()
    model.train()
    return out


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "batches": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    gen.set_state(state["batches"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary (also the last line of metrics.jsonl)."""
    validate(cfg)
    device = resolve_device(cfg.device)
    d = setup_distributed(device)
    if d.world > 1 and device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
    lost = False
    try:
        with StopFlag() as stop:
            summary = _train(cfg, device, d, stop)
        if d.world > 1:  # all ranks finish together: a rank tearing gloo down while rank 0 still saves can abort
            dist.barrier()
        return summary
    except RuntimeError as e:  # gloo and NCCL report a dead or hung peer as a RuntimeError
        lost = d.world > 1 and (isinstance(e, dist.DistError) or any(
            s in str(e) for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out")))
        if not lost:
            raise
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]).split(". ")[0][:200]  # drop gloo's source path
        raise UserError(f"lost contact with another process of this job (rank {d.rank}: {first}); torchrun's "
                        f"report names the process that failed first; fix it, then --init_from=resume") from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        raise UserError(f"cannot write to {cfg.out_dir}: {e.strerror}; its checkpoints are the last good ones "
                        f"(free some space, or choose another --out_dir, then --init_from=resume)") from None
    finally:
        if d.world > 1 and dist.is_initialized() and not lost:  # with a peer gone, teardown could hang
            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: str, d: Dist, stop: StopFlag) -> dict[str, Any]:
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UserError("dtype=bfloat16 is not supported by this GPU; use dtype=float16 or auto")
    if cfg.gradient_accumulation_steps % d.world:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be divisible by the "
                        f"number of processes ({d.world})")
    accum = cfg.gradient_accumulation_steps // d.world
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir, data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
    meta = read_data_meta(data_dir)
    batches = {s: Batches(data_dir, s, meta["dtype"], cfg.block_size, cfg.batch_size, device) for s in ("train", "val")}
    runs = [r.strip() for r in cfg.distill_from.split(",") if r.strip()]
    teacher = Teacher(runs, meta, cfg.block_size, device) if runs else None
    if d.master:  # after the data checks, so a bad --data_dir or block_size leaves no empty out_dir behind
        check_writable(out_dir)
        remove_stale_temps(out_dir)
    model_cfg = GPTConfig.from_dict({**config_dict(cfg), "vocab_size": meta["vocab_size"]})

    # ------------------------------------------------------------------ model, optimisers, state
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(device)
    optimizers = make_optimizers(model, cfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "float16"))
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * d.rank)  # this rank's batch stream
    torch.manual_seed(cfg.seed + 1000 * d.rank + 1)  # this rank's dropout stream
    state = {"iter_num": 0, "best_val_loss": float("inf"), "best_iter": -1, "evals_since_best": 0,
             "tokens_seen": 0, "train_seconds": 0.0}
    resume_path = checkpoint_path(out_dir, "latest")
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(resume_path, device)
        check_compatible(ckpt, model_cfg, meta, resume_path, cfg.optimizer)
        model.load_state_dict(ckpt["model"])
        for opt_, sd in zip(optimizers, ckpt["optimizer"]):
            opt_.load_state_dict(sd)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state.update({k: ckpt[k] for k in state})
        rng = ckpt["rng"][d.rank] if d.rank < len(ckpt["rng"]) else None
        if rng is not None:
            set_rng_state(rng, gen)
        del ckpt

    n_params = model.num_params()
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    raw_model = model
    if cfg.compile:
        try:
            model = torch.compile(model)
        except Exception as e:  # e.g. no compiler toolchain: eager still works
            print(f"warning: torch.compile failed ({type(e).__name__}: {e}); continuing in eager mode")
    if d.world > 1:
        model = DDP(model, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    ctx = autocast(device, dtype)

    # ------------------------------------------------------------------ files and logging
    metrics = Metrics(out_dir / "metrics.jsonl", state["iter_num"] if cfg.init_from == "resume" else None) if d.master else None
    if d.master:
        atomic_write_json(out_dir / "config.json", config_dict(cfg))
        atomic_write_json(out_dir / "meta.json", meta)
        ranks = meta["tokenizer"].get("ranks_file")  # a BPE tokenizer's merges travel with the run
        if ranks:
            atomic_write_bytes(out_dir / ranks, (data_dir / ranks).read_bytes())
        print(json.dumps(config_dict(cfg), indent=1))
        print(f"device {device} ({dtype}), {d.world} process(es), {n_params / 1e6:.2f}M parameters, "
              f"{tokens_per_iter:,} tokens per step, {meta['splits']['train']['tokens']:,} train tokens")
    if teacher is not None and state["iter_num"] == 0:  # the teacher's quality, on the batches the student's evals use
        losses = estimate_loss(teacher, batches, cfg, d, ctx)
        record = {"kind": "teacher", "iter": 0, "runs": runs, "train_loss": losses["train"], "val_loss": losses["val"],
                  "val_bpb": bits_per_byte(losses["val"], meta["splits"]["val"])}
        if d.master:
            metrics.write(record)
            print(f"teacher ({len(runs)} run(s)): train {losses['train']:.4f}, val {losses['val']:.4f} "
                  f"({record['val_bpb']:.3f} bpb); distill_weight {cfg.distill_weight}")
    wandb_run = None
    if cfg.wandb_log and d.master:
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=true but wandb is not installed: pip install wandb") from None
        wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or out_dir.name,
                               group=cfg.wandb_group or None, config=config_dict(cfg), resume="allow")

    def save(which: str) -> None:
        rngs = [rng_state(gen)]
        if d.world > 1:  # every rank's streams, so a resume continues each of them
            gathered = [None] * d.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not d.master:
            return
        save_checkpoint(checkpoint_path(out_dir, which), raw_model,
                        optimizer=[o.state_dict() for o in optimizers],
                        scaler=scaler.state_dict() if scaler.is_enabled() else None,
                        config=config_dict(cfg), meta=meta, rng=rngs, **state)

    def evaluate_and_save() -> None:
        losses = estimate_loss(model, batches, cfg, d, ctx)
        for split, value in losses.items():  # the last step's update broke the weights: do not save them
            if not math.isfinite(value):
                bar.close()
                raise UserError(f"eval loss on {split} became {value} at step {state['iter_num']}; the last good "
                                f"checkpoints in {out_dir} are kept. Try a lower learning_rate, grad_clip=1, "
                                f"or dtype=bfloat16/float32")
        improved = losses["val"] < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=losses["val"], best_iter=state["iter_num"], evals_since_best=0)
        else:
            state["evals_since_best"] += 1
        record = {"kind": "eval", "iter": state["iter_num"], "train_loss": losses["train"], "val_loss": losses["val"],
                  "val_bpb": bits_per_byte(losses["val"], meta["splits"]["val"]), "lr": lr_now,
                  "tokens_seen": state["tokens_seen"], "time_s": state["train_seconds"]}
        if d.master:
            metrics.write(record)
            bar.write(f"step {state['iter_num']}: train {losses['train']:.4f}, val {losses['val']:.4f} "
                      f"({record['val_bpb']:.3f} bpb){' *best*' if improved else ''}")
            if wandb_run:
                wandb_run.log({f"eval/{k}": v for k, v in record.items() if k != "kind"}, step=state["iter_num"])
        if improved:
            save("best")
        save("latest")

    # ------------------------------------------------------------------ the loop
    from tqdm import tqdm
    bar = tqdm(total=cfg.max_iters, initial=state["iter_num"], disable=not d.master, dynamic_ncols=True)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    lr_now = cfg.learning_rate * lr_factor(cfg, state["iter_num"], state["iter_num"] / decay_iters)
    reason = "max_iters"
    seconds_last, tokens_last = state["train_seconds"], state["tokens_seen"]
    if state["iter_num"] == 0:
        evaluate_and_save()
    while True:
        it = state["iter_num"]
        if it >= cfg.max_iters:
            break
        t0 = time.perf_counter()
        progress = it / decay_iters
        if cfg.max_minutes > 0:
            progress = max(progress, state["train_seconds"] / 60 / cfg.max_minutes)
        factor = lr_factor(cfg, it, progress)
        lr_now = cfg.learning_rate * factor
        for o in optimizers:
            base = cfg.learning_rate if isinstance(o, torch.optim.AdamW) else cfg.muon_lr
            for group in o.param_groups:
                group["lr"] = base * factor

        for micro in range(accum):
            # gradients are all-reduced once per step: only on the last micro-batch
            sync = micro == accum - 1 or d.world == 1
            # drawn here, not ahead, so a checkpoint's generator state is exactly where the next
            # step begins (on a GPU this still overlaps: kernels of the last backward are running)
            x, y = batches["train"].get(gen)
            with (contextlib.nullcontext() if sync else model.no_sync()), ctx:
                logits, loss = model(x, y)
                if teacher is not None:
                    loss = distill_loss(logits, loss, teacher.probs(x), cfg.distill_weight)
                loss = loss / accum
            scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            for o in optimizers:
                scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        for o in optimizers:
            scaler.step(o)
        scaler.update()
        for o in optimizers:
            o.zero_grad(set_to_none=True)

        loss_value = loss.item() * accum
        if not math.isfinite(loss_value):  # step it + 1, as metrics.jsonl counts; nothing is saved after this
            bar.close()
            raise UserError(f"loss became {loss_value} at step {it + 1}; the last good checkpoints in {out_dir} are "
                            f"kept. Try a lower learning_rate, grad_clip=1, or dtype=bfloat16/float32")
        state["iter_num"] = it + 1
        state["tokens_seen"] += tokens_per_iter
        state["train_seconds"] += time.perf_counter() - t0
        bar.update(1)
        if d.master and (it + 1) % cfg.log_interval == 0:
            tps = (state["tokens_seen"] - tokens_last) / max(state["train_seconds"] - seconds_last, 1e-9)
            seconds_last, tokens_last = state["train_seconds"], state["tokens_seen"]
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tps:,.0f}")
            record = {"kind": "train", "iter": it + 1, "loss": loss_value, "lr": lr_now,
                      "tokens_per_s": tps, "time_s": state["train_seconds"]}
            metrics.write(record)
            if wandb_run:
                wandb_run.log({f"train/{k}": v for k, v in record.items() if k != "kind"}, step=it + 1)

        # stop conditions, agreed on by all ranks
        flags = torch.tensor([float(stop.requested),
                              float(cfg.max_minutes > 0 and state["train_seconds"] >= cfg.max_minutes * 60)])
        if d.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            reason = "signal"
            if state["iter_num"] % cfg.eval_interval == 0:
                evaluate_and_save()  # a resume would not redo this step's eval: do it now (it saves too)
            else:
                save("latest")
            break
        last = state["iter_num"] >= cfg.max_iters or bool(flags[1])
        if state["iter_num"] % cfg.eval_interval == 0 or last:
            evaluate_and_save()
            if cfg.early_stop_patience and state["evals_since_best"] >= cfg.early_stop_patience:
                reason = "early_stop"
                break
        if flags[1]:
            reason = "max_minutes"
            break
    bar.close()
    summary = {"kind": "summary", "iter": state["iter_num"], "reason": reason, "best_val_loss": state["best_val_loss"],
               "best_val_bpb": bits_per_byte(state["best_val_loss"], meta["splits"]["val"]),
               "best_iter": state["best_iter"], "tokens_seen": state["tokens_seen"], "train_seconds": state["train_seconds"],
               "params": n_params}
    if d.master:
        metrics.write(summary)
        print(f"stopped ({reason}) at step {state['iter_num']}: best val {state['best_val_loss']:.4f} "
              f"({summary['best_val_bpb']:.3f} bpb) at step {state['best_iter']}; checkpoints in {out_dir}")
        if wandb_run:
            wandb_run.finish()
    return summary


def main(argv: list[str]) -> None:
    cfg = parse_config(TrainConfig, argv, prog="train.py", doc=__doc__.split("\n\n")[0])
    train(cfg)


if __name__ == "__main__":
    cli(main)
