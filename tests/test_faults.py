"""Faults during training: kill -9 at random moments and in the middle of a checkpoint write,
SIGTERM (once, and again during the save), a DDP rank dying, a non-finite loss, a full or
unwritable disk. Each must leave the last good checkpoints loadable, and a resumed run must
end exactly where a run that was never interrupted ends.

Real processes are killed here, so these tests start train.py with subprocess; everything
that needs no process boundary runs in-process to keep the file fast. The random kill times
come from BOOKGPT_KILL_SEED (printed on failure) so a failing sequence can be replayed.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import train as train_mod
from bookgpt.checkpoint import load_checkpoint
from bookgpt.config import UserError, parse_config
from conftest import tiny_train_args
from train import Metrics, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: on 2 shared cores a second OpenMP thread makes tiny steps ~100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
KILL_SEED = int(os.environ.get("BOOKGPT_KILL_SEED", time.time_ns() % 1_000_000))

# Runs train.py as `python train.py ...` would, with torch.save instrumented to fault mid-write:
#   kill N  - at the first save of step N, write half the file, then SIGKILL this process
#   term    - at every save, write the file and send SIGTERM to this process before it is
#             fsynced and renamed (a second, third ... SIGTERM arriving during a save)
DRIVER = r'''
import io, os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import torch
mode, arg, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_save = torch.save
def save(obj, f, *a, **kw):
    if mode == "kill" and obj.get("iter_num") == arg:
        buf = io.BytesIO()
        real_save(obj, buf, *a, **kw)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *a, **kw)
    if mode == "term":
        os.kill(os.getpid(), signal.SIGTERM)
torch.save = save
sys.argv = ["train.py", *argv]
runpy.run_path("train.py", run_name="__main__")
'''


def args(data: Path, out: Path, **kw) -> list[str]:
    return tiny_train_args(data, out, **{"n_layer": 1, "threads": 1, **kw})


def rows(out: Path) -> list[dict]:
    """metrics.jsonl as written so far (a line being appended right now is skipped)."""
    path = out / "metrics.jsonl"
    result = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            result.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return result


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError("train.py made no progress")
        time.sleep(0.02)


def trained_past(out: Path, it: int) -> Callable[[], bool]:
    return lambda: any(r["kind"] == "train" and r["iter"] > it for r in rows(out))


def checkpoints_load(out: Path) -> dict[str, int]:
    """Both checkpoints load (a corrupt one raises UserError here) and hold finite weights."""
    steps = {}
    for name in ("ckpt.pt", "best.pt"):
        ck = load_checkpoint(out / name)
        assert all(torch.isfinite(t).all() for t in ck["model"].values()), name
        steps[name] = ck["iter_num"]
    return steps


def history(out: Path) -> list[tuple]:
    """What must not depend on interruptions: every record's kind, step and losses, in order."""
    return [(r["kind"], r["iter"], r.get("loss"), r.get("val_loss")) for r in rows(out) if r["kind"] != "summary"]


@pytest.mark.slow
def test_kill_9_at_random_moments_and_mid_write_then_resume_matches_an_unbroken_run(
        tiny_char_data: Path, tmp_path: Path) -> None:
    rng = random.Random(KILL_SEED)
    kw = dict(max_iters=150, eval_interval=5, dropout=0.1, learning_rate=2e-3)
    out = tmp_path / "killed"
    a = args(tiny_char_data, out, **kw)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    # 1. killed half-way through writing the first checkpoint of step 10
    r = subprocess.run([sys.executable, str(driver), "kill", "10", *a], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert checkpoints_load(out) == {"ckpt.pt": 5, "best.pt": 5}  # the previous good files
    assert list(out.glob(".*.pt.*.tmp")), "the kill should have left a half-written temp file"

    # 2. resumed and killed again at random moments (some land in a save: every 5th step writes two)
    last = 5
    for i in range(3):
        p = subprocess.Popen([sys.executable, "train.py", *a, "--init_from=resume"], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(trained_past(out, last), p)
        time.sleep(rng.uniform(0.0, 0.3))
        p.kill()
        p.wait()
        steps = checkpoints_load(out)
        assert steps["ckpt.pt"] >= last, f"checkpoint went backwards (BOOKGPT_KILL_SEED={KILL_SEED})"
        last = steps["ckpt.pt"]
    # a crash in the middle of appending a line (disk full, power cut) leaves a partial last line
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "iter": 99')

    # 3. the last resume runs to the end; it must equal a run that was never interrupted
    summary = train(train_mod.load_config(a + ["--init_from=resume"]))  # as `python train.py` reads it
    assert summary["iter"] == 150 and summary["reason"] == "max_iters"
    assert not list(out.glob(".*.tmp")), "stale temp files from the kills were not cleaned up"
    recs = rows(out)
    assert [r["iter"] for r in recs if r["kind"] == "train"] == list(range(1, 151))  # gap-free, in order
    assert [r["iter"] for r in recs if r["kind"] == "eval"] == list(range(0, 151, 5))
    assert [r["kind"] for r in recs].count("summary") == 1 and recs[-1]["kind"] == "summary"

    straight = tmp_path / "straight"
    train(train_mod.load_config(args(tiny_char_data, straight, **kw)))
    assert history(out) == history(straight), f"BOOKGPT_KILL_SEED={KILL_SEED}"
    x, y = load_checkpoint(out / "ckpt.pt"), load_checkpoint(straight / "ckpt.pt")
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
    assert load_checkpoint(out / "best.pt")["iter_num"] == load_checkpoint(straight / "best.pt")["iter_num"]


def test_metrics_resume_drops_partial_and_later_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "eval", "iter": 0}, {"kind": "train", "iter": 1}, {"kind": "train", "iter": 2},
            {"kind": "train", "iter": 3}, {"kind": "summary", "iter": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"kind": "train", "it')
    Metrics(path, resume_iter=2)
    assert [json.loads(l) for l in path.read_text().splitlines()] == good[:3]
    assert "1 unreadable line" in capsys.readouterr().err
    Metrics(path, resume_iter=None)  # a fresh run starts an empty file
    assert path.read_text() == ""


@pytest.mark.slow
def test_sigterm_mid_step_saves_and_exits_0(tiny_char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    a = args(tiny_char_data, out, max_iters=100_000, eval_interval=1000)
    p = subprocess.Popen([sys.executable, "train.py", *a], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(trained_past(out, 3), p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr[-2000:]
    assert "SIGTERM: finishing this step, saving ckpt.pt, then exiting" in stdout
    summary = rows(out)[-1]
    assert summary["kind"] == "summary" and summary["reason"] == "signal" and summary["iter"] > 3
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == summary["iter"]
    # and it resumes from exactly there
    more = train(train_mod.load_config(a + [f"--max_iters={summary['iter'] + 3}", "--init_from=resume"]))
    assert more["iter"] == summary["iter"] + 3
    assert [r["iter"] for r in rows(out) if r["kind"] == "train"] == list(range(1, summary["iter"] + 4))


@pytest.mark.slow
def test_second_sigterm_during_the_save_changes_nothing(tiny_char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # eval_interval=1: the signal arrives at a step that is due an eval; it must still be evaluated
    a = args(tiny_char_data, out, max_iters=4, eval_interval=1)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    r = subprocess.run([sys.executable, str(driver), "term", "0", *a], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("SIGTERM: finishing this step") == 1  # later signals are absorbed quietly
    assert checkpoints_load(out) == {"ckpt.pt": 1, "best.pt": 1}
    assert rows(out)[-1]["reason"] == "signal"
    assert not list(out.glob(".*.tmp"))
    train(train_mod.load_config(a + ["--init_from=resume"]))
    assert [r["iter"] for r in rows(out) if r["kind"] == "eval"] == [0, 1, 2, 3, 4]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.slow
def test_a_dying_ddp_rank_stops_the_whole_job_quickly(tiny_char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    a = args(tiny_char_data, out, max_iters=100_000, eval_interval=5, gradient_accumulation_steps=2)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *a], cwd=ROOT, env={**ENV, "BOOKGPT_DIST_TIMEOUT": "60"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(trained_past(out, 3), p, timeout=150)
        ranks = {_rank(c): c for c in _children(p.pid)}
        assert set(ranks) == {0, 1}
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.time()
        stderr = p.communicate(timeout=90)[1]
    finally:
        if p.poll() is None:
            p.kill()
    elapsed = time.time() - t0
    assert p.returncode != 0 and elapsed < 45, (p.returncode, elapsed)
    # torchrun names the rank that failed first; the survivor says in one line what happened
    assert "Root Cause" in stderr and "local_rank: 1" in stderr and "SIGKILL" in stderr, stderr[-3000:]
    assert "error: lost contact with another process of this job" in stderr, stderr[-3000:]
    assert checkpoints_load(out)["ckpt.pt"] % 5 == 0


def test_non_finite_training_loss_stops_with_the_step_and_keeps_checkpoints(
        tiny_char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # an absurd learning rate, no clipping, float32: the weights blow up within a few steps
    cfg = parse_config(TrainConfig, args(tiny_char_data, out, max_iters=200, eval_interval=1000, warmup_iters=0,
                                         learning_rate=1e6, grad_clip=0))
    with pytest.raises(UserError, match=r"^loss became (nan|inf|-inf) at step (\d+);") as e:
        train(cfg)
    step = int(e.value.args[0].split(" at step ")[1].split(";")[0])
    logged = [r["iter"] for r in rows(out) if r["kind"] == "train"]
    assert logged == list(range(1, step))  # the failing step is the one after the last logged
    assert checkpoints_load(out) == {"ckpt.pt": 0, "best.pt": 0}  # saved before training, left alone


def test_non_finite_eval_loss_does_not_overwrite_the_checkpoint(
        tiny_char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # weights that went bad in the last step show up first in an eval: nothing may be saved then
    real = train_mod.estimate_loss
    calls = []

    def estimate(*a, **kw) -> dict[str, float]:
        calls.append(1)
        losses = real(*a, **kw)
        return {**losses, "val": math.nan} if len(calls) == 3 else losses

    monkeypatch.setattr(train_mod, "estimate_loss", estimate)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^eval loss on val became nan at step 10; the last good checkpoints"):
        train(parse_config(TrainConfig, args(tiny_char_data, out, max_iters=30, eval_interval=5)))
    assert checkpoints_load(out) == {"ckpt.pt": 5, "best.pt": 5}


def test_unwritable_out_dir_fails_before_training(tiny_char_data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"^cannot write to out_dir .*a_file/run: Not a directory; choose another"):
        train(parse_config(TrainConfig, args(tiny_char_data, blocker / "run")))


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int], None]]:
    """Let the kernel refuse writes past N bytes (EFBIG), as a full disk refuses them (ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("where", ["checkpoint write", "checkpoint fsync", "every fsync"])
def test_disk_full_is_a_clear_error_and_keeps_old_checkpoints(
        where: str, tiny_char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        file_size_limit: Callable[[int], None]) -> None:
    out = tmp_path / "run"
    a = args(tiny_char_data, out, max_iters=10, eval_interval=5)
    train(parse_config(TrainConfig, a))
    before = {n: (out / n).read_bytes() for n in ("ckpt.pt", "best.pt")}
    saving = r"^cannot save \S*/(best|ckpt)\.pt: {}; the previous (best|ckpt)\.pt is unchanged \(free some space"
    if where == "checkpoint write":  # a real failed write(2), deep inside torch.save's zip writer
        file_size_limit(len(before["ckpt.pt"]) // 2)
        message = saving.format("File too large")
    else:  # or the device fills up as the data is flushed (NFS, quotas)
        def fsync(fd: int) -> None:
            if where == "every fsync" or os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and \
                    ".pt." in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", fsync)
        message = saving.format("No space left on device") if where == "checkpoint fsync" else \
            r"^cannot write to \S*/run: No space left on device; its checkpoints are the last good ones"
    with pytest.raises(UserError, match=message):
        train(parse_config(TrainConfig, a + ["--max_iters=20", "--init_from=resume"]))
    assert {n: (out / n).read_bytes() for n in before} == before
    assert not list(out.glob(".*.tmp"))
