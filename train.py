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
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bookgpt.batches import Batches, Loader, read_data_meta
from bookgpt.checkpoint import FILES, check_resumable, checkpoint_path, load_checkpoint, save_checkpoint
from bookgpt.common import (CompiledWithFallback, autocast, bits_per_byte, deterministic_kernels, resolve_device,
                            resolve_dtype)
from bookgpt.config import GPTConfig, UserError, atomic_write_bytes, atomic_write_json, cli, config_dict, parse_config
from bookgpt.distill import Teacher, teacher_checkpoints
from bookgpt.distributed import Dist, StopFlag, setup_distributed, wrap_ddp
from bookgpt.optim import WeightAverage, dropout_at, lr_factor, make_optimizers, set_lr
from bookgpt.training import (Metrics, TrainConfig, check_writable, estimate_loss, load_config, remove_stale_temps,
                              rng_state, set_rng_state, train_step, validate)
from model import GPT

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


def load_teacher(runs: tuple[str, ...], meta: dict[str, Any], block_size: int, device: str) -> Teacher:
    """Distillation's teacher: the best.pt of each run, checked to fit the student (distill.teacher_checkpoints)."""
    return Teacher([GPT.from_checkpoint(ckpt, path, device) for ckpt, path in teacher_checkpoints(runs, meta, block_size)])


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
        self.teacher_runs = list(cfg.distill_from)
        self.teacher = load_teacher(cfg.distill_from, self.meta, cfg.block_size, self.device) if cfg.distill_from else None
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


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        parse_config(TrainConfig, argv, prog="train.py", doc=__doc__.split("\n\n")[0])
    train(load_config(argv))


if __name__ == "__main__":
    cli(main)
