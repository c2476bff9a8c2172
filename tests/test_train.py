"""train.py end to end on tiny models: checkpoints, best tracking, early stopping, exact resume, DDP."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bookgpt import batches
from bookgpt import distributed
import train as train_mod
from bookgpt.checkpoint import checkpoint_path, load_checkpoint
from bookgpt.common import autocast, bits_per_byte
from bookgpt.config import UserError, config_dict, parse_config
from conftest import tiny_train_args
from model import GPT, GPTConfig
from bookgpt.optim import make_optimizers
from bookgpt.distill import distill_loss
from train import TrainConfig, load_teacher, train

ROOT = Path(__file__).resolve().parents[1]


def run(data: Path, out: Path, **kw) -> dict:
    return train(parse_config(TrainConfig, tiny_train_args(data, out, **kw)))


def records(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_training_writes_run_files_and_learns(tiny_char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run(tiny_char_data, out, max_iters=60, eval_interval=30, learning_rate=3e-3)
    assert {p.name for p in out.iterdir()} >= {"best.pt", "ckpt.pt", "config.json", "meta.json", "metrics.jsonl"}
    assert json.loads((out / "config.json").read_text())["n_embd"] == 32
    evals = records(out, "eval")
    assert [e["iter"] for e in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learned something
    # bits per byte from the meta counts: char data is 1 token per char; bytes >= chars
    meta = json.loads((out / "meta.json").read_text())
    v = meta["splits"]["val"]
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / 0.6931471805599453 * v["tokens"] / v["bytes"])
    assert len(records(out, "train")) == 60
    assert summary["iter"] == 60 and summary["reason"] == "max_iters"
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 60 and not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


def test_best_checkpoint_tracks_minimum_val_and_early_stop(tiny_char_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    vals = iter([4.0, 3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9])  # best at the third eval (step 20)

    def fake_estimate(*args, **kwargs) -> dict[str, float]:
        v = next(vals)
        return {"train": v, "val": v}

    monkeypatch.setattr(train_mod, "estimate_loss", fake_estimate)
    out = tmp_path / "run"
    summary = run(tiny_char_data, out, max_iters=200, eval_interval=10, early_stop_patience=3)
    assert summary["reason"] == "early_stop" and summary["iter"] == 50  # 3 evals without improvement
    best, latest = load_checkpoint(out / "best.pt"), load_checkpoint(out / "ckpt.pt")
    assert best["iter_num"] == 20 and best["best_val_loss"] == 2.0
    assert latest["iter_num"] == 50 and latest["best_iter"] == 20


def test_a_target_val_bpb_ends_the_run_at_the_first_eval_that_reaches_it(
        tiny_char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    vals = iter([4.0, 3.0, 2.0, 1.0])
    monkeypatch.setattr(train_mod, "estimate_loss", lambda *a, **k: dict.fromkeys(("train", "val"), next(vals)))
    val_split = json.loads((tiny_char_data / "meta.json").read_text())["splits"]["val"]
    target = bits_per_byte(2.5, val_split)  # between the second eval's loss and the third's
    summary = run(tiny_char_data, tmp_path / "run", max_iters=200, eval_interval=10, target_val_bpb=target)
    assert summary["reason"] == "target" and summary["iter"] == 20 and summary["best_iter"] == 20
    assert f"reached val bpb {bits_per_byte(2.0, val_split):.3f} <= {target:g} in 20 steps" in capsys.readouterr().out


def test_a_weight_average_can_reach_the_target_first(
        tiny_char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    weights, average = iter([4.0, 3.0, 3.0, 3.0]), iter([3.5, 2.0])  # the average is scored on val alone

    def fake_estimate(model, batches, *args, **kwargs) -> dict[str, float]:
        value = next(weights if "train" in batches else average)
        return dict.fromkeys(batches, value)

    monkeypatch.setattr(train_mod, "estimate_loss", fake_estimate)
    val_split = json.loads((tiny_char_data / "meta.json").read_text())["splits"]["val"]
    target = bits_per_byte(2.5, val_split)  # the weights never reach it; the average does at its second eval
    summary = run(tiny_char_data, tmp_path / "run", max_iters=200, eval_interval=10, target_val_bpb=target,
                  ema_decay=0.9)
    assert summary["reason"] == "target" and summary["iter"] == 10 and summary["best_ema_iter"] == 10
    assert (f"reached val bpb {bits_per_byte(2.0, val_split):.3f} (the weight average's: ema.pt) <= {target:g} "
            f"in 10 steps") in capsys.readouterr().out


def test_resume_continues_exactly(tiny_char_data: Path, tmp_path: Path) -> None:
    kw = dict(dropout=0.1, lr_decay_iters=24, eval_interval=12, learning_rate=2e-3)  # dropout: the RNG must resume too
    run(tiny_char_data, tmp_path / "straight", max_iters=24, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=12, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=24, init_from="resume", **kw)

    def losses(out: Path) -> list[tuple]:
        return [(r["kind"], r["iter"], r.get("loss"), r.get("val_loss"))
                for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(straight) == 24 + 3 + 1
    assert straight == split  # bit-identical losses, step for step
    a, b = load_checkpoint(tmp_path / "straight" / "ckpt.pt"), load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_run_saved_before_the_package_layout_resumes_exactly(old_run) -> None:
    """A run folder in the layout of the code before bookgpt/ and RunState (the same checkpoint keys), 6 steps
    in; resumed to step 8, it gives the losses that code gave, to the last digit."""
    run, expected = old_run
    train_mod.main(["--init_from=resume", f"--out_dir={run}", f"--data_dir={run.parent / 'data'}", "--max_iters=8"])
    assert {str(r["iter"]): r["loss"] for r in records(run, "train") if r["iter"] > 6} == expected["resumed_train_losses"]


def test_a_config_json_from_before_a_key_resumes_with_the_behaviour_it_had(old_run) -> None:
    """A run saved before value_embeds and zero_init existed: the keys its config.json lacks take their old meaning
    (off), not the recipe's defaults, so the resume neither changes the model nor refuses it."""
    run, expected = old_run
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in ("value_embeds", "zero_init")}))
    train_mod.main(["--init_from=resume", f"--out_dir={run}", f"--data_dir={run.parent / 'data'}", "--max_iters=8"])
    assert {str(r["iter"]): r["loss"] for r in records(run, "train") if r["iter"] > 6} == expected["resumed_train_losses"]
    assert load_checkpoint(run / "ckpt.pt")["iter_num"] == 8


def test_weight_average_is_scored_saved_and_resumed_exactly(tiny_char_data: Path, tmp_path: Path) -> None:
    kw = dict(dropout=0.1, lr_decay_iters=24, eval_interval=12, learning_rate=2e-3, ema_decay=0.9)
    summary = run(tiny_char_data, tmp_path / "straight", max_iters=24, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=12, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=24, init_from="resume", **kw)
    evals = records(tmp_path / "straight", "eval")
    assert [e["iter"] for e in evals] == [0, 12, 24] and all("ema_val_bpb" in e for e in evals)
    assert summary["best_ema_iter"] in (0, 12, 24) and summary["best_ema_val_bpb"] == min(e["ema_val_bpb"] for e in evals)
    assert evals[0]["ema_val_loss"] == evals[0]["val_loss"]  # before any step the average is the weights
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert untimed(records(tmp_path / "split", "eval")) == untimed(evals)  # the average resumes exactly too
    a, b = load_checkpoint(tmp_path / "straight" / "ema.pt"), load_checkpoint(tmp_path / "split" / "ema.pt")
    assert a["iter_num"] == summary["best_ema_iter"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    latest = load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    assert not torch.equal(a["model"]["lm_head.weight"], latest["model"]["lm_head.weight"])  # an average, not the weights
    # sample.py and evaluate.py read it as --ckpt=ema; a scratch run without an average removes a replaced one
    assert checkpoint_path(tmp_path / "straight", "ema").name == "ema.pt"
    run(tiny_char_data, tmp_path / "straight", max_iters=2, eval_interval=2, overwrite=True)
    assert not (tmp_path / "straight" / "ema.pt").exists() and "ema_val_loss" not in records(tmp_path / "straight", "eval")[0]
    with pytest.raises(UserError, match=r"ema_decay must be in \[0, 1\)"):
        run(tiny_char_data, tmp_path / "bad", ema_decay=1.0)


def test_max_minutes_stops_with_final_eval_and_checkpoint(tiny_char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run(tiny_char_data, out, max_iters=100000, max_minutes=0.002, eval_interval=100000)
    assert summary["reason"] == "max_minutes" and 0 < summary["iter"] < 100000
    assert records(out, "eval")[-1]["iter"] == summary["iter"]
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == summary["iter"]


def test_muon_wsd_and_modern_architecture_train(tiny_char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run(tiny_char_data, out, max_iters=40, eval_interval=40, optimizer="muon", lr_schedule="wsd",
                  pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", learning_rate=3e-3)
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert summary["iter"] == 40
    assert len(load_checkpoint(out / "ckpt.pt")["optimizer"]) == 2  # AdamW + Muon both saved


def test_value_embeddings_skips_and_zero_init_train_and_resume_exactly(tiny_char_data: Path, tmp_path: Path) -> None:
    kw = dict(value_embeds=1, unet_skips=True, zero_init=True, learning_rate=3e-3, lr_decay_iters=40, eval_interval=20)
    run(tiny_char_data, tmp_path / "straight", max_iters=40, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=20, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=40, init_from="resume", **kw)
    evals = records(tmp_path / "straight", "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    def losses(out: Path) -> list[tuple]:
        return [(r["iter"], r["loss"]) for r in records(out, "train")]

    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # bit-identical, step for step
    ckpt = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert {"value_embeds.0.weight", "skip_weights"} <= set(ckpt["model"])
    assert not torch.equal(ckpt["model"]["skip_weights"], torch.ones(1))  # learned


def test_stochastic_depth_and_a_dropout_ramp_train_and_resume_exactly(tiny_char_data: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rates: list[float] = []
    set_dropout = GPT.set_dropout
    monkeypatch.setattr(GPT, "set_dropout", lambda self, p: (rates.append(p), set_dropout(self, p))[1])
    kw = dict(drop_path=0.2, dropout=0.3, dropout_ramp=0.5, lr_decay_iters=16, eval_interval=8)
    run(tiny_char_data, tmp_path / "straight", max_iters=16, **kw)
    # the ramp spans half of the 16 steps: two steps at each of 0, 0.1 and 0.2, then 0.3 to the end
    assert rates == pytest.approx([0.0] * 2 + [0.1] * 2 + [0.2] * 2 + [0.3] * 10)
    run(tiny_char_data, tmp_path / "split", max_iters=8, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=16, init_from="resume", **kw)
    assert rates[16:] == rates[:16]  # the resumed run picks the ramp up where it stood
    def losses(out: Path) -> list[tuple]:
        return [(r["iter"], r["loss"]) for r in records(out, "train")]

    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # bit-identical, step for step


def test_training_steps_can_read_random_segmentations_of_train(book_text: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from prepare import PrepareConfig, prepare

    src = tmp_path / "book.txt"
    src.write_text(book_text[:100_000], encoding="utf-8")
    for name, dropout in (("data", 0.1), ("plain", 0.0)):
        prepare(PrepareConfig(tokenizer="bpe", vocab_size=300, input=str(src), out_dir=str(tmp_path / name),
                              bpe_dropout=dropout, dropout_copies=2))
    read = []
    real_get = batches.Batches.get
    monkeypatch.setattr(batches.Batches, "get", lambda self, gen: read.append(self.path.name) or real_get(self, gen))
    run(tmp_path / "data", tmp_path / "run", max_iters=10, eval_interval=10, train_split="train_dropout")
    # the steps read the segmentations (one batch drawn ahead); the estimates read train and val as always
    assert set(read) == {"train_dropout.bin", "train.bin", "val.bin"} and read.count("train_dropout.bin") == 11
    with pytest.raises(UserError, match="has no train_dropout.bin; write it with python prepare.py --bpe_dropout=0.1"):
        run(tmp_path / "plain", tmp_path / "x", train_split="train_dropout")


def test_distill_loss_mixes_the_text_and_the_teachers_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(7, (2, 5))
    hard = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    teacher = torch.randn(2, 5, 7).log_softmax(-1)
    assert distill_loss(logits, hard, teacher.exp(), 0.0) == pytest.approx(hard.item())
    # a one-hot teacher is the text itself
    one_hot = torch.zeros(2, 5, 7).scatter(-1, targets[..., None], 1.0)
    assert distill_loss(logits, hard, one_hot, 1.0) == pytest.approx(hard.item(), abs=1e-5)
    # cross-entropy against the teacher = KL(teacher || student) + the teacher's entropy, per token
    p, logq = teacher.exp(), logits.log_softmax(-1)
    kl_plus_h = ((p * (teacher - logq)).sum(-1) - (p * teacher).sum(-1)).mean()
    assert distill_loss(logits, hard, teacher.exp(), 1.0) == pytest.approx(kl_plus_h.item(), abs=1e-5)
    assert distill_loss(logits, hard, teacher.exp(), 0.25) == pytest.approx(0.75 * hard.item() + 0.25 * kl_plus_h.item(), abs=1e-5)


def test_distillation_from_an_ensemble_of_runs(tiny_char_data: Path, tmp_path: Path) -> None:
    kw = dict(max_iters=30, eval_interval=15, learning_rate=3e-3)
    run(tiny_char_data, tmp_path / "t1", **kw)
    run(tiny_char_data, tmp_path / "t2", seed=7, **kw)
    meta = json.loads((tmp_path / "t1" / "meta.json").read_text())
    one, two = load_teacher([str(tmp_path / "t1")], meta, 32, "cpu"), load_teacher([str(tmp_path / "t1"), str(tmp_path / "t2")], meta, 32, "cpu")
    x = torch.randint(meta["vocab_size"], (3, 32))
    logp1, logp2 = one(x)[0], two(x)[0]
    assert torch.allclose(logp2.exp().sum(-1), torch.ones(3, 32), atol=1e-5)  # a distribution at every position
    # the mean of the two runs' probabilities, not of their logits
    p_t2 = load_teacher([str(tmp_path / "t2")], meta, 32, "cpu")(x)[0].exp()
    assert torch.allclose(logp2.exp(), (logp1.exp() + p_t2) / 2, atol=1e-5)
    one.train()
    assert not one.training and not any(p.requires_grad for p in one.parameters())

    out = tmp_path / "student"
    summary = run(tiny_char_data, out, distill_from=f"{tmp_path / 't1'}, {tmp_path / 't2'}", distill_weight=0.7, **kw)
    (teacher,) = records(out, "teacher")
    assert teacher["iter"] == 0 and teacher["runs"] == [str(tmp_path / "t1"), str(tmp_path / "t2")]
    # scored on the batches the student's own evals use: one teacher alone gives its run's best val loss
    run(tiny_char_data, tmp_path / "s1", distill_from=str(tmp_path / "t1"), max_iters=1)
    (solo,) = records(tmp_path / "s1", "teacher")
    best = [load_checkpoint(tmp_path / t / "best.pt")["best_val_loss"] for t in ("t1", "t2")]
    assert solo["val_loss"] == pytest.approx(best[0], rel=1e-6)
    # or each teacher's weight average (ema.pt): then its own best val loss
    run(tiny_char_data, tmp_path / "t3", ema_decay=0.9, **kw)
    run(tiny_char_data, tmp_path / "s3", distill_from=str(tmp_path / "t3"), distill_ckpt="ema", max_iters=1)
    (averaged,) = records(tmp_path / "s3", "teacher")
    ema = load_checkpoint(tmp_path / "t3" / "ema.pt")
    assert averaged["val_loss"] == pytest.approx(ema["best_val_loss"], rel=1e-6)
    assert averaged["val_loss"] != pytest.approx(load_checkpoint(tmp_path / "t3" / "best.pt")["best_val_loss"], rel=1e-4)
    # averaging probabilities never loses to the runs' mean loss (-log is convex), and here it gains
    assert teacher["val_loss"] < sum(best) / 2 - 1e-3
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5 and summary["iter"] == 30
    # resume keeps the teacher's record and continues
    run(tiny_char_data, out, distill_from=str(tmp_path / "t1") + "," + str(tmp_path / "t2"), distill_weight=0.7,
        init_from="resume", **{**kw, "max_iters": 45})
    assert len(records(out, "teacher")) == 1 and load_checkpoint(out / "ckpt.pt")["iter_num"] == 45


@pytest.mark.slow
def test_distillation_refuses_teachers_it_cannot_use(tiny_char_data: Path, tmp_path: Path,
                                                    book_path: Path) -> None:
    run(tiny_char_data, tmp_path / "t", max_iters=2, eval_interval=2)
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    with pytest.raises(train_mod.UserError, match="block_size 32 is shorter than the student's 64"):
        load_teacher([str(tmp_path / "t")], meta, 64, "cpu")
    with pytest.raises(train_mod.UserError, match="trained on other data"):
        load_teacher([str(tmp_path / "t")], {**meta, "sha256_clean": "0" * 64}, 32, "cpu")
    with pytest.raises(train_mod.UserError, match="no checkpoint at"):
        load_teacher([str(tmp_path / "nowhere")], meta, 32, "cpu")
    args = tiny_train_args(tiny_char_data, tmp_path / "x")
    r = subprocess.run([sys.executable, "train.py", *args, "--distill_weight=1.5"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: distill_weight must be in [0, 1], got 1.5"
    r = subprocess.run([sys.executable, "train.py", *args, "--distill_ckpt=last"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown distill_ckpt 'last'")
    r = subprocess.run([sys.executable, "train.py", *args, f"--distill_from={tmp_path / 'nowhere'}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no checkpoint at") and not (tmp_path / "x").exists()


# Runs train.py under torchrun with every collective recorded: its name and the devices of its tensors,
# one JSON line per call, into RECORD_DIR/rank<R>.jsonl.
RECORDING_DRIVER = r'''
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())
import torch, torch.distributed as dist
log = open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a")
def recorded(name, real):
    def call(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
        log.write(json.dumps({"op": name, "devices": [str(t.device) for t in tensors]}) + "\n")
        log.flush()
        return real(*args, **kwargs)
    return call
for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "barrier",
             "all_gather_object", "broadcast_object_list"):
    setattr(dist, name, recorded(name, getattr(dist, name)))
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
'''


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tiny_char_data: Path, tmp_path: Path) -> None:
    """Two processes, the process group made as "cpu:gloo" (BOOKGPT_DIST_BACKEND): every collective is
    recorded and must be on the training device; the stop flags are agreed on at log and eval steps only."""
    out, record = tmp_path / "ddp", tmp_path / "record"
    record.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(RECORDING_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BOOKGPT_DIST_BACKEND": "cpu:gloo", "RECORD_DIR": str(record)}

    def torchrun(*args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(driver), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "2 process(es)" in r.stdout

    torchrun(*tiny_train_args(tiny_char_data, out, max_iters=6, eval_interval=3, log_interval=2,
                              gradient_accumulation_steps=4))
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 6
    assert len(ckpt["rng"]) == 2  # both ranks' streams are saved ...
    assert not torch.equal(ckpt["rng"][0]["batches"], ckpt["rng"][1]["batches"])  # ... and they differ
    assert [r["iter"] for r in records(out, "eval")] == [0, 3, 6]
    assert [r["iter"] for r in records(out, "train")] == [2, 4, 6]
    # 4 micro-batches of 4 x 32 tokens per step: 2 on each process (no_sync on the first)
    assert records(out, "summary")[0]["tokens_seen"] == 6 * 4 * 4 * 32
    for rank in (0, 1):
        calls = [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]
        assert {d for c in calls for d in c["devices"]} == {"cpu"}  # the training device, every time
        reduces = [c for c in calls if c["op"] == "all_reduce"]
        # eval losses: 2 splits x 3 evals; stop flags: at steps 2, 3, 4, 6 (log or eval steps), not at 1 or 5;
        # training losses, read (and agreed on) at log steps 2, 4, 6 and before step 3's save
        assert len(reduces) == 6 + 4 + 4, calls
    # and it resumes with two processes
    torchrun(*tiny_train_args(tiny_char_data, out, max_iters=9, eval_interval=3, gradient_accumulation_steps=4,
                              init_from="resume"))
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 9


# Two processes read their pending training losses as Run.read_losses does; only rank 1's are bad.
NAN_DRIVER = r'''
import os, sys, types
sys.path.insert(0, os.getcwd())
import torch
from bookgpt.config import UserError
from bookgpt.distributed import setup_distributed
from train import Run
d = setup_distributed("cpu")
losses = [torch.tensor(3.0), torch.tensor(float("nan") if d.rank == 1 else 2.5), torch.tensor(2.0)]
run = types.SimpleNamespace(d=d, pending=list(zip((1, 2, 3), losses)), out_dir="out/run")
try:
    said = f"read {Run.read_losses(run)}"
except UserError as e:
    said = f"stopped: {e}"
open(os.path.join(os.environ["RECORD_DIR"], f"rank{d.rank}.txt"), "w").write(said)
torch.distributed.destroy_process_group()  # as train.py does: gloo's threads must not outlive the interpreter
'''


@pytest.mark.slow
def test_a_nan_on_one_process_stops_every_process_with_the_same_line(tmp_path: Path) -> None:
    """Each process checked only its own losses: the one with a NaN raised, and the others waited for it in
    their next collective until the timeout (300 s). The losses are averaged across processes when read, so
    a NaN anywhere is a NaN everywhere, at the same step."""
    driver = tmp_path / "driver.py"
    driver.write_text(NAN_DRIVER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(driver)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "BOOKGPT_DIST_BACKEND": "cpu:gloo",
                            "RECORD_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    said = [(tmp_path / f"rank{rank}.txt").read_text().split(" Try ")[0] for rank in (0, 1)]
    assert said == ["stopped: loss became nan at step 2; the last good checkpoints in out/run are kept."] * 2


def test_ddp_does_not_broadcast_the_constant_buffers() -> None:
    """The rotary tables are buffers, the same constants on every process: DDP's default would send them
    from rank 0 before every forward."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=16, block_size=8))
        assert model.rope_cos is not None
        ddp = distributed.wrap_ddp(model, "cpu")
        ddp(torch.zeros(1, 4, dtype=torch.long))
        assert len(ddp.modules_buffers) == 2 and ddp.require_forward_param_sync  # DDP's own test, before a forward
        assert not ddp.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("key,value,message", [
    ("max_iters", 0, "'max_iters' must be positive, got 0"),
    ("max_minutes", -1.0, "'max_minutes' must be 0 or more, got -1.0"),
    ("early_stop_patience", -2, "'early_stop_patience' must be 0 or more, got -2"),
    ("dropout_ramp", 1.5, "dropout_ramp must be in [0, 1], got 1.5"),
    ("drop_path", 1.0, "drop_path must be in [0, 1), got 1.0"),
    ("muon_wd_schedule", "cosine", "bad value for 'muon_wd_schedule': 'cosine'; use one of lr, constant"),
])
def test_budget_keys_are_checked_before_training(key: str, value, message: str) -> None:
    cfg = parse_config(TrainConfig, [f"--{key}={value}"])
    with pytest.raises(train_mod.UserError, match=re.escape(message)):
        train_mod.validate(cfg)


@pytest.mark.slow
def test_invalid_values_are_one_clear_error_line(tiny_char_data: Path, tmp_path: Path) -> None:
    args = tiny_train_args(tiny_char_data, tmp_path / "x")
    r = subprocess.run([sys.executable, "train.py", *args, "--batch_size=0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: 'batch_size' must be positive, got 0"


# ----------------------------------------------------------------------------- the GPU path, as far as a CPU shows it

class Recorded(Exception):
    pass


def test_collectives_use_tensors_on_the_training_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL serves CUDA tensors only: the stop flags were all-reduced as a CPU tensor, which crashes
    two GPUs at the first step. A job whose training device is not the CPU ("meta" stands in for a
    GPU here) must hand every collective a tensor on that device."""
    seen = []

    def all_reduce(t: torch.Tensor, op=None) -> None:
        seen.append(t.device)
        raise Recorded  # a meta tensor holds no values to read back

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    d = distributed.Dist(rank=0, local_rank=0, world=2, device="meta")
    with pytest.raises(Recorded):
        d.any([True, False])  # the stop flags: signal, time budget
    with pytest.raises(Recorded):
        d.all_mean(torch.zeros((), device="meta"))  # eval losses
    assert seen == [torch.device("meta"), torch.device("meta")]
    # and a tensor on another device is refused as NCCL would refuse it, on any backend
    with pytest.raises(RuntimeError, match="a collective got a tensor on cpu, but this job's processes exchange tensors on meta"):
        d.all_mean(torch.zeros(()))
    assert distributed.Dist(world=1).any([True, False]) == [True, False]  # one process: nothing to agree on


def test_torchrun_refuses_what_nccl_would_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("BOOKGPT_DIST_BACKEND", raising=False)
    with pytest.raises(train_mod.UserError, match=r"has 1 GPU\(s\); use --nproc_per_node=1"):
        distributed.setup_distributed("cuda")
    with pytest.raises(train_mod.UserError, match="device=cuda:0 puts every process on one GPU, which NCCL refuses"):
        distributed.setup_distributed("cuda:0")


def test_cuda_gloo_lets_more_processes_than_gpus_share_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """How one GPU runs the two-GPU preset as it is (device=cuda): process i takes GPU i modulo the GPUs."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: chosen.append(kw["backend"]))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("BOOKGPT_DIST_BACKEND", "cuda:gloo")
    d = distributed.setup_distributed("cuda")
    assert (d.device, d.rank, d.world) == ("cuda:0", 1, 2) and chosen == [0, "cuda:gloo"]


def test_deterministic_kernels_are_on_for_the_run_only(tiny_char_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_loop = train_mod.loop

    def loop(*a):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real_loop(*a)

    monkeypatch.setattr(train_mod, "loop", loop)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # so that the teardown removes what the run sets
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    for out, flag in ((tmp_path / "a", "true"), (tmp_path / "b", "false")):
        train(parse_config(TrainConfig, tiny_train_args(tiny_char_data, out, max_iters=4, deterministic=flag)))
    assert seen == [(True, ":4096:8"), (False, ":4096:8")]
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    # on a CPU the kernels are deterministic anyway: the same losses either way
    assert [r["loss"] for r in records(tmp_path / "a", "train")] == [r["loss"] for r in records(tmp_path / "b", "train")]


class HostReads(TorchDispatchMode):
    """Records every op that makes the host wait for a tensor's value (.item(), bool(), nonzero)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                    torch.ops.aten.is_nonzero.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_training_step_never_waits_for_the_device(tiny_char_data: Path, optimizer: str) -> None:
    """On a GPU each host read (loss.item(), a stop flag) leaves the GPU idle while the host catches
    up; train.py reads losses at log steps only. Under fp16 GradScaler reads its overflow flag, by design."""
    cfg = TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, gradient_accumulation_steps=2,
                      optimizer=optimizer, dropout=0.1, value_embeds=0, unet_skips=False, zero_init=False)
    model = GPT(GPTConfig.from_dict({**config_dict(cfg), "vocab_size": 200}))
    optimizers = make_optimizers(model, cfg, "cpu")
    meta = json.loads((tiny_char_data / "meta.json").read_text())
    loader = batches.Loader(batches.Batches(tiny_char_data, "train", meta["dtype"], 16, 2, "cpu"),
                              torch.Generator().manual_seed(0))
    params = list(model.parameters())
    for dtype, waits in (("float32", False), ("bfloat16", False), ("float16", True)):
        scaler = torch.amp.GradScaler("cpu", enabled=dtype == "float16")
        with HostReads() as mode:
            loss, stepped = train_mod.train_step(model, optimizers, scaler, params, loader, 2, autocast("cpu", dtype), 1.0)
        assert bool(mode.reads) == waits, (dtype, mode.reads)
        assert stepped and math.isfinite(loss.item())


@pytest.mark.parametrize("windows", ["random", "epoch"])
def test_batches_are_drawn_ahead_and_the_saved_stream_redraws_the_next(tmp_path: Path, windows: str) -> None:
    """A checkpoint saves Loader.state(): a resume from any step, a pass's last batch included, draws what came next."""
    np.arange(200, dtype=np.uint16).tofile(tmp_path / "train.bin")  # token i is i: a row's first token is its start
    b = batches.Batches(tmp_path, "train", "uint16", 16, 3, "cpu", windows)
    loader = batches.Loader(b, torch.Generator().manual_seed(5))
    stream = []
    for _ in range(12):  # passes of 3 or 4 batches: every kind of place to stop
        stream.append((loader.state(), next(loader)))  # the batch drawn ahead is not counted as used
    for k, (saved, _) in enumerate(stream):
        again = batches.Batches(tmp_path, "train", "uint16", 16, 3, "cpu", windows)
        gen = torch.Generator()
        again.resume(gen, *saved)
        redrawn = batches.Loader(again, gen)
        for _, (x, y) in stream[k:]:
            x2, y2 = next(redrawn)
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_epoch_windows_cover_the_text_once_a_pass(tmp_path: Path) -> None:
    """windows=epoch: a pass's windows start at one random offset plus multiples of block_size, none twice, in a
    shuffled order; a pass hands out all of them but the last part batch; the next pass has a new offset and order."""
    np.arange(200, dtype=np.uint16).tofile(tmp_path / "train.bin")
    b = batches.Batches(tmp_path, "train", "uint16", 16, 3, "cpu", "epoch")
    gen = torch.Generator().manual_seed(0)
    passes = []
    while len(passes) < 6:
        x, y = b.get(gen)
        assert torch.equal(y, x + 1) and x.shape == (3, 16)
        if b.pos == 3:
            passes.append([])
        passes[-1] += x[:, 0].tolist()
    for starts in passes[:-1]:
        offset = starts[0] % 16
        count = (199 - offset) // 16
        assert all(s % 16 == offset for s in starts) and len(set(starts)) == len(starts) == count - count % 3
        assert starts != sorted(starts)
    assert len({tuple(p) for p in passes}) == len(passes) and len({p[0] % 16 for p in passes}) > 1
    with pytest.raises(UserError, match="fewer than batch_size=20 whole windows"):
        batches.Batches(tmp_path, "train", "uint16", 16, 20, "cpu", "epoch")


def test_epoch_windows_and_multi_token_prediction_train_and_resume_exactly(tiny_char_data: Path, tmp_path: Path) -> None:
    kw = dict(windows="epoch", mtp_weight=0.5, dropout=0.1, lr_decay_iters=24, eval_interval=12)
    run(tiny_char_data, tmp_path / "straight", max_iters=24, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=12, **kw)
    run(tiny_char_data, tmp_path / "split", max_iters=24, init_from="resume", **kw)
    def losses(out: Path) -> list[tuple]:
        return [(r["iter"], r["loss"]) for r in records(out, "train")]

    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # bit-identical, step for step
    evals = records(tmp_path / "straight", "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert any(k.startswith("mtp.") for k in load_checkpoint(tmp_path / "split" / "ckpt.pt")["model"])


def test_non_finite_loss_between_log_steps_names_its_step_and_saves_nothing(
        tiny_char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Losses are read every log_interval steps; a bad one is found there, named by its own step, and
    the weights it came with are never saved, not even by a signal's save at a step between."""
    real_step = train_mod.train_step
    steps = []

    def step(*a, **kw):
        loss, stepped = real_step(*a, **kw)
        steps.append(1)
        return (loss * math.nan if len(steps) == 7 else loss), stepped

    monkeypatch.setattr(train_mod, "train_step", step)
    out = tmp_path / "run"
    with pytest.raises(train_mod.UserError, match=r"^loss became nan at step 7; the last good checkpoints"):
        run(tiny_char_data, out, max_iters=30, eval_interval=5, log_interval=4)
    assert [r["iter"] for r in records(out, "train")] == [4]
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 5  # the eval at step 5 saved; nothing after


def test_compile_that_fails_falls_back_to_eager_and_trains_the_same(tiny_char_data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """torch.compile is lazy: the try/except around the call caught nothing, and a compiler that cannot
    work here failed at the first forward with a traceback. Now training goes on in eager mode."""
    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=broken))
    torch._dynamo.reset()
    eager = run(tiny_char_data, tmp_path / "eager", max_iters=10, eval_interval=5)
    compiled = run(tiny_char_data, tmp_path / "compiled", max_iters=10, eval_interval=5, compile=True)
    torch._dynamo.reset()
    assert "warning: torch.compile failed (RuntimeError: no working C++ compiler); continuing in eager mode" in capsys.readouterr().out
    assert compiled["compile_error"] == "RuntimeError: no working C++ compiler"
    assert [r["loss"] for r in records(tmp_path / "compiled", "train")] == [r["loss"] for r in records(tmp_path / "eager", "train")]
    assert compiled["best_val_loss"] == eager["best_val_loss"]
    assert set(load_checkpoint(tmp_path / "compiled" / "ckpt.pt")["model"]) == set(load_checkpoint(tmp_path / "eager" / "ckpt.pt")["model"])


@pytest.mark.slow
def test_defaults_chain_train_resume_and_sample_and_protect_a_trained_run(book_text: str, tmp_path: Path) -> None:
    """A user in a fresh folder: `python prepare.py` writes the presets' data, `python train.py` trains the
    recommended recipe into out/wp_bpe_cpu, sample.py and evaluate.py find that run with no flags,
    `--init_from=resume` alone continues it with its own config, and a second scratch run into it is refused."""
    src = tmp_path / "book.txt"
    src.write_text(book_text[:150_000], encoding="utf-8")
    small = ["--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--threads=1",
             "--eval_interval=4", "--compile=false"]  # seconds on a CPU; the rest is the defaults (6 layers, levers on)

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    r = script("prepare.py", f"--input={src}")
    assert r.returncode == 0 and f"wrote {Path('data/war_and_peace_bpe2048')}/" in r.stdout, r.stderr[-2000:]
    r = script("train.py", "--max_iters=4", *small)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: warmup_iters=50 is longer than the run (max_iters=4)" in r.stderr
    run = tmp_path / "out" / "wp_bpe_cpu"
    assert load_checkpoint(run / "ckpt.pt")["iter_num"] == 4
    r = script("sample.py", "--prompt=Prince Andrew", "--num_samples=1", "--max_new_tokens=20")
    assert r.returncode == 0 and r.stdout.startswith("---------- sample 1 of 1\nPrince Andrew"), r.stderr[-2000:]
    assert f"sampling from {Path('out/wp_bpe_cpu/best.pt')} (step 4)" in r.stderr
    # a second scratch run would overwrite it: refused, in one line
    r = script("train.py", "--max_iters=4", *small)
    assert r.returncode == 2 and r.stderr == (f"error: {Path('out/wp_bpe_cpu')} already holds a trained run; continue "
                                              f"it with --init_from=resume, train into another --out_dir, or "
                                              f"replace it with --overwrite=true\n")
    # resume is one flag: the run's own config.json, the newest run
    r = script("train.py", "--init_from=resume", "--max_iters=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 4" in r.stdout and "max_iters 4 -> 8" in r.stdout
    assert load_checkpoint(run / "ckpt.pt")["iter_num"] == 8
    r = script("train.py", "--init_from=resume", "--max_iters=12", "--learning_rate=0.1")
    assert r.returncode == 2 and "cannot change learning_rate: 0.002 there vs 0.1 now when resuming" in r.stderr
    r = script("evaluate.py", "--num_prompts=0", "--baselines=false")
    assert r.returncode == 0 and f"evaluating {Path('out/wp_bpe_cpu/best.pt')}" in r.stderr, r.stderr[-2000:]
    r = script("train.py", "--max_iters=4", "--overwrite=true", *small)
    assert r.returncode == 0 and load_checkpoint(run / "ckpt.pt")["iter_num"] == 4


def test_the_progress_bar_shows_both_learning_rates_under_muon(tiny_char_data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    run(tiny_char_data, tmp_path / "run", max_iters=4, eval_interval=4, optimizer="muon", muon_lr=0.02,
        learning_rate=2e-3, min_lr=2e-4)
    err = capsys.readouterr().err
    assert "lr=" in err and "muon_lr=" in err  # AdamW's (embeddings, gains) and Muon's (hidden matrices)


def test_the_config_at_the_start_is_one_line(tiny_char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run(tiny_char_data, tmp_path / "run", max_iters=2, eval_interval=2)
    out = capsys.readouterr().out
    assert "{" not in out  # no JSON dump: the full config is in config.json
    lines = [l for l in out.splitlines() if l.startswith("config")]
    assert len(lines) == 1 and lines[0].startswith(f"config in {tmp_path / 'run' / 'config.json'}; set apart from the "
                                                   "defaults: ") and "n_layer=2" in lines[0] and "{" not in lines[0]
