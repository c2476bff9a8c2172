"""Prove the GPU path works, in one command: prepare, benchmark, train (bf16 and fp16, each stopped by
SIGTERM and resumed, digit for digit), the two-GPU preset's own DDP path, sample, evaluate and the app's
generation, each through the project's own scripts.

    python gpu_check.py                           # on a GPU machine (make gpu-check); sized for < 8 min on an H100
    python gpu_check.py --checks=train            # one part: bench, train or use (each < 5 min); the report merges them
    python gpu_check.py --nanogpt=../nanoGPT      # also race nanoGPT's model.py in the benchmarks
    python gpu_check.py --device=cpu --tiny       # the same checks at a tiny size on a machine without a GPU

Installs nothing, and downloads the book only when no copy is here (find_book); a missing package is one
error line before any work. Writes out_dir/report.md and report.json (an earlier part's checks on this
machine kept) and every command's output in out_dir/logs. Exit status 1 if a check failed, 0 if every
check that ran passed, 2 with no GPU here or data that cannot be prepared. Assertions only a GPU can
make (flash attention, NCCL) are reported "skipped (not a GPU)" on a CPU.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from bookgpt.checkpoint import load_checkpoint, load_run
from bookgpt.common import read_metrics, records_of, resolve_device, resolve_dtype
from bookgpt.config import UserError, atomic_write_bytes, atomic_write_json, cli, opt, parse_config, pip_hint, to_flags

ROOT = Path(__file__).resolve().parent
CHECKS = ("environment", "prepare", "bench_2x4090", "bench_best_gpu", "train_bf16", "train_fp16",
          "ddp_2x4090", "ddp_nccl", "sample", "evaluate", "app")
# Parts that each fit a 5-minute command on one GPU; environment and prepare run with every part (seconds).
PARTS = {"bench": ("bench_2x4090", "bench_best_gpu"), "train": ("train_bf16", "train_fp16"),
         "use": ("ddp_2x4090", "ddp_nccl", "sample", "evaluate", "app")}
ALWAYS = ("environment", "prepare")
NEEDS = ("numpy", "tiktoken", "regex", "tqdm", "matplotlib")  # what the scripts import (rustbpe: to prepare)
# Where the tests find the book (tests/testdata.py), then prepare.py's own download cache
BOOK_COPIES = (ROOT.parent / "shared" / "data" / "pg2600.txt", ROOT / "data" / "raw" / "testdata" / "data" / "pg2600.txt")
PROMPT = "Prince Andrew"
# --tiny: shapes a CPU runs in seconds; the checks, not the figures, are the point there
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4,
              "gradient_accumulation_steps": 1, "eval_iters": 4, "value_embeds": 1}
TINY_BENCH = {"n_layer": 1, "value_embeds": 0, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 2,
              "gradient_accumulation_steps": 1, "steps": 2, "warmup_steps": 1, "peak_size": 64,
              "sample_tokens": 20, "sample_prompt": 4, "compile": "false"}
GPU_BENCH = {"steps": 10, "warmup_steps": 2, "sample_tokens": 300}  # the benchmark's figures in ~1 minute a shape
CPU_TRAIN = {"device": "cpu", "dtype": "float32", "compile": "false"}  # a CPU trains eager in float32 here
MFU_TARGET = 0.40
NOT_GPU = "skipped (not a GPU)"


@dataclass
class CheckConfig:
    input: str = opt("", "the book for prepare.py ('' = a local copy if there is one, else prepare.py downloads it)")
    data_dir: str = opt("data/war_and_peace_bpe2048", "BPE-2048 data (prepared unless its meta.json exists)")
    out_dir: str = opt("out/gpu_check", "where the runs, the logs, report.md and report.json go")
    device: str = opt("cuda", "cuda, or cpu (with --tiny: the checks on a machine without a GPU)")
    steps: int = opt(100, "training steps per run of train_bf16 and train_fp16 (ddp_2x4090: 40)")
    nanogpt: str = opt("", "path of a nanoGPT checkout for bench.py to race ('' = not compared)")
    tiny: bool = opt(False, "tiny models and short benchmarks: seconds per check on a CPU")
    checks: tuple[str, ...] = opt((), f"parts ({', '.join(PARTS)}) or checks to run (none = all): {', '.join(CHECKS)}")
    timeout: float = opt(300.0, "seconds one command may run before its check fails")


class Failed(Exception):
    """A check's assertion did not hold; the message is the reason in the report."""


class Skipped(Exception):
    """A check that does not apply here; the message says why."""


def rel(path: str | Path) -> str:
    """A path as the scripts, run in the repository root, should get it: relative when inside the root."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def stderr_tail(text: str, n: int = 2) -> str:
    """The end of a command's stderr: its 'error: ...' line if it printed one (train.py's may come from a
    torchrun worker, above torchrun's own report), else the last lines; tqdm's redraws split apart."""
    lines = [l.strip() for l in re.split(r"[\r\n]+", text) if l.strip().strip("=")]
    errors = [l for l in lines if l.startswith("error:")]
    return (" | ".join(errors[-1:] or lines[-n:]) or "(nothing on stderr)")[-500:]


def compare_losses(straight: list[dict], resumed: list[dict], after: int, rel_tol: float = 0.0) -> dict[str, Any]:
    """Compare two runs' metrics.jsonl records past step `after`: each logged training loss ("train"
    records, key "loss") and each val loss ("eval" records). ok: the same steps were logged and every
    pair agrees within rel_tol of the unbroken run's value (0 = exactly)."""
    def points(records: list[dict]) -> dict[tuple[str, int], float]:
        keys = {"train": "loss", "eval": "val_loss"}
        return {(r["kind"], r["iter"]): float(r[keys[r["kind"]]]) for r in records
                if r.get("kind") in keys and r.get("iter", -1) > after}
    a, b = points(straight), points(resumed)
    diffs = {k: abs(a[k] - b[k]) for k in a.keys() & b.keys()}
    missing = sorted(a.keys() ^ b.keys(), key=lambda k: (k[1], k[0]))
    ok = bool(diffs) and not missing and all(d <= rel_tol * abs(a[k]) for k, d in diffs.items())
    return {"compared": len(diffs), "max_abs_diff": max(diffs.values(), default=0.0), "ok": ok,
            "missing": [f"{kind} {it}" for kind, it in missing[:5]]}


def chosen_checks(names: tuple[str, ...]) -> list[str]:
    """--checks: parts and check names -> the checks to run, in CHECKS order (environment and prepare always)."""
    if unknown := [s for s in names if s not in CHECKS and s not in PARTS]:
        raise UserError(f"unknown check(s) {', '.join(unknown)}; choose parts ({', '.join(PARTS)}) or checks "
                        f"({', '.join(CHECKS)})")
    wanted = {c for s in names for c in PARTS.get(s, (s,))}
    return [c for c in CHECKS if not names or c in wanted or c in ALWAYS]


def find_book(given: str) -> str:
    """The book prepare.py should read: --input, else $BOOKGPT_BOOK, else a local copy where the tests keep one;
    '' leaves it to prepare.py (its download cache, or a download)."""
    if given:
        return given if "://" in given else rel(given)
    if os.environ.get("BOOKGPT_BOOK"):
        return rel(os.environ["BOOKGPT_BOOK"])
    return next((rel(p) for p in BOOK_COPIES if p.is_file()), "")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def workers(pid: int) -> list[int]:
    """The processes torchrun `pid` started (Linux's /proc): the training processes themselves."""
    def parent(stat: Path) -> int:
        try:
            return int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return -1  # a process that ended while we looked
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if parent(stat) == pid]


class Checker:
    """Runs the project's scripts as a user would (in the repository root, output to out_dir/logs) and keeps
    what the report needs: the commands, each check's figures (for report.json) and the targets."""

    def __init__(self, cfg: CheckConfig) -> None:
        self.cfg, self.gpu = cfg, cfg.device == "cuda"
        self.out, self.data = Path(cfg.out_dir).resolve(), Path(cfg.data_dir).resolve()
        self.book = ""  # set by the preflight when the data must be prepared
        self.env = {k: v for k, v in os.environ.items() if k != "BOOKGPT_DIST_BACKEND"}  # each check sets its own
        if cfg.tiny and not self.gpu:
            self.env["OMP_NUM_THREADS"] = "1"  # tiny matmuls only lose time to threads
        self.commands: list[str] = []
        self.logs: Counter[str] = Counter()  # commands started per check, numbering its log files
        self.started: list[subprocess.Popen] = []
        self.figures: dict[str, dict[str, Any]] = {}
        absent = "not compared: pass --nanogpt=PATH" if not cfg.nanogpt else "not measured"
        self.targets = {"mfu": {"target": f"bookgpt MFU >= {MFU_TARGET:.0%} on the 2x4090 shape",
                                "status": "not measured" if self.gpu else NOT_GPU, "value": ""},
                        **{f"nanogpt_{s}": {"target": f"bookgpt tokens/s > nanoGPT's on the {s} shape",
                                            "status": absent, "value": ""} for s in ("2x4090", "best_gpu")}}

    def start(self, check: str, args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        """Start `python ARGS`; stdout and stderr go to out_dir/logs/CHECK-N.{out,err} (N counts its commands)."""
        env = env or {}
        self.commands.append(" ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(["python", *args])]))
        self.logs[check] += 1
        log = self.out / "logs" / f"{check}-{self.logs[check]}"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
            # a session of its own, so that a Ctrl-C here reaches stop_all, which ends it in order
            p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**self.env, **env}, stdout=out, stderr=err,
                                 start_new_session=True)
        self.started.append(p)
        return p, log

    def stop_all(self) -> None:
        """End every command still running. SIGTERM first: torchrun passes it on to its workers (which run in
        sessions of their own) and train.py stops after its step; SIGKILL for whatever hangs."""
        for p in (p for p in self.started if p.poll() is None):
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def finish(self, p: subprocess.Popen, log: Path, what: str, started: float | None = None) -> str:
        """Wait for a started command (--timeout from `started`, else from now): its stdout, or Failed
        with the end of its stderr."""
        try:
            p.wait(timeout=max(0.0, (started or time.monotonic()) + self.cfg.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop_all()
            raise Failed(f"{what} ran over --timeout={self.cfg.timeout:g} s (its output: {rel(log)}.err)") from None
        if p.returncode:
            err = Path(f"{log}.err").read_text(encoding="utf-8", errors="replace")
            raise Failed(f"{what} exited with status {p.returncode}: {stderr_tail(err)}")
        return Path(f"{log}.out").read_text(encoding="utf-8", errors="replace")

    def run(self, check: str, args: list[str], env: dict[str, str] | None = None) -> str:
        return self.finish(*self.start(check, args, env), what="torchrun" if args[0] == "-m" else args[0])

    def train_args(self, out: Path, steps: int, every: int, config: str = "config/wp_best_gpu.toml",
                   **more: Any) -> list[str]:
        """train.py on a preset, cut to `steps`; on a CPU float32 and eager; --tiny: tiny shapes."""
        keys = {"out_dir": rel(out), "data_dir": rel(self.data), "max_iters": steps, "lr_decay_iters": steps,
                "eval_interval": every, "log_interval": max(1, min(10, every // 2)), "early_stop_patience": 0,
                "warmup_iters": max(1, steps // 10)}  # the presets' 100 warmup steps are sized for thousands
        keys |= (TINY_MODEL if self.cfg.tiny else {}) | ({} if self.gpu else CPU_TRAIN) | more
        return [config, *to_flags(keys)]

    def train_stopped_and_resumed(self, check: str, args: list[str], out: Path, stop_at: int,
                                  env: dict[str, str] | None = None) -> int:
        """Run train.py (or torchrun: args start with -m) into `out`, SIGTERM its training processes once step
        `stop_at` is logged (train.py finishes the step, saves ckpt.pt, exits 0), then resume it to the end.
        Returns the step the stopped run saved."""
        p, log = self.start(check, args, env)
        started = time.monotonic()
        while p.poll() is None and time.monotonic() < started + self.cfg.timeout:
            if any(r["iter"] >= stop_at for r in records_of(read_metrics(out / "metrics.jsonl")[0], "train")):
                # train.py itself, or every process of a torchrun job, as a scheduler's preemption signals them
                for pid in (workers(p.pid) if args[0] == "-m" else [p.pid]):
                    os.kill(pid, signal.SIGTERM)
                self.commands[-1] += f"   # SIGTERM once step {stop_at} is logged"
                break
            time.sleep(0.02)
        self.finish(p, log, "the run to stop", started)
        at = load_checkpoint(out / "ckpt.pt")["iter_num"]
        steps = int(next(a for a in args if a.startswith("--max_iters=")).split("=")[1])
        if at >= steps:
            raise Failed(f"the run reached step {at} before SIGTERM stopped it: nothing to resume (more --steps)")
        self.run(check, [*args, "--init_from=resume"], env)
        final = load_checkpoint(out / "ckpt.pt")
        if final["iter_num"] != steps:
            raise Failed(f"the resumed run's ckpt.pt is at step {final['iter_num']}, not {steps}")
        return at


def compiled_as_asked(*runs: Path) -> None:
    """Each run finished (its metrics.jsonl ends in a summary) without a compile that fell back to eager: the
    GPU path is the compiled one."""
    for out in runs:
        summary = (records_of(read_metrics(out / "metrics.jsonl")[0], "summary") or [None])[-1]
        if summary is None:
            raise Failed(f"{rel(out)}/metrics.jsonl has no summary: the run did not finish")
        if summary.get("compile_error"):
            raise Failed(f"torch.compile fell back to eager in {rel(out)}: {summary['compile_error']}")


# ----------------------------------------------------------------------------- the checks, in order

def check_environment(c: Checker) -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(n)]
    caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(n)})
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if n else None
    try:
        auto = resolve_dtype("auto", c.cfg.device)
    except UserError as e:
        auto = f"refused ({e})"
    c.figures["environment"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
                                "python": platform.python_version(), "capability": caps, "bf16_native": bf16,
                                "auto_dtype": auto}
    return (f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
            f"{n} GPU(s){': ' if n else ''}{', '.join(gpus)}; compute capability {', '.join(caps) or '-'}; "
            f"native bf16 {'-' if bf16 is None else bf16}; dtype=auto on {c.cfg.device} -> {auto}")


def check_prepare(c: Checker) -> str:
    meta = c.data / "meta.json"
    how = "reused"
    if not meta.is_file():
        c.run("prepare", ["prepare.py", "--tokenizer=bpe", "--vocab_size=2048", f"--out_dir={rel(c.data)}"]
              + ([f"--input={c.book}"] if c.book else []))
        how = f"prepared from {c.book or 'the downloaded book'}"
    m = json.loads(meta.read_text(encoding="utf-8"))
    if m["tokenizer"]["kind"] != "bpe":
        raise Failed(f"{rel(c.data)} holds {m['tokenizer']['kind']} data, not BPE: point --data_dir at a BPE folder")
    return (f"{how} {rel(c.data)}: {m['tokenizer']['kind']}, vocab {m['vocab_size']}, "
            f"{m['splits']['train']['tokens']:,} train tokens")


def check_bench(c: Checker, shape: str, toml: str, vocab: int, extra: dict[str, Any]) -> str:
    out = c.out / f"bench_{shape}.json"
    out.unlink(missing_ok=True)  # a result left by an earlier check must not pass this one
    keys = extra | {"out": rel(out), "vocab_size": vocab} | ({"nanogpt": rel(c.cfg.nanogpt)} if c.cfg.nanogpt else {})
    keys |= (TINY_BENCH if c.cfg.tiny else GPU_BENCH if c.gpu else {}) | ({} if c.gpu else {"device": "cpu"})
    c.run(f"bench_{shape}", ["bench.py", toml, "--compare", *to_flags(keys)])
    res = json.loads(out.read_text(encoding="utf-8"))
    if res["config"]["vocab_size"] != vocab:  # never another vocabulary than the one named
        raise Failed(f"bench.py measured vocabulary {res['config']['vocab_size']}, not {vocab}")
    b = next(r for r in res["train"] if r["name"] == "bookgpt")
    s = res.get("sampling") or {}
    figures = {k: b[k] for k in ("dtype", "attention", "tokens_per_s", "mfu", "optimizer_share", "compile_error")}
    c.figures[f"bench_{shape}"] = figures | {"ratio_plain": res["ratio"], "ratio_nanogpt": res.get("ratio_nanogpt"),
                                             "sampling_ok": s.get("ok"), "gpu": res["machine"].get("gpu"),
                                             "vocab_size": vocab, "compile_s": b.get("compile_s")}
    details = (f"vocab {vocab}, {b['dtype']} {b['tokens_per_s']:,.0f} tokens/s, MFU {pct(b['mfu'])}, attention "
               f"{b['attention']}, optimizer {pct(b['optimizer_share'])} of a step, {res['ratio']:.2f}x plain")
    problems = []
    if c.gpu and b["dtype"] == "bfloat16" and not set(b["attention"].split("+")) <= {"flash", "cudnn"}:
        problems.append(f"bookgpt's bf16 row runs attention '{b['attention']}', not flash or cudnn")
    elif not c.gpu:
        details += f" (flash/cudnn: {NOT_GPU})"
    if b["compile_error"]:
        problems.append(f"torch.compile failed: {b['compile_error']}")
    if not s.get("ok"):
        problems.append(f"KV-cache sampling check failed ({s.get('check')}, logit error {s.get('max_logit_error')})")
    details += f"; KV cache: {s.get('check')}, max logit error {s.get('max_logit_error', math.nan):.1e}"
    if shape == "2x4090" and c.gpu:
        c.targets["mfu"].update(status="met" if (b["mfu"] or 0) >= MFU_TARGET else "not met", value=pct(b["mfu"]))
    if "ratio_nanogpt" in res:
        r = res["ratio_nanogpt"]
        c.targets[f"nanogpt_{shape}"].update(status="met" if r > 1 else "not met", value=f"{r:.2f}x nanoGPT's")
        details += f", {r:.2f}x nanoGPT"
    if problems:
        raise Failed("; ".join(problems) + f" ({details})")
    return details


def cpu_fp16_problem() -> str:
    """Why float16 autocast with a GradScaler cannot train on this CPU ('' when it can)."""
    try:
        x = torch.randn(4, 4, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.float16):
            y = (x @ x).float().sum()
        torch.amp.GradScaler("cpu").scale(y).backward()
        return ""
    except Exception as e:  # noqa: BLE001 - whatever this torch build cannot do, the reason is reported
        return f"{type(e).__name__}: {e}"


def check_train(c: Checker, dtype: str) -> str:
    """An unbroken run, and one stopped by SIGTERM halfway then resumed, both with deterministic kernels:
    the losses after the resume must be the unbroken run's, digit for digit."""
    name, steps = f"train_{dtype}", c.cfg.steps
    extra = {"dtype": "float16"} if dtype == "fp16" else {"dtype": "bfloat16"} if c.gpu else {}  # CPU: float32
    if dtype == "fp16" and not c.gpu and (why := cpu_fp16_problem()):
        raise Skipped(f"this CPU's torch cannot train in float16 autocast ({why})")
    if dtype == "bf16" and c.gpu and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise Skipped("this GPU has no native bf16 (before Ampere): train_fp16 is its path")
    straight, resumed = c.out / f"{dtype}_straight", c.out / f"{dtype}_resumed"
    for d in (straight, resumed):
        shutil.rmtree(d, ignore_errors=True)  # from scratch: nothing of an earlier check may be read as new
    # flash attention's backward and Inductor's scatter-adds accumulate in a random order unless told
    # otherwise (common.deterministic_kernels): without it two runs of one seed drift from the first step
    extra |= {"deterministic": "true", "eval_iters": 4 if c.cfg.tiny else 10}
    if dtype == "fp16" and c.gpu and torch.cuda.is_bf16_supported(including_emulation=False):
        # here fp16 stands in for a T4's numerics and GradScaler; its compiled kernels (Triton for sm75) have no
        # stand-in, so it runs eager and spares a cold compile (~1 minute). A T4 runs this check compiled.
        extra["compile"] = "false"
    c.run(name, ["train.py", *c.train_args(straight, steps, max(1, steps // 4), **extra)])
    at = c.train_stopped_and_resumed(name, ["train.py", *c.train_args(resumed, steps, max(1, steps // 4), **extra)],
                                     resumed, steps // 2)
    compiled_as_asked(straight, resumed)
    (train_a, eval_a), (train_b, eval_b) = ((records_of(r, "train"), records_of(r, "eval"))
                                            for r, _ in (read_metrics(d / "metrics.jsonl") for d in (straight, resumed)))
    cmp = compare_losses(train_a + eval_a, train_b + eval_b, at)
    c.figures[name] = {"resume_step": at, "compared": cmp["compared"], "max_abs_diff": cmp["max_abs_diff"],
                       "rel_tol": 0.0, "tokens_per_s": train_a[-1].get("tokens_per_s"),
                       "val_loss": eval_a[-1]["val_loss"], "deterministic": True}
    used = f"{extra.get('dtype', 'float32')}, {'compiled' if c.gpu and extra.get('compile') != 'false' else 'eager'}"
    details = (f"{used}, deterministic kernels, {train_a[-1].get('tokens_per_s', 0):,.0f} tokens/s, val "
               f"{eval_a[-1]['val_loss']:.3f}; SIGTERM at step {at}, resumed to {steps}: {cmp['compared']} losses "
               f"after it differ by at most {cmp['max_abs_diff']:.2e} (must be exactly equal)")
    if not cmp["ok"]:
        raise Failed(details + (f"; logged by one run only: {', '.join(cmp['missing'])}" if cmp["missing"] else ""))
    return details


def check_ddp(c: Checker, name: str) -> str:
    """The two-GPU preset's own path: torchrun with two processes, device=cuda (each process maps itself to a
    GPU), compile on, two micro-batches per process (no_sync on the first), stopped by SIGTERM and resumed;
    ckpt.pt must hold both processes' random streams. One GPU shares itself over cuda:gloo (NCCL's rules);
    ddp_nccl runs the same over NCCL when two GPUs are visible."""
    if name == "ddp_nccl":
        if not c.gpu:
            raise Skipped("not a GPU")
        if torch.cuda.device_count() < 2:
            raise Skipped(f"{torch.cuda.device_count()} GPU visible; NCCL needs a GPU per process")
        backend = "nccl"
    else:
        backend = "cuda:gloo" if c.gpu else "cpu:gloo"
    env = {"BOOKGPT_DIST_BACKEND": backend, **({} if c.gpu else {"OMP_NUM_THREADS": "1"})}
    out, steps = c.out / name, 40
    shutil.rmtree(out, ignore_errors=True)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    args = c.train_args(out, steps, 10, "config/wp_char_2x4090.toml", gradient_accumulation_steps=4,
                        eval_iters=4 if c.cfg.tiny else 10, **({"device": "cuda", "compile": "true"} if c.gpu else {}))
    at = c.train_stopped_and_resumed(name, torchrun + args, out, steps // 2, env)
    ckpt = load_checkpoint(out / "ckpt.pt")
    if len(ckpt["rng"]) != 2:
        raise Failed(f"ckpt.pt holds {len(ckpt['rng'])} processes' random streams, not 2")
    compiled_as_asked(out)
    how = "cuda, compiled" if c.gpu else "cpu, eager"
    return (f"2 processes over {backend} ({how}), 2 micro-batches each: SIGTERM at step {at}, resumed to {steps}; "
            f"ckpt.pt holds both processes' streams")


def run_dir(c: Checker) -> Path:
    """train_bf16's unbroken run (train_fp16's on a GPU without bf16): what sample, evaluate and app read."""
    for d in (c.out / "bf16_straight", c.out / "fp16_straight"):
        if (d / "best.pt").is_file():
            return d
    raise Failed("no trained run to use: run the train part first (--checks=train)")


def check_sample(c: Checker) -> str:
    out = c.run("sample", ["sample.py", f"--out_dir={rel(run_dir(c))}", f"--device={c.cfg.device}",
                           "--num_samples=1", "--max_new_tokens=100", f"--prompt={PROMPT}"])
    text = "\n".join(l for l in out.splitlines() if not l.startswith("---------- sample")).strip()
    if len(text) <= len(PROMPT):
        raise Failed(f"sample.py wrote nothing after the prompt: {out[-200:]!r}")
    return f"{len(text) - len(PROMPT)} characters after the prompt: {text[:60]!r}..."


def check_evaluate(c: Checker) -> str:
    path = run_dir(c) / "eval.json"
    path.unlink(missing_ok=True)  # an earlier one must not pass this check
    c.run("evaluate", ["evaluate.py", f"--out_dir={rel(run_dir(c))}", f"--device={c.cfg.device}",
                       "--num_prompts=2", "--gen_tokens=50", "--baselines=false",
                       "--two_sample_chars=0"])  # the classifier runs on the CPU alone: nothing here for a GPU
    if not path.is_file():
        raise Failed(f"evaluate.py exited 0 but wrote no {rel(path)}")
    ev = json.loads(path.read_text(encoding="utf-8"))
    bpb = ev["likelihood"]["bpb"]
    if not math.isfinite(bpb):
        raise Failed(f"eval.json's bpb is {bpb}")
    return f"{bpb:.3f} bpb on {ev['data']['split']} ({ev['data']['split_tokens']:,} tokens, {ev['settings']['dtype']})"


def check_app(c: Checker) -> str:
    """The page's generation, its steps advanced from a worker thread as Gradio advances them."""
    from concurrent.futures import ThreadPoolExecutor

    from bookgpt.sampling import stream_text
    from model import GPT
    run = str(run_dir(c))  # in this process: an absolute path, whatever the working directory
    c.commands.append(f"# in this process: the page's model (best.pt of {run!r} on {c.cfg.device!r}), then "
                      f"bookgpt.sampling.stream_text(model, tokenizer, {PROMPT!r}, 50) on a worker thread, as Gradio does")
    device = resolve_device(c.cfg.device)
    dtype = resolve_dtype("auto", device)
    ckpt, info = load_run(run)
    stream = stream_text(GPT.from_checkpoint(ckpt, info["path"], device), info["tokenizer"], PROMPT, 50, dtype=dtype)
    pieces = [next(stream, "")]  # the first step here, the rest on another thread
    with ThreadPoolExecutor(max_workers=1) as pool:
        while (piece := pool.submit(next, stream, None).result()) is not None:
            pieces.append(piece)
    text = "".join(pieces)
    if not text:
        raise Failed("the app's generation gave no text")
    return f"{len(text)} characters generated on {device} ({dtype}), two threads: {text[:60]!r}..."


FUNCS: dict[str, Callable[[Checker], str]] = {
    "environment": check_environment, "prepare": check_prepare,
    # the char shape's data_dir is a folder without meta.json: the 104-character vocabulary, named
    "bench_2x4090": lambda c: check_bench(c, "2x4090", "config/wp_char_2x4090.toml", 104,
                                          {"data_dir": rel(c.out / "no_data")}),
    "bench_best_gpu": lambda c: check_bench(c, "best_gpu", "config/wp_best_gpu.toml",
                                            json.loads((c.data / "meta.json").read_text())["vocab_size"],
                                            {"data_dir": rel(c.data)}),
    "train_bf16": lambda c: check_train(c, "bf16"), "train_fp16": lambda c: check_train(c, "fp16"),
    "ddp_2x4090": lambda c: check_ddp(c, "ddp_2x4090"), "ddp_nccl": lambda c: check_ddp(c, "ddp_nccl"),
    "sample": check_sample, "evaluate": check_evaluate, "app": check_app}


def preflight(c: Checker) -> None:
    """What the checks need and cannot get without a network, as one error line before any GPU work."""
    if missing := " ".join(m for m in NEEDS if importlib.util.find_spec(m) is None):
        raise UserError(f"missing Python package(s): {missing}; {pip_hint(missing)}")
    if not (c.data / "meta.json").is_file():
        from bookgpt.tokenizer import require_rustbpe
        require_rustbpe()  # the BPE is learned here: say how to get rustbpe, or to copy prepared data
        c.book = find_book(c.cfg.input)
        if c.book and "://" not in c.book and not (ROOT / c.book).is_file():
            raise UserError(f"input file not found: {c.book} (pass --input=PATH or BOOK=PATH of the book)")


# ----------------------------------------------------------------------------- the report

def merge(c: Checker, results: list[dict[str, Any]], name: str) -> tuple[list[dict[str, Any]], list[dict]]:
    """This run's results, with those of checks it did not run taken from the report already in out_dir when
    that one is from this machine (device, torch, --tiny): parts run one after another make one report."""
    targets = list(c.targets.values())
    try:
        earlier = json.loads((c.out / "report.json").read_text(encoding="utf-8"))
        if (earlier["device_name"], earlier["torch"], earlier["config"]["tiny"]) != (name, torch.__version__, c.cfg.tiny):
            return results, targets
    except (OSError, ValueError, KeyError, TypeError):
        return results, targets
    kept = {r["name"]: r for r in earlier["checks"] if r.get("ran")}
    merged = [r if r["ran"] or r["name"] not in kept else kept[r["name"]] for r in results]
    if not any(r["ran"] and r["name"].startswith("bench") for r in results):
        targets = earlier.get("targets", targets)
    return merged, targets


def write_report(c: Checker, results: list[dict[str, Any]], exit_status: int) -> None:
    cfg, now = c.cfg, datetime.now().astimezone()
    if torch.cuda.is_available() and c.gpu:
        name = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        name = "no CUDA GPU" if c.gpu else f"CPU ({platform.processor() or platform.machine()})"
    results, targets = merge(c, results, name)
    data = {"date": now.isoformat(timespec="seconds"), "device": cfg.device, "device_name": name,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "config": asdict(cfg), "exit_status": exit_status, "checks": results, "targets": targets}
    shown = {"passed": "passed", "failed": "**FAILED**", "skipped": "skipped"}
    md = [f"# GPU check, {now:%Y-%m-%d %H:%M}", "",
          f"{name}; Python {platform.python_version()}, torch {torch.__version__}; device {cfg.device}"
          f"{', --tiny' if cfg.tiny else ''}. Exit status {exit_status} (of the checks run at {now:%H:%M}).", "",
          "| check | status | seconds | ran at | details |", "|---|---|---:|---|---|"]
    md += [f"| {r['name']} | {shown[r['status']]} | {r['seconds']:.1f} | {r.get('at', '-')} | "
           f"{r['details'].replace('|', '/').replace(chr(10), ' ')} |" for r in results]
    md += ["", "## Targets", "", *(f"- {t['target']}: **{t['status']}**{' (' + t['value'] + ')' if t['value'] else ''}"
                                   for t in targets)]
    md += ["", "## Commands", "", f"Run in the repository root; each one's output is in {rel(c.out / 'logs')}.", "",
           "```", *(cmd for r in results for cmd in r.get("commands", [])), "```", ""]
    atomic_write_json(c.out / "report.json", data)
    atomic_write_bytes(c.out / "report.md", "\n".join(md).encode())


def run_check(c: Checker, name: str) -> tuple[str, str]:
    """(status, details) of one check."""
    try:
        return "passed", FUNCS[name](c)
    except Skipped as e:
        return "skipped", str(e)
    except (Failed, UserError) as e:
        return "failed", str(e)
    except Exception as e:  # noqa: BLE001 - a bug met by one check is its failure; the others still run
        return "failed", f"{type(e).__name__}: {e}"


def main(argv: list[str]) -> None:
    cfg = parse_config(CheckConfig, argv, prog="gpu_check.py", doc=__doc__.split("\n\n")[0])
    if cfg.device not in ("cuda", "cpu"):
        raise UserError(f"bad value for 'device': {cfg.device!r}; use cuda, or cpu (with --tiny)")
    if cfg.steps < 8:
        raise UserError(f"steps must be at least 8 (the run is stopped halfway and evaluated 4 times), got {cfg.steps}")
    chosen = chosen_checks(cfg.checks)
    c = Checker(cfg)
    no_gpu = c.gpu and not torch.cuda.is_available()
    if not no_gpu:
        preflight(c)
    results, stop = [], ""
    try:
        for name in CHECKS:
            t0, status, ran = time.perf_counter(), "skipped", False
            details = "no CUDA GPU here" if no_gpu else stop or "not selected (--checks)"
            before = len(c.commands)
            if not no_gpu and not stop and name in chosen:
                print(f"{name:<15}", end=" ", flush=True)
                status, details = run_check(c, name)
                ran = True
                print(f"{'FAILED' if status == 'failed' else status} ({time.perf_counter() - t0:.1f} s): {details}",
                      flush=True)
                if name == "prepare" and status == "failed":  # every later check needs the data
                    stop = "not run: the BPE data could not be prepared"
            results.append({"name": name, "status": status, "seconds": time.perf_counter() - t0, "details": details,
                            "figures": c.figures.get(name, {}), "ran": ran, "commands": c.commands[before:],
                            "at": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M") if ran else "-"})
    finally:
        c.stop_all()  # after Ctrl-C too: the commands run in sessions of their own, out of the terminal's reach
    exit_status = 2 if no_gpu or stop else 1 if any(r["status"] == "failed" for r in results) else 0
    write_report(c, results, exit_status)
    print(f"wrote {rel(c.out / 'report.md')} and report.json")
    if no_gpu:
        raise UserError(f"no CUDA GPU here (torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); "
                        f"wrote {rel(c.out / 'report.md')} with every check skipped (what to do: run on a GPU machine, "
                        f"or --device=cpu --tiny to try the checks at a tiny size on this CPU)")
    if stop:
        raise UserError(f"cannot prepare the BPE data in {rel(c.data)}: {results[1]['details']}")
    if exit_status:
        raise SystemExit(exit_status)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so main's `finally` ends the commands
    cli(main)
