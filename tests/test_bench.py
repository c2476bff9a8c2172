"""bench.py: its arithmetic (FLOPs per token, TFLOP/s, MFU, peaks) and a tiny --compare run. No timings are asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import BenchConfig, cache_verdict, device_peaks, gpu_peak_tflops, throughput
from bookgpt.common import native_bf16
from bookgpt.config import UserError, parse_config
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_layer": 1, "value_embeds": 0, "unet_skips": False, "zero_init": False, "n_head": 2, "n_embd": 16,
        "block_size": 16, "batch_size": 2, "dropout": 0.0, "compile": False,
        "device": "cpu", "threads": 1, "steps": 2, "warmup_steps": 1, "peak_size": 64,
        "sample_prompt": 6, "sample_tokens": 40}


def test_flops_tflops_and_mfu_match_a_hand_count() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32))
    C, L, T, V = 32, 2, 16, 37
    matmul = L * (3 * C * C + C * C + 4 * C * C + 4 * C * C) + V * C  # qkv, proj, fc, mlp proj; the head
    flops = 6 * matmul + 12 * L * C * T  # 6 per weight (forward + backward), plus attention
    # 4 sequences of 16 tokens in 0.032 s: 2,000 tokens/s
    fig = throughput(model.flops_per_token(T), tokens_per_step=64, seconds_per_step=0.032, peak_flops=1e9)
    assert fig["tokens_per_s"] == pytest.approx(2000.0)
    assert fig["ms_per_step"] == pytest.approx(32.0)
    assert fig["flops_per_token"] == flops == 6 * 24_576 + 6 * 1184 + 12_288
    assert fig["tflops"] == pytest.approx(flops * 2000 / 1e12)
    assert fig["mfu"] == pytest.approx(flops * 2000 / 1e9)
    # a shorter sequence has cheaper attention; no known peak, no MFU
    short = throughput(model.flops_per_token(8), 64, 0.032, peak_flops=None)
    assert short["flops_per_token"] == flops - 12 * L * C * 8
    assert short["mfu"] is None


def test_peaks_measured_on_cpu_and_overridable() -> None:
    cfg = BenchConfig(peak_size=64)
    measured = device_peaks(cfg, "cpu")
    assert measured["matmul_size"] == 64
    assert measured["measured_bfloat16_flops"] > 0 and measured["measured_float32_flops"] > 0
    # a CPU's peak: its bf16 product where it has bf16 units, else its fp32 one
    assert measured["peak_flops"] == measured[f"measured_{'bfloat16' if native_bf16('cpu') else 'float32'}_flops"]
    given = device_peaks(BenchConfig(peak_size=64, peak_tflops=2.5), "cpu")
    assert given["peak_flops"] == 2.5e12 and given["source"] == "--peak_tflops"


def test_gpu_datasheet_peaks() -> None:
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert gpu_peak_tflops("NVIDIA L40S") == 362.0 and gpu_peak_tflops("NVIDIA L4") == 121.0
    assert gpu_peak_tflops("Some Future GPU") is None


def test_the_kv_cache_verdict_asks_identical_tokens_on_a_cpu_in_float32_only() -> None:
    """A GPU (or half precision) rounds a one-token product and a whole-context one differently, and one
    flipped draw changes every later token: there the check is the logits, within the dtype's rounding."""
    assert cache_verdict("cpu", "float32", identical=True, logit_error=0.0)["ok"]
    assert not cache_verdict("cpu", "float32", identical=False, logit_error=1e-7)["ok"]
    gpu = cache_verdict("cuda", "float32", identical=False, logit_error=5e-4)
    assert gpu == {"logit_tolerance": 1e-3, "check": "logits within tolerance", "ok": True}
    assert not cache_verdict("cuda:1", "float32", identical=True, logit_error=2e-3)["ok"]  # identical is not enough
    assert cache_verdict("cuda", "bfloat16", identical=False, logit_error=2e-2)["ok"]
    assert not cache_verdict("cuda", "bfloat16", identical=False, logit_error=4e-2)["ok"]
    assert cache_verdict("cpu", "bfloat16", identical=False, logit_error=1e-2)["check"] == "logits within tolerance"


def test_training_config_files_are_accepted() -> None:
    cfg = parse_config(BenchConfig, [str(ROOT / "config/wp_char_2x4090.toml"), "--device=cpu", "--batch_size=16"])
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size, cfg.batch_size) == (6, 384, 6, 256, 16)
    assert cfg.compile and cfg.sample_tokens == 1000 and cfg.sample_prompt == 200


@pytest.mark.slow
def test_compare_runs_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [f"--{k}={v}" for k, v in TINY.items()] + ["--compare", f"--out={out}", f"--data_dir={tmp_path}"]
    r = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "bookgpt / plain:" in r.stdout and "tokens identical: yes" in r.stdout
    res = json.loads(out.read_text())
    plain, ours = res["train"]
    assert (plain["name"], plain["dtype"], plain["compile"], plain["attention"], plain["fused_adamw"]) == \
        ("plain", "float32", False, "math", False)
    assert ours["name"] == "bookgpt" and ours["dtype"] in ("bfloat16", "float32")  # dtype=auto: bf16 where the CPU has it
    # measured from the profiler's op names: bf16 on a CPU runs model.py's explicit attention, fp32 SDPA's flash kernel
    assert ours["attention"] == ("explicit" if ours["dtype"] == "bfloat16" else "flash")
    assert ours["fused_adamw"]
    for row in res["train"]:
        assert len(row["step_s_all"]) == TINY["steps"]
        assert row["tokens_per_step"] == 2 * 16
        assert row["tokens_per_s"] == pytest.approx(32 / (row["ms_per_step"] / 1e3))
        assert row["mfu"] == pytest.approx(row["tflops"] * 1e12 / res["peaks"]["peak_flops"])
        # the forward-backward and the optimizer step, timed apart
        assert row["forward_backward_ms"] > 0 and row["optimizer_ms"] > 0
        assert row["optimizer_share"] == pytest.approx(row["optimizer_ms"] / (row["optimizer_ms"] + row["forward_backward_ms"]))
    assert res["ratio"] == pytest.approx(ours["tokens_per_s"] / plain["tokens_per_s"])
    s = res["sampling"]
    assert s["identical"] and s["new_tokens"] == 40 and s["speedup"] > 0
    assert s["check"] == "identical tokens" and s["ok"] and s["max_logit_error"] < 1e-5
    assert res["data_ms_per_batch"] is None  # no prepared data in data_dir: nothing to time
    assert res["config"]["vocab_size"] == 104


def test_speedrun_trains_to_the_target_and_scores_test(tiny_char_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import bench
    out = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in {**TINY, "sample_tokens": 0}.items()] + [
        f"--data_dir={tiny_char_data}", f"--out_dir={out}", "--out=", "--speedrun=true", "--target_val_bpb=6.0",
        "--max_iters=200", "--eval_interval=5", "--eval_iters=2", "--learning_rate=3e-3", "--dtype=float32"]
    res = bench.run(parse_config(BenchConfig, args))["speedrun"]
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    # stopped at the first eval at or below the target (every eval before it was above)
    assert res["reached"] and res["steps"] == evals[-1]["iter"] < 200 and evals[-1]["val_bpb"] <= 6.0
    assert all(e["val_bpb"] > 6.0 for e in evals[:-1]) and res["tokens"] == res["steps"] * 2 * 16
    assert res["minutes_at_bench_speed"] == pytest.approx(res["steps"] * res["bench_ms_per_step"] / 60e3)
    assert 0 < res["test_bpb"] < 8 and (out / "eval.json").is_file()  # evaluate.py's full pass on test
    assert f"reached val bpb <= 6 (training's estimate) in {res['steps']} steps" in capsys.readouterr().out
    # with a weight average, val's estimate chooses which of best.pt and ema.pt the test pass scores
    real_records_of, ema_wins = bench.records_of, False

    def summary_maybe_with_a_better_average(records, kind):  # as bench.py reads train.py's summary
        found = real_records_of(records, kind)
        return [{**r, "best_ema_val_bpb": 0.0} for r in found] if ema_wins and kind == "summary" else found
    monkeypatch.setattr(bench, "records_of", summary_maybe_with_a_better_average)
    for ema_wins in (False, True):  # as trained, then with the average made the better on val
        res = bench.run(parse_config(BenchConfig, args + ["--ema_decay=0.5", "--overwrite=true"]))["speedrun"]
        summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        chosen = "ema" if ema_wins or summary["best_ema_val_bpb"] < summary["best_val_bpb"] else "best"
        report = out / ("eval_ema.json" if chosen == "ema" else "eval.json")  # evaluate.py names ema.pt's its own
        assert res["checkpoint"] == json.loads(report.read_text())["settings"]["ckpt"] == chosen
        assert res["best_iter"] == summary["best_ema_iter" if chosen == "ema" else "best_iter"]
    with pytest.raises(UserError, match="needs a finish line"):
        bench.run(parse_config(BenchConfig, ["--speedrun=true"]))


@pytest.mark.slow
def test_bad_options_are_one_clear_error() -> None:
    for bad, msg in (("--steps=0", "'steps' must be at least 1"), ("--warmup_step=2", "did you mean warmup_steps"),
                     ("--sample_dtype=int8", "sample_dtype")):
        r = subprocess.run([sys.executable, "bench.py", bad], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        assert r.stderr.startswith("error: ") and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


# A stand-in for nanoGPT's model.py with its interface (GPTConfig fields, GPT(config), forward(idx, targets)
# -> (logits, loss), configure_optimizers(weight_decay, learning_rate, betas, device_type)); the real file
# comes from a nanoGPT checkout the user points --nanogpt at.
NANOGPT_LIKE = """
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.mlp = nn.Sequential(*[nn.Linear(config.n_embd, config.n_embd, bias=config.bias) for _ in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        print("number of parameters: ...")

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.mlp(self.wte(idx)))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        print("using fused AdamW: False")
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
"""


@pytest.mark.slow
def test_nanogpt_checkout_is_timed_beside_bookgpt(tmp_path: Path) -> None:
    (tmp_path / "nanoGPT").mkdir()
    (tmp_path / "nanoGPT" / "model.py").write_text(NANOGPT_LIKE)
    out = tmp_path / "bench.json"
    args = [f"--{k}={v}" for k, v in {**TINY, "sample_tokens": 0}.items()]
    r = subprocess.run([sys.executable, "bench.py", *args, f"--nanogpt={tmp_path / 'nanoGPT'}", f"--out={out}",
                        f"--data_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    ours, theirs = res["train"]
    assert (ours["name"], theirs["name"]) == ("bookgpt", "nanogpt")
    assert theirs["dtype"] == "float32"  # nanoGPT's train.py uses no autocast on a CPU
    # its FLOPs counted the same way as ours: 6 per Linear weight (1 layer of 16 x 16 + the head), attention
    assert theirs["flops_per_token"] == 6 * (16 * 16 + 16 * 104) + 12 * 1 * 16 * 16
    assert res["ratio_nanogpt"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert "bookgpt / nanoGPT:" in r.stdout
    r = subprocess.run([sys.executable, "bench.py", f"--nanogpt={tmp_path / 'nowhere'}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: no nanoGPT model.py in {tmp_path / 'nowhere'}")
