"""train.py end to end on tiny models: checkpoints, best tracking, early stopping, exact resume, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_mod
from checkpoint import load_checkpoint, save_checkpoint
from config import parse_config
from conftest import tiny_train_args
from model import GPT, GPTConfig
from distill import Teacher, distill_loss
from optim import Muon, lr_factor, zeropower_via_newtonschulz5
from train import TrainConfig, train

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


def test_lr_schedules() -> None:
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_schedule="cosine")
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(1 / 11)
    assert lr_factor(cfg, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_factor(cfg, 99, 1.0) == pytest.approx(0.1)
    wsd = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=0, lr_schedule="wsd", decay_frac=0.2)
    assert lr_factor(wsd, 5, 0.79) == 1.0
    assert lr_factor(wsd, 5, 0.9) == pytest.approx(0.55)
    assert lr_factor(wsd, 5, 1.0) == pytest.approx(0.1)


def test_newton_schulz_orthogonalises() -> None:
    torch.manual_seed(0)
    for shape in [(32, 32), (64, 16), (16, 64)]:
        O = zeropower_via_newtonschulz5(torch.randn(*shape)).float()
        s = torch.linalg.svdvals(O)
        # Muon's quintic iteration maps singular values into roughly [0.7, 1.2], not exactly 1
        assert s.min() > 0.5 and s.max() < 1.3, s


def test_muon_weight_decay_is_decoupled_and_old_states_load() -> None:
    torch.manual_seed(0)
    w0, grad = torch.randn(16, 8), torch.randn(16, 8)
    after = {}
    for wd in (0.0, 0.5):
        p = torch.nn.Parameter(w0.clone())
        p.grad = grad.clone()
        Muon([p], lr=0.1, weight_decay=wd).step()
        after[wd] = p.detach()
    # the same orthogonalised step, plus a shrink of lr * wd = 5% of the weight before it
    assert torch.allclose(after[0.5] - after[0.0], -0.05 * w0, atol=1e-6)
    assert not torch.equal(after[0.0], w0)
    # a state saved before the option existed has no weight_decay in its groups: it loads as 0
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, weight_decay=0.3)
    state = opt.state_dict()
    del state["param_groups"][0]["weight_decay"]
    opt.load_state_dict(state)
    p.grad = grad.clone()
    opt.step()
    assert torch.allclose(p.detach(), after[0.0], atol=1e-6)


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
    one, two = Teacher([str(tmp_path / "t1")], meta, 32, "cpu"), Teacher([str(tmp_path / "t1"), str(tmp_path / "t2")], meta, 32, "cpu")
    x = torch.randint(meta["vocab_size"], (3, 32))
    logp1, logp2 = one(x)[0], two(x)[0]
    assert torch.allclose(logp2.exp().sum(-1), torch.ones(3, 32), atol=1e-5)  # a distribution at every position
    # the mean of the two runs' probabilities, not of their logits
    p_t2 = Teacher([str(tmp_path / "t2")], meta, 32, "cpu")(x)[0].exp()
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
    # averaging probabilities never loses to the runs' mean loss (-log is convex), and here it gains
    assert teacher["val_loss"] < sum(best) / 2 - 1e-3
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5 and summary["iter"] == 30
    # resume keeps the teacher's record and continues
    run(tiny_char_data, out, distill_from=str(tmp_path / "t1") + "," + str(tmp_path / "t2"), distill_weight=0.7,
        init_from="resume", **{**kw, "max_iters": 45})
    assert len(records(out, "teacher")) == 1 and load_checkpoint(out / "ckpt.pt")["iter_num"] == 45


def test_distillation_refuses_teachers_it_cannot_use(tiny_char_data: Path, tmp_path: Path,
                                                    book_path: Path) -> None:
    run(tiny_char_data, tmp_path / "t", max_iters=2, eval_interval=2)
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    with pytest.raises(train_mod.UserError, match="block_size 32 is shorter than the student's 64"):
        Teacher([str(tmp_path / "t")], meta, 64, "cpu")
    with pytest.raises(train_mod.UserError, match="trained on other data"):
        Teacher([str(tmp_path / "t")], {**meta, "sha256_clean": "0" * 64}, 32, "cpu")
    with pytest.raises(train_mod.UserError, match="no checkpoint at"):
        Teacher([str(tmp_path / "nowhere")], meta, 32, "cpu")
    args = tiny_train_args(tiny_char_data, tmp_path / "x")
    r = subprocess.run([sys.executable, "train.py", *args, "--distill_weight=1.5"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: distill_weight must be in [0, 1], got 1.5"
    r = subprocess.run([sys.executable, "train.py", *args, f"--distill_from={tmp_path / 'nowhere'}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no checkpoint at") and not (tmp_path / "x").exists()


def test_compiled_model_saves_plain_keys(tmp_path: Path) -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8))
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    save_checkpoint(tmp_path / "c.pt", compiled)
    keys = load_checkpoint(tmp_path / "c.pt")["model"].keys()
    assert set(keys) == set(model.state_dict().keys())


def test_torchrun_two_processes_gloo(tiny_char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = tiny_train_args(tiny_char_data, out, max_iters=6, eval_interval=3, gradient_accumulation_steps=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 6
    assert len(ckpt["rng"]) == 2  # both ranks' streams are saved ...
    assert not torch.equal(ckpt["rng"][0]["batches"], ckpt["rng"][1]["batches"])  # ... and they differ
    assert [r["iter"] for r in records(out, "eval")] == [0, 3, 6]
    # 4 micro-batches of 4 x 32 tokens per step: 2 on each process (no_sync on the first)
    assert records(out, "summary")[0]["tokens_seen"] == 6 * 4 * 4 * 32
    # and it resumes with two processes
    args = tiny_train_args(tiny_char_data, out, max_iters=9, eval_interval=3, gradient_accumulation_steps=4,
                           init_from="resume")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 9


@pytest.mark.parametrize("key,value,message", [
    ("max_iters", 0, "'max_iters' must be positive, got 0"),
    ("max_minutes", -1.0, "'max_minutes' must be 0 or more, got -1.0"),
    ("early_stop_patience", -2, "'early_stop_patience' must be 0 or more, got -2"),
])
def test_budget_keys_are_checked_before_training(key: str, value, message: str) -> None:
    cfg = parse_config(TrainConfig, [f"--{key}={value}"])
    with pytest.raises(train_mod.UserError, match=message.replace("(", r"\(")):
        train_mod.validate(cfg)


def test_invalid_values_are_one_clear_error_line(tiny_char_data: Path, tmp_path: Path) -> None:
    args = tiny_train_args(tiny_char_data, tmp_path / "x")
    r = subprocess.run([sys.executable, "train.py", *args, "--batch_size=0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: 'batch_size' must be positive, got 0"
