"""A training run's pieces that train.py's loop and the other scripts share: the run's config (TrainConfig: the
model's keys, the optimiser's, then the run's) and what a resume may change of it, where a run stands (RunState),
the metrics file, the loss estimate, the random streams that resume restores, one training step (train_step,
which bench.py times too), and the config a command line means (resume included).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from bookgpt.batches import Batches, Loader
from bookgpt.checkpoint import checkpoint_path, newest_run
from bookgpt.common import device_rng_state, read_metrics, set_device_rng_state
from bookgpt.config import (GPTConfig, UserError, apply_overrides, atomic_write_bytes, opt, parse_config, read_toml,
                            split_argv)
from bookgpt.distill import Teacher, distill_loss
from bookgpt.distributed import DDP, Dist
from bookgpt.optim import OptimConfig, optimizer_step


def recipe(key: str, default: Any) -> Any:  # a model key, with the recipe's default instead of GPTConfig's
    return opt(default, GPTConfig.__dataclass_fields__[key].metadata["help"])


@dataclass
class TrainConfig(OptimConfig, GPTConfig):
    """The model's keys (GPTConfig), the optimiser's (optim.OptimConfig), then the run's, in that order in --help (a
    dataclass takes its bases' fields last base first). The defaults are the recommended CPU recipe,
    config/wp_bpe_cpu.toml (which gives its reasons): `python train.py` trains it."""
    # the recipe's three architecture levers: off in GPTConfig, from which models of any depth are built
    value_embeds: int = recipe("value_embeds", 3)
    unet_skips: bool = recipe("unet_skips", True)
    zero_init: bool = recipe("zero_init", True)
    # where things are
    out_dir: str = opt("out/wp_bpe_cpu", "run directory for checkpoints, metrics and config")
    data_dir: str = opt("data/war_and_peace_bpe2048", "folder written by prepare.py")
    windows: str = opt("random", "how training draws its windows: random (each anywhere) or epoch (each pass over "
                                 "the text cut into whole windows from a random offset, shuffled)", ("epoch", "random"))
    train_split: str = opt("train", "the token file training steps draw windows from: train, or train_dropout (several "
                                    "random segmentations of train: prepare.py --bpe_dropout)", ("train", "train_dropout"))
    init_from: str = opt("scratch", "scratch or resume (from out_dir/ckpt.pt, with out_dir/config.json)",
                         ("scratch", "resume"))
    overwrite: bool = opt(False, "let a scratch run replace the checkpoints already in out_dir")
    # batches
    batch_size: int = opt(32, "sequences per micro-batch per process")
    gradient_accumulation_steps: int = opt(1, "micro-batches per step, summed over all processes")
    # a weight average; distillation: learn from trained runs' predictions as well as from the text
    ema_decay: float = opt(0.0, "keep an exponential moving average of the weights with this decay per step (e.g. "
                                "0.99); each eval scores it on val and saves it as ema.pt when it improves (0 = off)")
    distill_from: tuple[str, ...] = opt((), "teacher runs (out_dirs); none = off")
    distill_ckpt: str = opt("best", "each teacher's checkpoint: best (best.pt) or ema (ema.pt, its weight average)")
    distill_weight: float = opt(0.5, "share of the loss that is cross-entropy against the teachers' mean distribution")
    # budget
    max_iters: int = opt(600, "the budget: stop after this many steps (the LR schedule decays over them)")
    max_minutes: float = opt(0.0, "stop after this much training time; the LR schedule follows it too (0 = off)")
    early_stop_patience: int = opt(5, "stop when val has not improved for this many evals (0 = off)")
    target_val_bpb: float = opt(0.0, "stop at the first eval whose val bpb (training's estimate; with ema_decay, the "
                                     "weights' or their average's) is at or below this: a speedrun's finish line (0 = off)")
    # evaluation and logging
    eval_interval: int = opt(100, "evaluate every N steps")
    eval_iters: int = opt(20, "batches per split per evaluation")
    log_interval: int = opt(10, "log train loss every N steps")
    wandb_log: bool = opt(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = opt("bookgpt", "wandb project")
    wandb_run_name: str = opt("", "wandb run name (default: out_dir's name)")
    wandb_group: str = opt("", "wandb group (sweeps set it)")
    # system
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16", ("auto", "float32", "bfloat16", "float16"))
    compile: bool = opt(True, "torch.compile the model (falls back to eager if it fails); on a CPU too, where the "
                              "preset's steps run 1.2x faster (1.7x without dropout) after about a minute of compiling")
    deterministic: bool = opt(False, "deterministic kernels, so two runs of a seed give the same losses on a GPU "
                                     "too (a little slower; on a CPU they are the same anyway)")
    seed: int = opt(1337, "seed for weights, batches and dropout")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")

    def __post_init__(self) -> None:
        pass  # built key by key from files and flags: validate() checks the whole once it is complete


# What a resumed run's command line may change: budgets, intervals, logging, the device, and the keys
# that checkpoint.check_resumable compares with the checkpoint itself (the model, optimizer, data).
MAY_CHANGE_ON_RESUME = {"out_dir", "init_from", "data_dir", "optimizer", "max_iters", "max_minutes", "lr_decay_iters",
                        "eval_interval", "eval_iters", "log_interval", "early_stop_patience", "target_val_bpb", "wandb_log",
                        "wandb_project", "wandb_run_name", "wandb_group", "device", "dtype", "compile", "deterministic",
                        "threads", "overwrite", *(f.name for f in fields(GPTConfig))}


def validate(cfg: TrainConfig) -> None:
    try:
        GPTConfig.check(cfg)  # every key's choices, then the model's keys
    except ValueError as e:
        raise UserError(str(e)) from None
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval", "max_iters"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"'{key}' must be positive, got {getattr(cfg, key)}")
    for key in ("max_minutes", "warmup_iters", "lr_decay_iters", "early_stop_patience", "target_val_bpb"):
        if getattr(cfg, key) < 0:
            raise UserError(f"'{key}' must be 0 or more, got {getattr(cfg, key)}")
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"min_lr={cfg.min_lr} is above learning_rate={cfg.learning_rate}: the schedule would rise as "
                        f"it decays; set min_lr below it (e.g. learning_rate / 10)")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"ema_decay must be in [0, 1), got {cfg.ema_decay} (0 = no weight average; 0.99 averages "
                        f"about the last 100 steps)")
    if not 0.0 <= cfg.dropout_ramp <= 1.0:
        raise UserError(f"dropout_ramp must be in [0, 1], got {cfg.dropout_ramp} (the share of the run over which "
                        f"dropout rises to its rate; 0 = off)")
    if not 0.0 <= cfg.distill_weight <= 1.0:
        raise UserError(f"distill_weight must be in [0, 1], got {cfg.distill_weight}")
    if cfg.distill_ckpt not in ("best", "ema"):
        raise UserError(f"unknown distill_ckpt '{cfg.distill_ckpt}': use best (best.pt) or ema (ema.pt, the "
                        f"teacher's weight average)")


@dataclass
class RunState:
    """Where a run stands: what resume restores besides weights, optimizers and random streams (checkpoint keys)."""
    iter_num: int = 0
    best_val_loss: float = math.inf
    best_iter: int = -1
    evals_since_best: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_ema_val_loss: float = math.inf  # the weight average's (ema_decay)
    best_ema_iter: int = -1


class Metrics:
    """metrics.jsonl: one JSON object per line, train and eval records mirrored to wandb when it is on.
    On resume, lines past the checkpoint's step are dropped, so the file always describes the run that
    the checkpoint continues."""

    def __init__(self, path: Path, resume_iter: int | None) -> None:
        self.path, self.wandb = path, None  # train.py starts wandb, when it is on, once the run's files are written
        if resume_iter is None:
            atomic_write_bytes(path, b"")
        elif path.exists():
            records, bad = read_metrics(path)
            if bad:
                print(f"warning: dropped {bad} unreadable line(s) from {path}", file=sys.stderr)
            keep = [json.dumps(r) for r in records if r["iter"] <= resume_iter and r["kind"] != "summary"]
            atomic_write_bytes(path, "".join(l + "\n" for l in keep).encode())

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None and record["kind"] in ("train", "eval"):
            self.wandb.log({f"{record['kind']}/{k}": v for k, v in record.items() if k != "kind"}, step=record["iter"])


def prepare_out_dir(out_dir: Path, scratch: bool) -> None:
    """Make out_dir and prove it writable. Drop the temp files (.ckpt.pt.XXXX.tmp, see config.atomic_open) a kill -9
    during an atomic write leaves beside the intact old file, of this run's own files only (another tool may be
    writing its own files in out_dir right now); and, for a scratch run, the weight average of the run it replaces."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir}: {e.strerror or e}; choose another --out_dir") from None
    for name in ("ckpt.pt", "best.pt", "ema.pt", "metrics.jsonl", "config.json", "meta.json"):
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    if scratch:
        checkpoint_path(out_dir, "ema").unlink(missing_ok=True)


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
        out[split] = d.all_mean(losses.mean()).item()
    model.train()
    return out


def rng_state(loader: Loader, device: str) -> dict[str, Any]:
    """This process's random streams: the CPU's, the batch stream, and its own device's (dropout)."""
    gen_state, pos = loader.state()
    state = {"torch": torch.get_rng_state(), "batches": gen_state, "batches_pos": pos}
    device_state = device_rng_state(device)
    if device_state is not None:
        state[torch.device(device).type] = device_state
    return state


def set_rng_state(state: dict[str, Any], batches: Batches, gen: torch.Generator, device: str) -> None:
    torch.set_rng_state(state["torch"].cpu())
    batches.resume(gen, state["batches"].cpu(), state.get("batches_pos", 0))
    kind = torch.device(device).type
    if kind != "cpu" and not set_device_rng_state(state.get(kind), device):
        print(f"warning: the checkpoint holds no random state for {device} (it was saved on another kind of "
              f"device): dropout continues from a fresh stream, so the run is not bit-for-bit the unbroken one")


# ----------------------------------------------------------------------------- one step

def forward_backward(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], accum: int,
                     ctx: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler,
                     ddp: DDP | None = None, teacher: Teacher | None = None,
                     distill_weight: float = 0.0) -> torch.Tensor:
    """Accumulate the gradients of `accum` micro-batches; DDP averages them across processes once,
    on the last. Returns their mean loss as a tensor on the device: reading it waits for the GPU."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for micro in range(accum):
        x, y = next(batches)
        with (ddp.no_sync() if ddp is not None and micro < accum - 1 else contextlib.nullcontext()), ctx:
            logits, loss = model(x, y)
            if teacher is not None:
                loss = distill_loss(logits, loss, teacher.probs(x), distill_weight)
        scaler.scale(loss / accum).backward()
        total += loss.detach()
    return total / accum


def train_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler,
               params: list[torch.Tensor], batches: Iterator[tuple[torch.Tensor, torch.Tensor]], accum: int,
               ctx: contextlib.AbstractContextManager, grad_clip: float, ddp: DDP | None = None,
               teacher: Teacher | None = None, distill_weight: float = 0.0) -> tuple[torch.Tensor, bool]:
    """One optimisation step, as train.py takes it and bench.py times it: the micro-batches'
    forward and backward, then clip and update (optim.optimizer_step). Returns the mean loss (on
    the device, unread) and whether the optimizers stepped (fp16 skips a step that overflowed)."""
    loss = forward_backward(model, batches, accum, ctx, scaler, ddp, teacher, distill_weight)
    return loss, optimizer_step(optimizers, scaler, params, grad_clip)


# ----------------------------------------------------------------------------- the config a command line means

def saved_config(path: Path) -> TrainConfig:
    """A run's own config.json. A key it lacks came after the run and takes the behaviour the run had: the model's
    keys GPTConfig's defaults (its depth-dependent levers off), not the recipe's that TrainConfig's defaults are."""
    return apply_overrides(replace(TrainConfig(), **asdict(GPTConfig())), read_toml(path), where=f" in {path}")


def load_config(argv: list[str]) -> TrainConfig:
    """The config a command line means, as parse_config reads it; with --init_from=resume, on top of the run's own
    config.json: `--init_from=resume --out_dir=RUN` resumes with nothing else, and a flag that would change the
    run itself (its learning rate, batches, seed, ...) is refused rather than silently mixed into it."""
    files, overrides = split_argv(argv)
    if overrides.get("init_from") == "resume":
        out_dir = overrides.get("out_dir") or (parse_config(TrainConfig, files).out_dir if files else "")
        run_dir = Path(out_dir) if out_dir else newest_run()
        saved = run_dir / "config.json"
        if saved.is_file():
            cfg = was = saved_config(saved)
            for f in files:
                cfg = apply_overrides(cfg, read_toml(f), where=f" in {f}")
            cfg = apply_overrides(cfg, {**overrides, "out_dir": str(run_dir)}, where=" on the command line")
            changed = [k for k in asdict(cfg) if k not in MAY_CHANGE_ON_RESUME and getattr(cfg, k) != getattr(was, k)]
            if changed:
                pairs = ", ".join(f"{k}: {getattr(was, k)!r} there vs {getattr(cfg, k)!r} now" for k in changed)
                raise UserError(f"cannot change {pairs} when resuming {run_dir}: a resume continues the same run "
                                f"(it may change budgets, intervals, logging and the device); start a new --out_dir")
            print(f"resuming {run_dir} with its own config ({saved})")
            if cfg.max_iters != was.max_iters and not cfg.lr_decay_iters:
                print(f"max_iters {was.max_iters} -> {cfg.max_iters}: the learning rate now decays over {cfg.max_iters} "
                      f"steps from where the run stands (--lr_decay_iters={was.max_iters} keeps the old schedule)")
            return cfg
    return parse_config(TrainConfig, argv)
