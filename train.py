"""Train a GPT on a prepared book, on one device or many (torchrun + DDP).

    python train.py config/wp_char_cpu.toml --max_iters=2000
    torchrun --standalone --nproc_per_node=2 train.py config/wp_char_2x4090.toml

Writes out_dir/{config.json, meta.json, metrics.jsonl, best.pt, ckpt.pt}. best.pt is the
lowest-val checkpoint, ckpt.pt the latest (and ema.pt, with --ema_decay, the weight average at its
lowest val); `--init_from=resume` continues from ckpt.pt exactly (weights, optimizer, weight
average, RNG streams, step). SIGINT/SIGTERM finish the step, save, exit 0.

It holds the loop and what only the loop uses, a section each: the config, the metrics file,
one step (train_step, which bench.py times too), and the Trainer that runs them; batches.py draws
the batches and distributed.py holds the processes of a DDP job and the stop signals.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from bookgpt.checkpoint import FILES, check_resumable, checkpoint_path, load_checkpoint, newest_run, save_checkpoint
from bookgpt.common import (CompiledWithFallback, autocast, bits_per_byte, deterministic_kernels, device_rng_state, read_metrics,
                    resolve_device, resolve_dtype, set_device_rng_state)
from bookgpt.config import UserError, atomic_write_bytes, atomic_write_json, cli, config_dict, opt, parse_config, split_argv
from bookgpt.distill import Teacher, distill_loss
from bookgpt.batches import Batches, Loader, read_data_meta
from bookgpt.distributed import DDP, Dist, StopFlag, setup_distributed, wrap_ddp
from model import GPT, GPTConfig
from bookgpt.optim import WeightAverage, dropout_at, lr_factor, make_optimizers, optimizer_step, set_lr


@dataclass
class TrainConfig(GPTConfig):
    """The model's keys (model.GPTConfig, listed first by --help), then these. The defaults are the
    recommended CPU recipe (config/wp_bpe_cpu.toml says so with its reasons) without its three
    architecture levers, which are off by default because they depend on the depth."""
    # where things are
    out_dir: str = opt("out/wp_bpe_cpu", "run directory for checkpoints, metrics and config")
    data_dir: str = opt("data/war_and_peace_bpe2048", "folder written by prepare.py")
    train_split: str = opt("train", "the token file training steps draw windows from: train, or train_dropout (several "
                                    "random segmentations of train: prepare.py --bpe_dropout)")
    init_from: str = opt("scratch", "scratch or resume (from out_dir/ckpt.pt, with out_dir/config.json)")
    overwrite: bool = opt(False, "let a scratch run replace the checkpoints already in out_dir")
    # batches
    batch_size: int = opt(32, "sequences per micro-batch per process")
    gradient_accumulation_steps: int = opt(1, "micro-batches per step, summed over all processes")
    # optimiser
    optimizer: str = opt("muon", "muon (Muon for the hidden matrices, AdamW for the rest), or adamw")
    learning_rate: float = opt(2e-3, "peak AdamW learning rate")
    min_lr: float = opt(2e-4, "AdamW's learning rate at the end of the decay (Muon's ends at the same fraction)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    muon_lr: float = opt(0.02, "Muon learning rate (optimizer=muon)")
    muon_momentum: float = opt(0.95, "Muon momentum")
    muon_weight_decay: float = opt(0.0, "decoupled weight decay on Muon's matrices (weight_decay is AdamW's)")
    muon_wd_schedule: str = opt("lr", "lr: each step shrinks Muon's matrices by its current rate x muon_weight_decay, "
                                      "fading as the rate decays; constant: by muon_lr x muon_weight_decay to the end")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    ema_decay: float = opt(0.0, "keep an exponential moving average of the weights with this decay per step (e.g. "
                                "0.99); each eval scores it on val and saves it as ema.pt when it improves (0 = off)")
    # distillation: learn from trained runs' predictions as well as from the text
    distill_from: str = opt("", "teacher runs (out_dirs, comma-separated; their best.pt), '' = off")
    distill_weight: float = opt(0.5, "share of the loss that is cross-entropy against the teachers' mean distribution")
    # schedule and budget
    lr_schedule: str = opt("cosine", "cosine (warmup, cosine decay) or wsd (warmup, stable, linear decay)")
    warmup_iters: int = opt(50, "linear warmup steps")
    lr_decay_iters: int = opt(0, "steps until min_lr (0 = max_iters)")
    decay_frac: float = opt(0.2, "wsd: share of the run spent decaying")
    dropout_ramp: float = opt(0.0, "dropout rises over this share of the run in four stages, 0, 1/3, 2/3 and all of "
                                   "`dropout` (0 = the same rate throughout; 1 = all of it in the last quarter)")
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
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16")
    compile: bool = opt(False, "torch.compile the model (falls back to eager if it fails)")
    deterministic: bool = opt(False, "deterministic kernels, so two runs of a seed give the same losses on a GPU "
                                     "too (a little slower; on a CPU they are the same anyway)")
    seed: int = opt(1337, "seed for weights, batches and dropout")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")


    def __post_init__(self) -> None:
        pass  # built key by key from files and flags: validate() checks the whole once it is complete


CHOICES = {"init_from": ("scratch", "resume"), "optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd"),
           "muon_wd_schedule": ("lr", "constant"),
           "train_split": ("train", "train_dropout"),
           "dtype": ("auto", "float32", "bfloat16", "float16")}


def validate(cfg: TrainConfig) -> None:
    try:
        GPTConfig.check(cfg)  # the model's keys
    except ValueError as e:
        raise UserError(str(e)) from None
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"bad value for '{key}': {getattr(cfg, key)!r}; use one of {', '.join(allowed)}")
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


class Metrics:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint's step are
    dropped, so the file always describes the run that the checkpoint continues."""

    def __init__(self, path: Path, resume_iter: int | None) -> None:
        self.path = path
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


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir}: {e.strerror or e}; choose another --out_dir") from None


RUN_FILES = ("ckpt.pt", "best.pt", "ema.pt", "metrics.jsonl", "config.json", "meta.json")


def remove_stale_temps(out_dir: Path) -> None:
    """A kill -9 during an atomic write leaves its temp file (.ckpt.pt.XXXX.tmp, see config.atomic_open)
    beside the intact old file; drop such leftovers of this run's own files (only those: another
    tool may be writing its own files in out_dir right now)."""
    for name in RUN_FILES:
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


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
    state = {"torch": torch.get_rng_state(), "batches": loader.state()}
    device_state = device_rng_state(device)
    if device_state is not None:
        state[torch.device(device).type] = device_state
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator, device: str) -> None:
    torch.set_rng_state(state["torch"].cpu())
    gen.set_state(state["batches"].cpu())
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


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary (also the last line of metrics.jsonl)."""
    validate(cfg)
    d = setup_distributed(resolve_device(cfg.device))
    lost = False
    try:
        with StopFlag() as stop, deterministic_kernels() if cfg.deterministic else contextlib.nullcontext():
            summary = Trainer(cfg, d, stop).run()
        d.barrier()  # all ranks finish together: a rank tearing gloo down while rank 0 still saves can abort
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
            # the run's objects sit in reference cycles (torch's optimizers make some), DDP among them with the
            # process group: free them now, or gloo's threads may outlive the interpreter and abort at exit
            gc.collect()
            dist.destroy_process_group()


class Trainer:
    """One training run: the model and its optimizers, the files in out_dir, and the loop."""

    def __init__(self, cfg: TrainConfig, d: Dist, stop: StopFlag) -> None:
        self.cfg, self.d, self.stop, self.device = cfg, d, stop, d.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.gradient_accumulation_steps % d.world:
            raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be divisible by the "
                            f"number of processes ({d.world})")
        self.accum = cfg.gradient_accumulation_steps // d.world
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.out_dir, self.data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
        self.meta = read_data_meta(self.data_dir, cfg.train_split)
        # the estimates read train and val; the steps read train_split (train, or its random segmentations)
        self.batches = {s: Batches(self.data_dir, s, self.meta["dtype"], cfg.block_size, cfg.batch_size, self.device)
                        for s in ("train", "val")}
        self.step_batches = self.batches.get(cfg.train_split) or Batches(
            self.data_dir, cfg.train_split, self.meta["dtype"], cfg.block_size, cfg.batch_size, self.device)
        self.teacher_runs = [r.strip() for r in cfg.distill_from.split(",") if r.strip()]
        self.teacher = Teacher(self.teacher_runs, self.meta, cfg.block_size, self.device) if self.teacher_runs else None
        if cfg.init_from == "scratch" and not cfg.overwrite and any((self.out_dir / f).is_file() for f in FILES.values()):
            raise UserError(f"{self.out_dir} already holds a trained run; continue it with --init_from=resume, train "
                            f"into another --out_dir, or replace it with --overwrite=true")
        if d.master:  # after the data checks, so a bad --data_dir or block_size leaves no empty out_dir behind
            check_writable(self.out_dir)
            remove_stale_temps(self.out_dir)
            if cfg.init_from == "scratch":  # a replaced run's weight average is not this run's
                checkpoint_path(self.out_dir, "ema").unlink(missing_ok=True)

        # the model, its optimizers and the run's state (from ckpt.pt on resume)
        if cfg.vocab_size not in (0, self.meta["vocab_size"]):
            raise UserError(f"vocab_size={cfg.vocab_size} but {self.data_dir} has {self.meta['vocab_size']} tokens; "
                            f"leave vocab_size at 0 (the data's)")
        model_cfg = GPTConfig.from_dict({**config_dict(cfg), "vocab_size": self.meta["vocab_size"]})
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = GPT(model_cfg).to(self.device)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizers = make_optimizers(self.raw_model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.split(":")[0], enabled=(self.dtype == "float16"))
        self.gen = torch.Generator().manual_seed(cfg.seed + 1000 * d.rank)  # this rank's batch stream
        torch.manual_seed(cfg.seed + 1000 * d.rank + 1)  # this rank's dropout stream
        self.ema = WeightAverage(self.raw_model, cfg.ema_decay) if cfg.ema_decay else None
        self.state = {"iter_num": 0, "best_val_loss": float("inf"), "best_iter": -1, "evals_since_best": 0,
                      "tokens_seen": 0, "train_seconds": 0.0, "best_ema_val_loss": float("inf"), "best_ema_iter": -1}
        if cfg.init_from == "resume":
            self.resume(model_cfg)
        self.loader = Loader(self.step_batches, self.gen)  # after resume: where the saved stream stands

        self.model: torch.nn.Module = self.raw_model
        self.compiled = CompiledWithFallback(self.raw_model) if cfg.compile else None
        if self.compiled is not None:
            self.model = self.compiled
        self.ddp = wrap_ddp(self.model, self.device) if d.world > 1 else None
        if self.ddp is not None:
            self.model = self.ddp
        self.ctx = autocast(self.device, self.dtype)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, its loss on the device), not read yet
        self.lr = cfg.learning_rate
        self.val_bpb, self.val_bpb_of = math.inf, ""  # the last eval's, the weights' or (named) their average's
        self.bar: Any = None
        self.by_time = False
        self.start_logging()

    def resume(self, model_cfg: GPTConfig) -> None:
        """Weights, optimizer moments, loss scale, counters and this rank's random streams from ckpt.pt.
        Loaded onto the CPU first: load_state_dict copies each tensor to where its parameter lives."""
        path = checkpoint_path(self.out_dir, "latest")
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, model_cfg, self.meta, path, self.cfg.optimizer)
        self.raw_model.load_state_dict(ckpt["model"])
        for opt_, sd in zip(self.optimizers, ckpt["optimizer"]):
            opt_.load_state_dict(sd)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"])
            else:
                self.ema = WeightAverage(self.raw_model, self.cfg.ema_decay)  # starts from the resumed weights
        self.state.update({k: ckpt.get(k, v) for k, v in self.state.items()})
        if self.d.rank < len(ckpt["rng"]):  # a job resumed with more processes: the new ones start fresh streams
            set_rng_state(ckpt["rng"][self.d.rank], self.gen, self.device)
        if self.d.master:
            print(f"resumed from step {self.state['iter_num']} ({path})")

    def start_logging(self) -> None:
        cfg, d, meta = self.cfg, self.d, self.meta
        resume_iter = self.state["iter_num"] if cfg.init_from == "resume" else None
        self.metrics = Metrics(self.out_dir / "metrics.jsonl", resume_iter) if d.master else None
        if d.master:
            atomic_write_json(self.out_dir / "config.json", config_dict(cfg))
            atomic_write_json(self.out_dir / "meta.json", meta)
            ranks = meta["tokenizer"].get("ranks_file")  # a BPE tokenizer's merges travel with the run
            if ranks:
                atomic_write_bytes(self.out_dir / ranks, (self.data_dir / ranks).read_bytes())
            if cfg.warmup_iters > cfg.max_iters:  # a short trial run is fine; say what it means
                print(f"warning: warmup_iters={cfg.warmup_iters} is longer than the run (max_iters={cfg.max_iters}): "
                      f"the learning rate never reaches its peak", file=sys.stderr)
            changed = {k: v for k, v in config_dict(cfg).items() if v != getattr(TrainConfig(), k)}
            print(f"config in {self.out_dir / 'config.json'}; set apart from the defaults: "
                  + (", ".join(f"{k}={v}" for k, v in changed.items()) or "nothing"))
            tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
            print(f"device {self.device} ({self.dtype}{', GradScaler' if self.scaler.is_enabled() else ''}"
                  f"{', compile' if cfg.compile else ''}), {d.world} process(es), "
                  f"{self.raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_step:,} tokens per step, "
                  f"{meta['splits']['train']['tokens']:,} train tokens")
        if self.teacher is not None and self.state["iter_num"] == 0:  # its quality, on the batches the evals use
            losses = estimate_loss(self.teacher, self.batches, cfg, d, self.ctx)
            record = {"kind": "teacher", "iter": 0, "runs": self.teacher_runs, "train_loss": losses["train"],
                      "val_loss": losses["val"], "val_bpb": bits_per_byte(losses["val"], meta["splits"]["val"])}
            if d.master:
                self.metrics.write(record)
                print(f"teacher ({len(self.teacher_runs)} run(s)): train {losses['train']:.4f}, val {losses['val']:.4f} "
                      f"({record['val_bpb']:.3f} bpb); distill_weight {cfg.distill_weight}")
        self.wandb = None
        if cfg.wandb_log and d.master:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=true but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or self.out_dir.name,
                                    group=cfg.wandb_group or None, config=config_dict(cfg), resume="allow")

    # ------------------------------------------------------------------ reading, saving, evaluating

    def read_losses(self) -> float | None:
        """Read the losses of the steps taken since the last read (one wait for the GPU), averaged over the
        processes, and stop at the first that is not finite; returns the latest. The average is the one
        exchange that lets every process see a NaN or inf of any, so all stop together with the same line
        rather than the others waiting for the one that stopped. Runs before every save: weights that went
        bad are never written over the last good checkpoint."""
        if not self.pending:
            return None
        steps, values = [s for s, _ in self.pending], self.d.all_mean(torch.stack([l for _, l in self.pending])).tolist()
        self.pending.clear()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                self.bar.close()
                raise UserError(f"loss became {value} at step {step}; the last good checkpoints in {self.out_dir} "
                                f"are kept. Try a lower learning_rate, grad_clip=1, or dtype=bfloat16/float32")
        return values[-1]

    def save(self, which: str) -> None:
        self.read_losses()
        rngs = self.d.gather(rng_state(self.loader, self.device))  # every rank's streams, so each resumes
        if self.d.master:
            save_checkpoint(checkpoint_path(self.out_dir, which), self.raw_model,
                            optimizer=[o.state_dict() for o in self.optimizers],
                            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                            config=config_dict(self.cfg), meta=self.meta, rng=rngs,
                            ema=self.ema.state_dict() if self.ema is not None else None, **self.state)

    def evaluate_average(self, record: dict[str, Any]) -> str:
        """Score the weight average on val; save it as ema.pt when it improved. Returns the log's words."""
        state = self.state
        with self.ema.swapped_in():
            val = estimate_loss(self.model, {"val": self.batches["val"]}, self.cfg, self.d, self.ctx)["val"]
            improved = math.isfinite(val) and val < state["best_ema_val_loss"]
            if improved:
                state.update(best_ema_val_loss=val, best_ema_iter=state["iter_num"])
                if self.d.master:
                    save_checkpoint(checkpoint_path(self.out_dir, "ema"), self.raw_model, config=config_dict(self.cfg),
                                    meta=self.meta, iter_num=state["iter_num"], best_val_loss=val,
                                    best_iter=state["iter_num"], tokens_seen=state["tokens_seen"])
        record.update(ema_val_loss=val, ema_val_bpb=bits_per_byte(val, self.meta["splits"]["val"]))
        return f"; average {val:.4f} ({record['ema_val_bpb']:.3f} bpb){' *best*' if improved else ''}"

    def evaluate_and_save(self) -> None:
        state, out_dir = self.state, self.out_dir
        losses = estimate_loss(self.model, self.batches, self.cfg, self.d, self.ctx)
        for split, value in losses.items():  # the last step's update broke the weights: do not save them
            if not math.isfinite(value):
                self.bar.close()
                raise UserError(f"eval loss on {split} became {value} at step {state['iter_num']}; the last good "
                                f"checkpoints in {out_dir} are kept. Try a lower learning_rate, grad_clip=1, "
                                f"or dtype=bfloat16/float32")
        improved = losses["val"] < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=losses["val"], best_iter=state["iter_num"], evals_since_best=0)
        else:
            state["evals_since_best"] += 1
        record = {"kind": "eval", "iter": state["iter_num"], "train_loss": losses["train"], "val_loss": losses["val"],
                  "val_bpb": bits_per_byte(losses["val"], self.meta["splits"]["val"]), "lr": self.lr,
                  "tokens_seen": state["tokens_seen"], "time_s": state["train_seconds"]}
        average = self.evaluate_average(record) if self.ema is not None else ""
        # the finish line (target_val_bpb) reads the better of the weights and their average
        self.val_bpb = min(record["val_bpb"], record.get("ema_val_bpb", math.inf))
        self.val_bpb_of = " (the weight average's: ema.pt)" if self.val_bpb < record["val_bpb"] else ""
        if self.d.master:
            self.metrics.write(record)
            self.bar.write(f"step {state['iter_num']}: train {losses['train']:.4f}, val {losses['val']:.4f} "
                           f"({record['val_bpb']:.3f} bpb){' *best*' if improved else ''}{average}")
            if self.wandb:
                self.wandb.log({f"eval/{k}": v for k, v in record.items() if k != "kind"}, step=state["iter_num"])
        if improved:
            self.save("best")
        self.save("latest")

    def log_train(self, step: int, loss: float, tokens_per_s: float) -> None:
        lrs = {"lr": f"{self.lr:.2e}"}
        if self.cfg.optimizer == "muon":  # both rates: AdamW's (embeddings, gains) and Muon's (hidden matrices)
            lrs["muon_lr"] = f"{self.cfg.muon_lr * self.lr / self.cfg.learning_rate:.2e}"
        self.bar.set_postfix(**({"step": step} if self.by_time else {}), loss=f"{loss:.4f}", **lrs,
                             tok_s=f"{tokens_per_s:,.0f}")
        record = {"kind": "train", "iter": step, "loss": loss, "lr": self.lr, "tokens_per_s": tokens_per_s,
                  "time_s": self.state["train_seconds"]}
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
        self.metrics.write(record)
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "kind"}, step=step)

    def should_stop(self, step: int) -> tuple[bool, bool]:
        """(a signal asked to stop, the max_minutes budget is spent), agreed on by all processes. They
        must stop at the same step, and agreeing waits for the GPU, so a job of several processes
        agrees at log and eval steps only (a signal then takes effect up to log_interval steps late)."""
        cfg = self.cfg
        flags = [self.stop.requested, cfg.max_minutes > 0 and self.state["train_seconds"] >= cfg.max_minutes * 60]
        if self.d.world == 1:
            return flags[0], flags[1]
        if step % cfg.log_interval and step % cfg.eval_interval:
            return False, False
        agreed = self.d.any(flags)
        return agreed[0], agreed[1]

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm
        cfg, d, state = self.cfg, self.d, self.state
        # the bar shows what ends the run: steps, or under a max_minutes cap the training seconds
        self.by_time = cfg.max_minutes > 0
        total = round(cfg.max_minutes * 60) if self.by_time else cfg.max_iters
        done = int(state["train_seconds"]) if self.by_time else state["iter_num"]
        self.bar = tqdm(total=total, initial=min(done, total), disable=not d.master, dynamic_ncols=True,
                        unit="s" if self.by_time else "it", desc=f"{cfg.max_minutes:g}-minute cap" if self.by_time else None)
        decay_iters = cfg.lr_decay_iters or cfg.max_iters
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.lr = cfg.learning_rate * lr_factor(cfg, state["iter_num"], state["iter_num"] / decay_iters)
        reason = "max_iters"
        seconds_last, tokens_last = state["train_seconds"], state["tokens_seen"]
        if state["iter_num"] == 0:
            self.evaluate_and_save()
        while state["iter_num"] < cfg.max_iters:
            it = state["iter_num"]
            t0 = time.perf_counter()
            progress = it / decay_iters
            if cfg.max_minutes > 0:
                progress = max(progress, state["train_seconds"] / 60 / cfg.max_minutes)
            factor = lr_factor(cfg, it, progress)
            self.lr = cfg.learning_rate * factor
            set_lr(self.optimizers, cfg, factor)
            if cfg.dropout_ramp:
                self.raw_model.set_dropout(dropout_at(cfg, progress))
            loss, stepped = train_step(self.model, self.optimizers, self.scaler, self.params, self.loader, self.accum,
                                       self.ctx, cfg.grad_clip, self.ddp, self.teacher, cfg.distill_weight)
            if self.ema is not None and stepped:
                self.ema.update()
            step = it + 1
            self.pending.append((step, loss))
            loss_value = self.read_losses() if step % cfg.log_interval == 0 else None  # the only wait per interval
            state["iter_num"] = step
            state["tokens_seen"] += tokens_per_step
            state["train_seconds"] += time.perf_counter() - t0
            self.bar.update(min(int(state["train_seconds"]), self.bar.total) - self.bar.n if self.by_time else 1)
            if loss_value is not None and d.master:
                tps = (state["tokens_seen"] - tokens_last) / max(state["train_seconds"] - seconds_last, 1e-9)
                seconds_last, tokens_last = state["train_seconds"], state["tokens_seen"]
                self.log_train(step, loss_value, tps)

            stop_now, out_of_time = self.should_stop(step)
            if stop_now:
                reason = "signal"
                if step % cfg.eval_interval == 0:
                    self.evaluate_and_save()  # a resume would not redo this step's eval: do it now (it saves too)
                else:
                    self.save("latest")
                break
            if step % cfg.eval_interval == 0 or step >= cfg.max_iters or out_of_time:
                self.evaluate_and_save()
                if cfg.early_stop_patience and state["evals_since_best"] >= cfg.early_stop_patience:
                    reason = "early_stop"
                    break
                if self.val_bpb <= cfg.target_val_bpb:
                    reason = "target"
                    break
            if out_of_time:
                reason = "max_minutes"
                break
        self.bar.close()
        return self.finish(reason)

    def finish(self, reason: str) -> dict[str, Any]:
        state = self.state
        summary = {"kind": "summary", "iter": state["iter_num"], "reason": reason, "best_val_loss": state["best_val_loss"],
                   "best_val_bpb": bits_per_byte(state["best_val_loss"], self.meta["splits"]["val"]),
                   "best_iter": state["best_iter"], "tokens_seen": state["tokens_seen"],
                   "train_seconds": state["train_seconds"], "params": self.raw_model.num_params()}
        if self.ema is not None:
            summary.update(best_ema_val_bpb=bits_per_byte(state["best_ema_val_loss"], self.meta["splits"]["val"]),
                           best_ema_iter=state["best_ema_iter"])
        if self.compiled is not None and self.compiled.error:
            summary["compile_error"] = self.compiled.error
        if self.d.master:
            self.metrics.write(summary)
            print(f"stopped ({reason}) at step {state['iter_num']}: best val {state['best_val_loss']:.4f} "
                  f"({summary['best_val_bpb']:.3f} bpb) at step {state['best_iter']}; checkpoints in {self.out_dir}")
            if reason == "target":
                print(f"reached val bpb {self.val_bpb:.3f}{self.val_bpb_of} <= {self.cfg.target_val_bpb:g} in {state['iter_num']:,} "
                      f"steps ({state['tokens_seen']:,} tokens) and {state['train_seconds'] / 60:.1f} minutes of training steps")
            if self.wandb:
                self.wandb.finish()
        return summary


# What a resumed run's command line may change: budgets, intervals, logging, the device, and the keys
# that checkpoint.check_resumable compares with the checkpoint itself (the model, optimizer, data).
MAY_CHANGE_ON_RESUME = {"out_dir", "init_from", "data_dir", "optimizer", "max_iters", "max_minutes", "lr_decay_iters",
                        "eval_interval", "eval_iters", "log_interval", "early_stop_patience", "target_val_bpb", "wandb_log",
                        "wandb_project", "wandb_run_name", "wandb_group", "device", "dtype", "compile", "deterministic",
                        "threads", "overwrite", *(f.name for f in fields(GPTConfig))}


def load_config(argv: list[str]) -> TrainConfig:
    """The config a command line means, as parse_config reads it; with --init_from=resume, on top of the
    run's own config.json: `--init_from=resume --out_dir=RUN` resumes with nothing else, and a flag
    that would change the run itself (its learning rate, batches, seed, ...) is refused rather than
    silently mixed into it."""
    files, overrides = split_argv(argv)
    if overrides.get("init_from") == "resume":
        out_dir = overrides.get("out_dir") or (parse_config(TrainConfig, files).out_dir if files else "")
        run_dir = Path(out_dir) if out_dir else newest_run()
        saved = run_dir / "config.json"
        if saved.is_file():
            cfg = parse_config(TrainConfig, [str(saved), *argv, f"--out_dir={run_dir}"])
            was = parse_config(TrainConfig, [str(saved)])
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


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        parse_config(TrainConfig, argv, prog="train.py", doc=__doc__.split("\n\n")[0])
    train(load_config(argv))


if __name__ == "__main__":
    cli(main)
