"""Config-file sweeps: one training run per grid point or variant, then a results table and plot.

    python sweep.py config/sweeps/lr_size.toml --dry_run      # list the runs, run nothing
    python sweep.py config/sweeps/lr_size.toml --max_minutes=1
    python sweep.py config/sweeps/lr_size.toml --nproc_per_node=2   # each run through torchrun

A sweep file is TOML with four reserved keys:

    base = ["config/wp_char_cpu.toml"]   # train.py config files, applied in order
    [fixed]                              # overrides for every run
    max_minutes = 5
    [grid]                               # every combination of these values
    learning_rate = [1e-3, 3e-3]
    [[variants]]                         # and/or explicit runs; each is combined with the grid
    name = "small"                       # optional: names the variant in run names
    n_layer = 4

Each run trains in its own process (`python train.py BASE... --key=value ... --out_dir=RUN_DIR`), so a
crash cannot take the sweep down, in out/sweeps/NAME/RUN with RUN built from the swept values
(small_lr0.003). Every run's full config is checked before the first one starts. A failed run is
recorded with its error and the sweep goes on. Running the same command again skips finished runs
and resumes interrupted ones (--init_from=resume). After every run, out/sweeps/NAME/results.csv,
results.md and val_bpb.png are rewritten. Command-line keys of train.py (--max_minutes=1,
--device=cuda) apply to every run.

Here: running the runs, one process each. What a sweep is (its file read and checked, run names) and its
results table and plot: bookgpt/sweeps.py. docs/sweeps.md is the manual.
"""
from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bookgpt.common import read_metrics
from bookgpt.config import (UserError, apply_overrides, atomic_write_json, cli, config_dict, format_help,
                            opt, split_argv, to_flags, unknown_key)
from bookgpt.sweeps import (Run, Sweep, check_keys, describe, finished_summary, load_sweep, read_record, result_row,
                            write_results)
from bookgpt.tokenizer import prepare_hint
from bookgpt.training import TrainConfig, saved_config

TRAIN = Path(__file__).resolve().parent / "train.py"
# config.json keys that may differ between attempts of one run without changing what it trains
NOT_COMPARED = {"out_dir", "init_from", "wandb_log", "wandb_project", "wandb_run_name", "wandb_group"}
STOP_GRACE_S = 120  # after SIGTERM a run finishes its step and saves; then it is killed


@dataclass
class SweepOptions:
    dry_run: bool = opt(False, "list the runs (what would happen to each) and their commands; run nothing")
    nproc_per_node: int = opt(0, "run each training through torchrun with N processes (0 = plain python)")
    timeout_minutes: float = opt(0.0, "stop a run after this much wall time (SIGTERM: it saves ckpt.pt); 0 = off")
    out_root: str = opt("out/sweeps", "a sweep writes to OUT_ROOT/NAME/ (NAME: the sweep file's name)")
    show_output: bool = opt(False, "echo each run's output here as well as into RUN/train.log")


# ----------------------------------------------------------------------------- before running

def missing_data(sweep: Sweep) -> list[str]:
    """One message per data_dir that prepare.py has not written yet."""
    users: dict[str, list[str]] = {}
    for r in sweep.runs:
        users.setdefault(r.cfg.data_dir, []).append(r.name)
    return [f"no prepared data in {d} (runs {', '.join(names)}): run {prepare_hint(d)}"
            for d, names in users.items() if not (Path(d) / "meta.json").is_file()]


# ----------------------------------------------------------------------------- a run's state on disk

def run_state(out_dir: Path) -> str:
    """finished (skip), interrupted (resume from ckpt.pt) or new (start from scratch)."""
    if finished_summary(read_metrics(out_dir / "metrics.jsonl")[0]):
        return "finished"
    return "interrupted" if (out_dir / "ckpt.pt").is_file() else "new"


def config_changes(run: Run) -> list[str]:
    """Keys whose value differs from the config a run already in its folder was trained with."""
    path = run.out_dir / "config.json"
    if not path.is_file():
        return []
    try:
        was = config_dict(saved_config(path))  # a key it lacks: the behaviour the run had (training.saved_config)
    except UserError as e:
        return [f"{path} is unreadable ({e})"]
    now = config_dict(run.cfg)
    return [f"{k}: {was[k]!r} there vs {v!r} now" for k, v in now.items() if k not in NOT_COMPARED and was[k] != v]


# ----------------------------------------------------------------------------- running one training

def command(run: Run, opts: SweepOptions, base: list[str], resume: bool) -> list[str]:
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={opts.nproc_per_node}"]
    return [sys.executable, *(torchrun if opts.nproc_per_node > 0 else []), str(TRAIN), *base, *to_flags(run.overrides),
            f"--init_from={'resume' if resume else 'scratch'}"]


def _pump(stream: io.BufferedReader, log: io.BufferedWriter, echo: bool) -> None:
    """Copy a run's output into its log (and here), chunk by chunk so tqdm's \\r lines pass through."""
    while chunk := stream.read1(65536):
        log.write(chunk)
        log.flush()
        if echo:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (train.py saves ckpt.pt and exits; torchrun passes it on to its
    workers); kill it if it has not gone after STOP_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # or a second Ctrl-C: do not wait for the save
            continue


def error_line(log_path: Path) -> str:
    """The line that says why a run's last attempt failed: train.py's 'error: ...', else a traceback's
    last line, else its last line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "no log"
    # the log holds every attempt; execute() starts each with "$ command"
    tail = tail.rsplit("\n$ ", 1)[-1].split("\n", 1)[-1]
    lines = [l.strip() for l in re.split(r"[\r\n]+", tail) if l.strip()]
    for pattern in (r"^error: ", r"^[\w.]*(Error|Exception|Interrupt)\b"):
        for line in reversed(lines):
            if re.match(pattern, line):
                return line.removeprefix("error: ")[:400]
    return lines[-1][:400] if lines else "no output"


def execute(run: Run, sweep: Sweep, opts: SweepOptions) -> dict[str, Any]:
    """Train one run to the end (or failure, timeout, interruption); returns and saves its record."""
    resume = run_state(run.out_dir) == "interrupted"
    cmd = command(run, opts, sweep.base, resume)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.out_dir / "train.log"
    record = read_record(run.out_dir)
    record.update(name=run.name, attempts=record.get("attempts", 0) + 1, command=shlex.join(cmd), log=str(log_path))
    timed_out = interrupted = False
    t0 = time.time()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        log.flush()
        # its own process group, so a timeout or Ctrl-C reaches torchrun's workers too, via _stop
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, opts.show_output), daemon=True)
        pump.start()
        try:
            proc.wait(timeout=opts.timeout_minutes * 60 or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        except KeyboardInterrupt:
            interrupted = True
            _stop(proc)
        pump.join(timeout=30)
    wall = time.time() - t0
    state = run_state(run.out_dir)
    if state == "finished":
        status, error = "finished", ""
    elif timed_out:
        status, error = "timeout", f"stopped by --timeout_minutes={opts.timeout_minutes:g}; run the sweep again to resume"
    elif interrupted or (proc.returncode == 0 and state == "interrupted"):
        status, error = "interrupted", "interrupted; run the sweep again to resume"
    else:
        status = "failed"
        error = error_line(log_path) if proc.returncode else "train.py exited without a summary in metrics.jsonl"
    record.update(status=status, error=error, returncode=proc.returncode, resumed=resume,
                  wall_s=round(record.get("wall_s", 0.0) + wall, 2),
                  finished_at=datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(run.out_dir / "sweep_run.json", record)
    if interrupted:
        raise KeyboardInterrupt
    return record


# ----------------------------------------------------------------------------- driver

def sweep_lock(sweep_dir: Path) -> io.TextIOWrapper:
    """Hold an exclusive lock on the sweep's folder: two sweep.py processes would train the same runs.
    The lock goes when the returned file is closed (or the process dies)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    f = open(sweep_dir / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another sweep.py is already running the sweep in {sweep_dir}; wait for it or stop it") from None
    return f


def parse_args(argv: list[str]) -> tuple[str, SweepOptions, dict[str, str]]:
    """The sweep file, sweep.py's own options, and train.py keys that apply to every run."""
    files, raw = split_argv(argv)
    if len(files) != 1:
        raise UserError("give one sweep file: python sweep.py config/sweeps/NAME.toml [--dry_run] [--key=value ...]")
    option_keys = [f.name for f in dataclasses.fields(SweepOptions)]
    train_keys = [f.name for f in dataclasses.fields(TrainConfig)]
    for k in raw:
        if k not in option_keys and k not in train_keys:
            raise unknown_key(k, option_keys + train_keys, " on the command line")
    opts = apply_overrides(SweepOptions(), {k: v for k, v in raw.items() if k in option_keys}, " on the command line")
    if opts.nproc_per_node < 0 or opts.timeout_minutes < 0:
        raise UserError("--nproc_per_node and --timeout_minutes must be 0 or more")
    train_overrides = {k: v for k, v in raw.items() if k in train_keys}
    check_keys(train_overrides, "the command line")
    return files[0], opts, train_overrides


def check_runnable(sweep: Sweep, opts: SweepOptions) -> dict[str, str]:
    """What load_sweep cannot see in the file alone: the launcher, and runs already on disk; each run's state."""
    states = {r.name: run_state(r.out_dir) for r in sweep.runs}
    for r in sweep.runs:
        if opts.nproc_per_node > 1 and r.cfg.gradient_accumulation_steps % opts.nproc_per_node:
            raise UserError(f"run {r.name}: gradient_accumulation_steps={r.cfg.gradient_accumulation_steps} must be "
                            f"divisible by --nproc_per_node={opts.nproc_per_node}; set it in the sweep's [fixed]")
    changed = [f"{r.out_dir} ({'; '.join(c)})" for r in sweep.runs
               if states[r.name] != "new" and (c := config_changes(r))]
    if changed:
        raise UserError(f"runs already in {sweep.dir} were trained with another config: {', '.join(changed)}; "
                        f"delete those folders to retrain them, or pass another --out_root")
    return states


ACTIONS = {"finished": "finished, skip", "interrupted": "interrupted, resume from ckpt.pt", "new": "start"}


def print_plan(sweep: Sweep, opts: SweepOptions, states: dict[str, str]) -> None:
    counts = {s: sum(v == s for v in states.values()) for s in ACTIONS}
    print(f"sweep {sweep.name} ({sweep.path}): {len(sweep.runs)} runs in {sweep.dir}/ ({counts['finished']} finished, "
          f"{counts['interrupted']} to resume, {counts['new']} to start)")
    for i, r in enumerate(sweep.runs, 1):
        print(f"  [{i}/{len(sweep.runs)}] {r.name}: {ACTIONS[states[r.name]]}")
        if opts.dry_run:
            print(f"      {shlex.join(command(r, opts, sweep.base, states[r.name] == 'interrupted'))}")


def run_sweep(sweep: Sweep, opts: SweepOptions, states: dict[str, str]) -> int:
    """Train every run that is not finished, one at a time; results are rewritten after each."""
    print_plan(sweep, opts, states)
    write_results(sweep)
    n = len(sweep.runs)
    try:
        for i, run in enumerate(sweep.runs, 1):
            if states[run.name] == "finished":
                continue
            verb = "resuming" if run_state(run.out_dir) == "interrupted" else "starting"
            print(f"[{i}/{n}] {run.name}: {verb} (log: {run.out_dir / 'train.log'})", flush=True)
            execute(run, sweep, opts)
            print(f"[{i}/{n}] {run.name}: {describe(result_row(run, sweep))}", flush=True)
            write_results(sweep)
    except KeyboardInterrupt:
        write_results(sweep)
        print(f"sweep {sweep.name} interrupted; finished runs are kept and the running one saved ckpt.pt where it "
              f"could. Run the same command again to resume.", file=sys.stderr)
        return 130
    rows = write_results(sweep)
    done = [r for r in rows if r["status"] == "finished"]
    print(f"sweep {sweep.name}: {len(done)} of {n} runs finished" +
          (f"; best {done[0]['run']} at {done[0]['best_val_bpb']:.4f} val bpb" if done else "") +
          f"; results in {sweep.dir / 'results.md'}")
    return 0 if len(done) == n else 1


def main(argv: list[str]) -> int:
    """Returns the exit status: 0 when every run finished, 1 when some failed, 130 when interrupted."""
    if any(a in ("-h", "--help") for a in argv):
        print("usage: python sweep.py config/sweeps/NAME.toml [--dry_run] [--option=value ...] [--train_key=value ...]")
        print(format_help(SweepOptions, "sweep.py", __doc__).split("\n", 1)[1].rstrip())
        print("  any train.py key (python train.py --help) applies to every run, e.g. --max_minutes=1")
        return 0
    path, opts, train_overrides = parse_args(argv)
    sweep = load_sweep(path, train_overrides, opts.out_root)
    missing = missing_data(sweep)
    if opts.dry_run:
        print_plan(sweep, opts, check_runnable(sweep, opts))
        for m in missing:
            print(f"warning: {m}")
        return 0
    if missing:
        raise UserError("; ".join(missing))
    lock = sweep_lock(sweep.dir)
    try:
        return run_sweep(sweep, opts, check_runnable(sweep, opts))
    finally:
        lock.close()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's SIGTERM stops the sweep like Ctrl-C
    cli(lambda argv: sys.exit(main(argv)))
