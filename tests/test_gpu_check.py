"""gpu_check.py: every check end to end at a tiny size on the CPU, a failing check, no GPU, the resume comparison."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bookgpt.checkpoint import load_checkpoint
from bookgpt.config import UserError, parse_config
import gpu_check as G
from gpu_check import CHECKS, compare_losses, main, stderr_tail
from prepare import clean_text, decode_text

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def checks(rep: dict) -> dict[str, dict]:
    return {c["name"]: c for c in rep["checks"]}


@pytest.fixture(scope="module")
def book_slice(tmp_path_factory: pytest.TempPathFactory, book_path: Path) -> Path:
    """The book's first 200k cleaned characters: prepare.py learns BPE-2048 on it in a fraction of a second."""
    text, _ = clean_text(decode_text(book_path.read_bytes()))
    path = tmp_path_factory.mktemp("gpu_check_book") / "book_slice.txt"
    path.write_text(text[:200_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, book_slice: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """One full `--device=cpu --tiny` run (about a minute on 2 cores), shared by the tests that read it."""
    root = tmp_path_factory.mktemp("gpu_check_tiny")
    p = gpu_check("--device=cpu", "--tiny", f"--input={book_slice}", f"--data_dir={root / 'data'}",
                  f"--out_dir={root / 'out'}", "--steps=40")
    return p, root / "out"


@pytest.mark.slow
def test_tiny_cpu_run_passes_every_check_a_cpu_can_make(tiny_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    p, out = tiny_run
    assert p.returncode == 0, p.stdout + p.stderr
    rep = report(out)
    by_name = checks(rep)
    assert list(by_name) == list(CHECKS)
    assert {n: c["status"] for n, c in by_name.items()} == {n: "skipped" if n == "ddp_nccl" else "passed"
                                                           for n in CHECKS}
    assert by_name["ddp_nccl"]["details"] == "not a GPU"
    assert rep["exit_status"] == 0 and rep["device"] == "cpu" and rep["config"]["tiny"] is True
    # one progress line per check that ran, as it ran
    progress = [l.split()[0] for l in p.stdout.splitlines() if l.split() and l.split()[0] in CHECKS]
    assert progress == list(CHECKS)

    # the benchmarks: CUDA-only assertions are skipped, and said so; the targets are not failures
    for name in ("bench_2x4090", "bench_best_gpu"):
        assert "flash/cudnn: skipped (not a GPU)" in by_name[name]["details"]
        fig = by_name[name]["figures"]
        assert fig["sampling_ok"] is True and fig["tokens_per_s"] > 0 and fig["compile_error"] == ""
    assert json.loads((out / "bench_2x4090.json").read_text())["config"]["vocab_size"] == 104
    assert json.loads((out / "bench_best_gpu.json").read_text())["config"]["vocab_size"] == 2048
    targets = {t["target"]: t["status"] for t in rep["targets"]}
    assert targets["bookgpt MFU >= 40% on the 2x4090 shape"] == "skipped (not a GPU)"
    assert [s for t, s in targets.items() if "nanoGPT" in t] == ["not compared: pass --nanogpt=PATH"] * 2

    # stopped by SIGTERM halfway, resumed, deterministic kernels: the losses after the resume are the unbroken run's
    for name, prefix in (("train_bf16", "bf16"), ("train_fp16", "fp16")):
        fig = by_name[name]["figures"]
        assert 20 <= fig["resume_step"] < 40 and fig["compared"] >= 3
        assert fig["max_abs_diff"] == 0.0 and fig["rel_tol"] == 0.0 and fig["deterministic"] is True
        assert load_checkpoint(out / f"{prefix}_resumed" / "ckpt.pt")["iter_num"] == 40
        assert (out / f"{prefix}_straight" / "best.pt").is_file()
        assert json.loads((out / f"{prefix}_resumed" / "config.json").read_text())["deterministic"] is True
    assert load_checkpoint(out / "fp16_straight" / "ckpt.pt")["scaler"] is not None  # the GradScaler path ran
    # the two-GPU preset's path: two processes, two micro-batches each, stopped by SIGTERM and resumed
    ddp = load_checkpoint(out / "ddp_2x4090" / "ckpt.pt")
    assert ddp["iter_num"] == 40 and len(ddp["rng"]) == 2
    assert json.loads((out / "ddp_2x4090" / "config.json").read_text())["gradient_accumulation_steps"] == 4
    ev = json.loads((out / "bf16_straight" / "eval.json").read_text())
    assert 0 < ev["likelihood"]["bpb"] < 10
    assert "two threads" in by_name["app"]["details"]

    # the report: a table row per check, the targets, the commands as they ran
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# GPU check, ") and "torch " + torch.__version__ in md
    for name in CHECKS:
        assert f"| {name} | {'skipped' if name == 'ddp_nccl' else 'passed'} |" in md
    assert "## Targets" in md and "## Commands" in md
    commands = [cmd for c in rep["checks"] for cmd in c["commands"]]
    assert any(c.startswith("BOOKGPT_DIST_BACKEND=cpu:gloo ") and "torch.distributed.run" in c for c in commands)
    assert sum("--init_from=resume" in c for c in commands) == 3  # bf16, fp16 and DDP each resumed once
    assert sum("SIGTERM" in c for c in commands) == 3
    assert len(list((out / "logs").glob("*.err"))) == len([c for c in commands if not c.startswith("#")])


@pytest.mark.slow
def test_a_part_rerun_keeps_the_other_parts_in_the_report(tiny_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = tiny_run
    before = checks(report(out))
    p = gpu_check("--device=cpu", "--tiny", f"--data_dir={out.parent / 'data'}", f"--out_dir={out}", "--checks=use")
    assert p.returncode == 0, p.stdout + p.stderr
    ran = [l.split()[0] for l in p.stdout.splitlines() if l.split() and l.split()[0] in CHECKS]
    assert ran == ["environment", "prepare", "ddp_2x4090", "ddp_nccl", "sample", "evaluate", "app"]
    after = checks(report(out))
    for name in ("bench_2x4090", "bench_best_gpu", "train_bf16", "train_fp16"):  # the other parts' results stand
        assert after[name] == before[name]
    assert after["sample"]["status"] == "passed" and after["sample"]["ran"]


@pytest.mark.slow
def test_a_failed_check_fails_the_run_and_the_later_checks_still_run(tmp_path: Path, book_slice: Path) -> None:
    p = gpu_check("--device=cpu", "--tiny", "--nanogpt=/nonexistent", f"--input={book_slice}",
                  f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--checks=bench_2x4090,train_bf16",
                  "--steps=8")
    assert p.returncode == 1, p.stdout + p.stderr
    rep = report(tmp_path / "out")
    by_name = checks(rep)
    assert by_name["bench_2x4090"]["status"] == "failed"
    assert "no nanoGPT model.py in /nonexistent" in by_name["bench_2x4090"]["details"]
    assert by_name["train_bf16"]["status"] == "passed"  # it ran after the failure
    assert (by_name["sample"]["status"], by_name["sample"]["details"]) == ("skipped", "not selected (--checks)")
    assert {t["status"] for t in rep["targets"] if "nanoGPT" in t["target"]} == {"not measured"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| bench_2x4090 | **FAILED** |" in md and "no nanoGPT model.py" in md
    assert [l for l in p.stdout.splitlines() if l.startswith("bench_2x4090 ")][0].split()[1] == "FAILED"


@pytest.mark.slow
def test_data_that_cannot_be_prepared_is_one_line_and_no_later_check_runs(tmp_path: Path) -> None:
    # offline, or the book's server down: a refused connection stands in (the tests never leave this machine)
    p = gpu_check("--device=cpu", "--tiny", "--input=http://127.0.0.1:9/pg2600.txt", f"--data_dir={tmp_path / 'data'}",
                  f"--out_dir={tmp_path / 'out'}")
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot prepare the BPE data in {tmp_path / 'data'}: "
                                                   "prepare.py exited with status 2: error: download of")
    by_name = checks(report(tmp_path / "out"))
    assert by_name["prepare"]["status"] == "failed"
    assert {by_name[n]["details"] for n in CHECKS[2:]} == {"not run: the BPE data could not be prepared"}
    assert not list((tmp_path / "out" / "logs").glob("bench*"))


@pytest.mark.parametrize("why, message", [("input", "input file not found: "), ("rustbpe", "rustbpe is not installed")])
def test_what_prepare_would_lack_is_one_line_before_any_work(why: str, message: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any GPU work: a book that is not there, or rustbpe missing (a GPU box often lacks it), when the
    data must be prepared. The rustbpe line says how to carry it in as a wheel."""
    argv = ["--device=cpu", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}"]
    if why == "input":
        argv.append(f"--input={tmp_path / 'missing.txt'}")
    else:
        monkeypatch.setitem(sys.modules, "rustbpe", None)  # import rustbpe raises ImportError
    with pytest.raises(UserError, match=message) as e:
        main(argv)
    if why == "rustbpe":
        assert "pip install --no-index --find-links=wheels/ rustbpe" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_the_book_is_found_where_the_tests_find_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  book_path: Path) -> None:
    monkeypatch.delenv("BOOKGPT_BOOK", raising=False)
    assert G.find_book("x/book.txt") == "x/book.txt" and G.find_book("https://a/b.txt") == "https://a/b.txt"
    copies = [p for p in G.BOOK_COPIES if p.is_file()]
    assert G.find_book("") == (G.rel(copies[0]) if copies else "")
    monkeypatch.setenv("BOOKGPT_BOOK", str(book_path))
    assert G.find_book("") == G.rel(book_path)
    monkeypatch.setattr(G, "BOOK_COPIES", ())
    monkeypatch.delenv("BOOKGPT_BOOK")
    assert G.find_book("") == ""  # nothing here: prepare.py's own cache, or its download


def test_parts_name_their_checks() -> None:
    assert G.chosen_checks(()) == list(CHECKS)
    assert G.chosen_checks(("train",)) == ["environment", "prepare", "train_bf16", "train_fp16"]
    assert G.chosen_checks(("bench", "sample")) == ["environment", "prepare", "bench_2x4090", "bench_best_gpu", "sample"]
    assert parse_config(G.CheckConfig, ["--checks=bench, sample"]).checks == ("bench", "sample")  # config.coerce
    assert sorted(c for part in G.PARTS.values() for c in part) == sorted(set(CHECKS) - set(G.ALWAYS))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the default device runs the full check")
def test_default_cuda_without_a_gpu_is_a_user_error_with_everything_skipped(tmp_path: Path) -> None:
    p = gpu_check(f"--out_dir={tmp_path / 'out'}")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA GPU here")
    assert lines[0].endswith("(what to do: run on a GPU machine, or --device=cpu --tiny to try the checks at a "
                             "tiny size on this CPU)")
    rep = report(tmp_path / "out")
    assert rep["exit_status"] == 2 and rep["device_name"] == "no CUDA GPU"
    assert [(c["name"], c["status"], c["details"]) for c in rep["checks"]] == \
        [(n, "skipped", "no CUDA GPU here") for n in CHECKS]
    assert not (tmp_path / "out" / "logs").exists()  # nothing was run
    assert (tmp_path / "out" / "report.md").read_text().count("| skipped |") == len(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [(["--checks=training,sample"], "unknown check(s) training"),
                                           (["--device=mps"], "bad value for 'device'"),
                                           (["--steps=4"], "steps must be at least 8")])
def test_bad_options_are_user_errors(argv: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        main([*argv, f"--out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # refused before anything was written


def records(losses: dict[int, float], evals: dict[int, float]) -> list[dict]:
    return ([{"kind": "train", "iter": i, "loss": v, "lr": 1e-3} for i, v in losses.items()]
            + [{"kind": "eval", "iter": i, "train_loss": 9.0, "val_loss": v} for i, v in evals.items()]
            + [{"kind": "summary", "iter": 40, "best_val_loss": 1.0}])


def test_compare_losses_equal_within_tolerance_and_beyond() -> None:
    straight = records({10: 5.0, 20: 4.0, 30: 3.0, 40: 2.5}, {20: 4.2, 40: 2.6})
    # before the resume point (20) the runs are the same run: a difference there is not looked at
    resumed = records({10: 9.9, 20: 9.9, 30: 3.0, 40: 2.5}, {20: 9.9, 40: 2.6})
    same = compare_losses(straight, resumed, after=20)
    assert same == {"compared": 3, "max_abs_diff": 0.0, "ok": True, "missing": []}

    close = records({30: 3.0 * (1 + 2e-4), 40: 2.5}, {40: 2.6})
    assert not compare_losses(straight, close, after=20)["ok"]  # exactly, as on a CPU
    within = compare_losses(straight, close, after=20, rel_tol=1e-3)  # within GPU rounding
    assert within["ok"] and within["max_abs_diff"] == pytest.approx(6e-4)

    far = records({30: 3.0, 40: 2.5}, {40: 2.6 * 1.01})
    beyond = compare_losses(straight, far, after=20, rel_tol=1e-3)
    assert not beyond["ok"] and beyond["max_abs_diff"] == pytest.approx(0.026)

    short = records({30: 3.0}, {40: 2.6})  # the resumed run never logged step 40's training loss
    missing = compare_losses(straight, short, after=20, rel_tol=1e-3)
    assert not missing["ok"] and missing["missing"] == ["train 40"]
    assert not compare_losses(straight, records({}, {}), after=40)["ok"]  # nothing to compare is no evidence


def test_stderr_tail_prefers_the_error_line_over_progress_bars() -> None:
    err = "step 1\r 50%|#####  | 5/10\r100%|##########| 10/10\nerror: loss became nan at step 7\n====\nTraceback\n"
    assert stderr_tail(err) == "error: loss became nan at step 7"
    assert stderr_tail(" 10%|#\r 20%|##\rRuntimeError: boom\n") == "20%|## | RuntimeError: boom"
    assert stderr_tail("") == "(nothing on stderr)"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_passes_the_book_and_the_part_on_and_installs_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # under `make test`: not a sub-make
    r = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "BOOK=../shared/data/pg2600.txt",
                        "CHECKS=train", "PY=python3"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["python3 gpu_check.py --input=../shared/data/pg2600.txt --checks=train"]
