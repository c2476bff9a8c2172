"""Train a GPT on a prepared book, on one device or many (torchrun + DDP).

    python train.py config/wp_char_cpu.toml --max_iters=2000
    torchrun --standalone --nproc_per_node=2 train.py config/wp_char_2x4090.toml

Writes out_dir/{config.json, meta.json, metrics.jsonl, best.pt, ckpt.pt}. best.pt is the
lowest-val checkpoint, ckpt.pt the latest (and ema.pt, with --ema_decay, the weight average at its
lowest val); `--init_from=resume` continues from ckpt.pt exactly (weights, optimizer, weight
average, RNG streams, step). SIGINT/SIGTERM finish the step, save, exit 0.

Read top to bottom: `train` starts the processes and names what went wrong, `Run` sets a run up (data,
model, optimizers, ckpt.pt on resume, files) and saves and evaluates it, `loop` trains in labelled blocks.
bookgpt/training.py holds the config, RunState and one step (train_step, which bench.py times too).
"""
from __future__ import annotations

import contextlib
import errno
import gc
import math
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from bookgpt.batches import Batches, Loader, read_data_meta
from bookgpt.checkpoint import FILES, check_resumable, checkpoint_path, load_checkpoint, save_checkpoint
from bookgpt.common import (CompiledWithFallback, autocast, bits_per_byte, deterministic_kernels, resolve_device,
                            resolve_dtype)
from bookgpt.config import GPTConfig, UserError, atomic_write_bytes, atomic_write_json, cli, config_dict, parse_config
from bookgpt.distill import Teacher, teacher_checkpoints
from bookgpt.distributed import Dist, StopFlag, setup_distributed, wrap_ddp
from bookgpt.optim import WeightAverage, dropout_at, lr_factor, make_optimizers, set_lr
from bookgpt.training import (Metrics, RunState, TrainConfig, estimate_loss, load_config, prepare_out_dir, rng_state,
                              set_rng_state, train_step, validate)
from model import GPT

# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary (also the last line of metrics.jsonl)."""
    validate(cfg)
    d = setup_distributed(resolve_device(cfg.device))
    lost = False
    try:
        with StopFlag() as stop, deterministic_kernels() if cfg.deterministic else contextlib.nullcontext():
            summary = loop(Run(cfg, d), stop)
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


def load_teacher(runs: tuple[str, ...], meta: dict[str, Any], block_size: int, device: str, which: str = "best",
                 compile: bool = False) -> Teacher:
    """Distillation's teacher: one checkpoint of each run, checked to fit the student (distill.teacher_checkpoints)."""
    checkpoints = teacher_checkpoints(runs, meta, block_size, which)
    return Teacher([GPT.from_checkpoint(ckpt, path, device) for ckpt, path in checkpoints], compile)


# ----------------------------------------------------------------------------- setup

class Run:
    """One run's pieces: the data, the model and its optimizers, what a checkpoint saves and a resume restores
    (weights, optimizer moments, loss scale, weight average, RunState, random streams), the files in out_dir."""

    def __init__(self, cfg: TrainConfig, d: Dist) -> None:
        self.cfg, self.d = cfg, d
        dtype = resolve_dtype(cfg.dtype, d.device)
        if cfg.gradient_accumulation_steps % d.world:
            raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be divisible by the "
                            f"number of processes ({d.world})")
        self.accum = cfg.gradient_accumulation_steps // d.world
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if d.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # ---- the data, the teachers, out_dir
        self.out_dir, data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
        self.meta = read_data_meta(data_dir, cfg.train_split)
        # the estimates read train and val; the steps read train_split (train, or its random segmentations)
        self.batches = {s: Batches(data_dir, s, self.meta["dtype"], cfg.block_size, cfg.batch_size, d.device)
                        for s in ("train", "val")}
        self.step_batches = Batches(data_dir, cfg.train_split, self.meta["dtype"], cfg.block_size, cfg.batch_size,
                                    d.device, cfg.windows)
        self.teacher = load_teacher(cfg.distill_from, self.meta, cfg.block_size, d.device, cfg.distill_ckpt,
                                    cfg.compile) if cfg.distill_from else None
        if cfg.init_from == "scratch" and not cfg.overwrite and any((self.out_dir / f).is_file() for f in FILES.values()):
            raise UserError(f"{self.out_dir} already holds a trained run; continue it with --init_from=resume, train "
                            f"into another --out_dir, or replace it with --overwrite=true")
        if d.master:  # after the data checks, so a bad --data_dir or block_size leaves no empty out_dir behind
            prepare_out_dir(self.out_dir, scratch=cfg.init_from == "scratch")

        # ---- the model, its optimizers, and where the run stands (from ckpt.pt on resume)
        if cfg.vocab_size not in (0, self.meta["vocab_size"]):
            raise UserError(f"vocab_size={cfg.vocab_size} but {data_dir} has {self.meta['vocab_size']} tokens; "
                            f"leave vocab_size at 0 (the data's)")
        model_cfg = GPTConfig.from_dict({**config_dict(cfg), "vocab_size": self.meta["vocab_size"]})
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = GPT(model_cfg).to(d.device)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizers = make_optimizers(self.raw_model, cfg, d.device)
        self.scaler = torch.amp.GradScaler(d.device.split(":")[0], enabled=(dtype == "float16"))
        gen = torch.Generator().manual_seed(cfg.seed + 1000 * d.rank)  # this rank's batch stream
        torch.manual_seed(cfg.seed + 1000 * d.rank + 1)  # this rank's dropout stream
        self.state = RunState()
        saved = self.restore(model_cfg, gen) if cfg.init_from == "resume" else {}
        self.loader = Loader(self.step_batches, gen)  # after restore: where the saved stream stands
        # the weight average: the checkpoint's, or one starting from the weights as they stand
        self.ema = WeightAverage(self.raw_model, cfg.ema_decay) if cfg.ema_decay else None
        if self.ema is not None and saved.get("ema"):
            self.ema.load_state_dict(saved["ema"])

        # ---- what takes the steps: the model, compiled, wrapped for DDP, under autocast
        self.compiled = CompiledWithFallback(self.raw_model) if cfg.compile else None
        model = self.compiled if self.compiled is not None else self.raw_model
        self.ddp = wrap_ddp(model, d.device) if d.world > 1 else None
        self.model = self.ddp if self.ddp is not None else model
        self.ctx = autocast(d.device, dtype)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, its loss on the device), not read yet
        self.metrics = self.start_logging(dtype)

    def restore(self, model_cfg: GPTConfig, gen: torch.Generator) -> dict[str, Any]:
        """Weights, optimizer moments, loss scale, RunState and this rank's random streams from ckpt.pt; returns
        it. Loaded onto the CPU first: load_state_dict copies each tensor to where its parameter lives."""
        path = checkpoint_path(self.out_dir, "latest")
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, model_cfg, self.meta, path, self.cfg.optimizer)
        self.raw_model.load_state_dict(ckpt["model"])
        for opt_, sd in zip(self.optimizers, ckpt["optimizer"]):
            opt_.load_state_dict(sd)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        # the counters under RunState's names; a key an older checkpoint lacks keeps its starting value
        self.state = RunState(**{k: ckpt.get(k, v) for k, v in asdict(self.state).items()})
        if self.d.rank < len(ckpt["rng"]):  # a job resumed with more processes: the new ones start fresh streams
            set_rng_state(ckpt["rng"][self.d.rank], self.step_batches, gen, self.d.device)
        if self.d.master:
            print(f"resumed from step {self.state.iter_num} ({path})")
        return ckpt

    def start_logging(self, dtype: str) -> Metrics | None:
        """Write config.json, meta.json and the tokenizer's files, say what runs; returns rank 0's metrics file."""
        cfg, d, meta = self.cfg, self.d, self.meta
        metrics = None
        if d.master:
            metrics = Metrics(self.out_dir / "metrics.jsonl", self.state.iter_num if cfg.init_from == "resume" else None)
            atomic_write_json(self.out_dir / "config.json", config_dict(cfg))
            atomic_write_json(self.out_dir / "meta.json", meta)
            ranks = meta["tokenizer"].get("ranks_file")  # a BPE tokenizer's merges travel with the run
            if ranks:
                atomic_write_bytes(self.out_dir / ranks, (Path(cfg.data_dir) / ranks).read_bytes())
            if cfg.warmup_iters > cfg.max_iters:  # a short trial run is fine; say what it means
                print(f"warning: warmup_iters={cfg.warmup_iters} is longer than the run (max_iters={cfg.max_iters}): "
                      f"the learning rate never reaches its peak", file=sys.stderr)
            changed = ", ".join(f"{k}={v}" for k, v in config_dict(cfg).items() if v != getattr(TrainConfig(), k))
            print(f"config in {self.out_dir / 'config.json'}; set apart from the defaults: {changed or 'nothing'}")
            print(f"device {d.device} ({dtype}{', GradScaler' if self.scaler.is_enabled() else ''}"
                  f"{', compile' if cfg.compile else ''}), {d.world} process(es), "
                  f"{self.raw_model.num_params() / 1e6:.2f}M parameters, {self.tokens_per_step:,} tokens per step, "
                  f"{meta['splits']['train']['tokens']:,} train tokens")
        if self.teacher is not None and self.state.iter_num == 0:  # its quality, on the batches the evals use
            losses = estimate_loss(self.teacher, self.batches, cfg, d, self.ctx)
            record = {"kind": "teacher", "iter": 0, "runs": list(cfg.distill_from), "train_loss": losses["train"],
                      "val_loss": losses["val"], "val_bpb": bits_per_byte(losses["val"], meta["splits"]["val"])}
            if d.master:
                metrics.write(record)
                print(f"teacher ({len(cfg.distill_from)} run(s)): train {losses['train']:.4f}, val {losses['val']:.4f} "
                      f"({record['val_bpb']:.3f} bpb); distill_weight {cfg.distill_weight}")
        if cfg.wandb_log and d.master:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=true but wandb is not installed: pip install wandb") from None
            metrics.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or self.out_dir.name,
                                       group=cfg.wandb_group or None, config=config_dict(cfg), resume="allow")
        return metrics

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
                raise UserError(f"loss became {value} at step {step}; the last good checkpoints in {self.out_dir} "
                                f"are kept. Try a lower learning_rate, grad_clip=1, or dtype=bfloat16/float32")
        return values[-1]

    def save(self, which: str) -> None:
        self.read_losses()
        rngs = self.d.gather(rng_state(self.loader, self.d.device))  # every rank's streams, so each resumes
        if self.d.master:
            save_checkpoint(checkpoint_path(self.out_dir, which), self.raw_model,
                            optimizer=[o.state_dict() for o in self.optimizers],
                            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                            config=config_dict(self.cfg), meta=self.meta, rng=rngs,
                            ema=self.ema.state_dict() if self.ema is not None else None, **asdict(self.state))

    def evaluate(self, lr: float) -> dict[str, Any]:
        """Score train and val (and the weight average: ema.pt), log them, save best.pt if val improved and ckpt.pt."""
        cfg, state, val_split = self.cfg, self.state, self.meta["splits"]["val"]
        losses = estimate_loss(self.model, self.batches, cfg, self.d, self.ctx)
        for split, value in losses.items():  # the last step's update broke the weights: do not save them
            if not math.isfinite(value):
                raise UserError(f"eval loss on {split} became {value} at step {state.iter_num}; the last good checkpoints "
                                f"in {self.out_dir} are kept. Try a lower learning_rate, grad_clip=1, or dtype=bfloat16/float32")
        improved = losses["val"] < state.best_val_loss
        state.evals_since_best = 0 if improved else state.evals_since_best + 1
        if improved:
            state.best_val_loss, state.best_iter = losses["val"], state.iter_num
        record = {"kind": "eval", "iter": state.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                  "val_bpb": bits_per_byte(losses["val"], val_split), "lr": lr, "tokens_seen": state.tokens_seen,
                  "time_s": state.train_seconds}
        average = ""
        if self.ema is not None:
            with self.ema.swapped_in():
                val = estimate_loss(self.model, {"val": self.batches["val"]}, cfg, self.d, self.ctx)["val"]
                ema_improved = math.isfinite(val) and val < state.best_ema_val_loss
                if ema_improved:
                    state.best_ema_val_loss, state.best_ema_iter = val, state.iter_num
                    if self.d.master:
                        save_checkpoint(checkpoint_path(self.out_dir, "ema"), self.raw_model, config=config_dict(cfg),
                                        meta=self.meta, iter_num=state.iter_num, best_val_loss=val,
                                        best_iter=state.iter_num, tokens_seen=state.tokens_seen)
            record.update(ema_val_loss=val, ema_val_bpb=bits_per_byte(val, val_split))
            average = f"; average {val:.4f} ({record['ema_val_bpb']:.3f} bpb){' *best*' if ema_improved else ''}"
        if self.d.master:
            self.metrics.write(record)
            tqdm.write(f"step {state.iter_num}: train {losses['train']:.4f}, val {losses['val']:.4f} "
                       f"({record['val_bpb']:.3f} bpb){' *best*' if improved else ''}{average}")  # above the bar
        if improved:
            self.save("best")
        self.save("latest")
        return record


def reached_bpb(record: dict[str, Any]) -> float:  # the finish line reads the better of the weights and their average
    return min(record.get("val_bpb", math.inf), record.get("ema_val_bpb", math.inf))


# ----------------------------------------------------------------------------- the loop

def loop(run: Run, stop: StopFlag) -> dict[str, Any]:
    """Train until the budget (steps, or max_minutes), early stopping, the target or a signal ends the run."""
    cfg, d, state = run.cfg, run.d, run.state
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    lr = cfg.learning_rate * lr_factor(cfg, state.iter_num, state.iter_num / decay_iters)
    seconds_last, tokens_last = state.train_seconds, state.tokens_seen
    reason, last = "max_iters", {}
    by_time = cfg.max_minutes > 0  # the bar shows what ends the run: steps, or under a max_minutes cap the seconds
    total = round(cfg.max_minutes * 60) if by_time else cfg.max_iters
    with tqdm(total=total, initial=min(int(state.train_seconds) if by_time else state.iter_num, total),
              disable=not d.master, dynamic_ncols=True, unit="s" if by_time else "it",
              desc=f"{cfg.max_minutes:g}-minute cap" if by_time else None) as bar:  # closed however the loop ends
        if state.iter_num == 0:
            last = run.evaluate(lr)
        while state.iter_num < cfg.max_iters:
            # ---- learning rate and dropout for this step: they follow the budget, steps or (max_minutes) time
            t0 = time.perf_counter()
            progress = max(state.iter_num / decay_iters, state.train_seconds / 60 / cfg.max_minutes if by_time else 0.0)
            factor = lr_factor(cfg, state.iter_num, progress)
            lr = cfg.learning_rate * factor
            set_lr(run.optimizers, cfg, factor)
            if cfg.dropout_ramp:
                run.raw_model.set_dropout(dropout_at(cfg.dropout, cfg.dropout_ramp, progress))

            # ---- one step; its loss stays on the device until a log step reads it (the only wait per interval)
            loss, stepped = train_step(run.model, run.optimizers, run.scaler, run.params, run.loader, run.accum,
                                       run.ctx, cfg.grad_clip, run.ddp, run.teacher, cfg.distill_weight)
            if run.ema is not None and stepped:
                run.ema.update()
            step = state.iter_num + 1
            run.pending.append((step, loss))
            loss_value = run.read_losses() if step % cfg.log_interval == 0 else None
            state.iter_num, state.tokens_seen = step, state.tokens_seen + run.tokens_per_step
            state.train_seconds += time.perf_counter() - t0
            bar.update(min(int(state.train_seconds), total) - bar.n if by_time else 1)

            # ---- log
            if loss_value is not None and d.master:
                tokens_per_s = (state.tokens_seen - tokens_last) / max(state.train_seconds - seconds_last, 1e-9)
                seconds_last, tokens_last = state.train_seconds, state.tokens_seen
                # under Muon both rates: AdamW's (embeddings, gains) and Muon's (hidden matrices)
                muon = {"muon_lr": f"{cfg.muon_lr * lr / cfg.learning_rate:.2e}"} if cfg.optimizer == "muon" else {}
                bar.set_postfix(**({"step": step} if by_time else {}), loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", **muon,
                                tok_s=f"{tokens_per_s:,.0f}")
                scale = {"loss_scale": run.scaler.get_scale()} if run.scaler.is_enabled() else {}
                run.metrics.write({"kind": "train", "iter": step, "loss": loss_value, "lr": lr,
                                   "tokens_per_s": tokens_per_s, "time_s": state.train_seconds, **scale})

            # ---- stop, evaluate, save
            # a signal or the spent max_minutes budget stops every process at the same step; agreeing waits for
            # the GPU, so several processes agree at log and eval steps only (a signal may act log_interval late)
            stop_now, out_of_time = stop.requested, by_time and state.train_seconds >= cfg.max_minutes * 60
            if d.world > 1:
                agree = step % cfg.log_interval == 0 or step % cfg.eval_interval == 0
                stop_now, out_of_time = d.any([stop_now, out_of_time]) if agree else (False, False)
            if stop_now:
                reason = "signal"
                if step % cfg.eval_interval == 0:
                    last = run.evaluate(lr)  # a resume would not redo this step's eval: do it now (it saves)
                else:
                    run.save("latest")
                break
            if step % cfg.eval_interval == 0 or step >= cfg.max_iters or out_of_time:
                last = run.evaluate(lr)
                if cfg.early_stop_patience and state.evals_since_best >= cfg.early_stop_patience:
                    reason = "early_stop"
                    break
                if reached_bpb(last) <= cfg.target_val_bpb:
                    reason = "target"
                    break
            if out_of_time:
                reason = "max_minutes"
                break
    return finish(run, reason, last)


def finish(run: Run, reason: str, last: dict[str, Any]) -> dict[str, Any]:
    """The summary: the last line of metrics.jsonl and of the console."""
    state, val_split = run.state, run.meta["splits"]["val"]
    summary = {"kind": "summary", "iter": state.iter_num, "reason": reason, "best_val_loss": state.best_val_loss,
               "best_val_bpb": bits_per_byte(state.best_val_loss, val_split), "best_iter": state.best_iter,
               "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
               "params": run.raw_model.num_params()}
    if run.ema is not None:
        summary.update(best_ema_val_bpb=bits_per_byte(state.best_ema_val_loss, val_split),
                       best_ema_iter=state.best_ema_iter)
    if run.compiled is not None and run.compiled.error:
        summary["compile_error"] = run.compiled.error
    if run.d.master:
        run.metrics.write(summary)
        print(f"stopped ({reason}) at step {state.iter_num}: best val {state.best_val_loss:.4f} "
              f"({summary['best_val_bpb']:.3f} bpb) at step {state.best_iter}; checkpoints in {run.out_dir}")
        if reason == "target":
            of = " (the weight average's: ema.pt)" if reached_bpb(last) < last["val_bpb"] else ""
            print(f"reached val bpb {reached_bpb(last):.3f}{of} <= {run.cfg.target_val_bpb:g} in {state.iter_num:,} "
                  f"steps ({state.tokens_seen:,} tokens) and {state.train_seconds / 60:.1f} minutes of training steps")
        if run.metrics.wandb:
            run.metrics.wandb.finish()
    return summary


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        parse_config(TrainConfig, argv, prog="train.py", doc=__doc__.split("\n\n")[0])
    train(load_config(argv))


if __name__ == "__main__":
    cli(main)
