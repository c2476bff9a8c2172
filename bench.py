"""Measure how fast bookgpt trains and samples: tokens/s, ms/step, FLOPs per token, TFLOP/s, MFU.

    python bench.py                                              # the default model, as train.py would run it here
    python bench.py config/wp_char_2x4090.toml --device=cpu --batch_size=16 --gradient_accumulation_steps=1 --compare
    python bench.py config/wp_char_2x4090.toml --compare         # on a GPU: flash attention check, datasheet MFU
    python bench.py config/speedrun_cpu.toml --speedrun=true     # steps and time to a target bpb (make speedrun)

Training steps are timed after warm-up (the first step, which compiles when compile=true, is
reported on its own) on random tokens with train.py's own train_step: forward and backward under
autocast, gradient clipping, the optimizer step, no wait for the device inside a step. The
forward-backward and the optimizer step are also timed apart (the optimizer's share of a step).
MFU is achieved FLOP/s over the device's peak: on a CPU the best bf16 (and fp32) matrix product
this script measures here, on a known GPU its datasheet bf16 peak; --peak_tflops overrides both.
--compare also runs a plain configuration (float32, eager, the unfused "math" attention, a
for-loop AdamW), and --nanogpt=PATH nanoGPT's model.py from a checkout, as its train.py runs it;
their steps are interleaved with bookgpt's so all see the same machine load. Sampling times
max_new_tokens after a prompt with the KV cache and without it (recomputing the context every
token): on a CPU in float32 the two must give the same tokens, elsewhere the same logits within
rounding. --speedrun then trains the config to its target_val_bpb with train.py and scores the best
checkpoint on test with evaluate.py: the steps, tokens and minutes of training steps it took, beside
the median step time measured first, so another machine's time is its own step time times the steps.
Prints a table and writes --out (JSON).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bookgpt.batches import Batches
from bookgpt.common import (CompiledWithFallback, autocast, native_bf16, read_metrics, records_of, resolve_device,
                            resolve_dtype, sync)
from bookgpt.config import UserError, atomic_write_json, cli, config_dict, opt, parse_config, to_flags
from bookgpt.eval.report import output_names
from bookgpt.optim import WeightAverage, make_optimizers, optimizer_step
from bookgpt.sampling import TEMPERATURE, TOP_K, TOP_P
from bookgpt.tokenizer import read_meta
from bookgpt.training import TrainConfig, forward_backward, train_step, validate
from model import GPT, GPTConfig, training_flops

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (GeForce cards: with fp32
# accumulation, which is what bf16 autocast uses). Checked in order, so "H100 PCIe" before "H100".
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                   ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("L40S", 362.0), ("L4", 121.0))
# substrings of the aten op names of SDPA's backends (forward and backward), as the profiler shows them
SDPA_OPS = (("flash_attention", "flash"), ("efficient_attention", "efficient"), ("cudnn_attention", "cudnn"),
            ("attention_math", "math"))
CHAR_VOCAB = 104  # War and Peace's distinct characters: the vocabulary when no prepared data is found


@dataclass
class BenchConfig(TrainConfig):
    """Every training key (so train.py's config files work here) plus the benchmark's own. vocab_size 0
    is the prepared data's (data_dir/meta.json), or War and Peace's 104 characters when there is none."""
    warmup_steps: int = opt(3, "untimed steps first (the first one compiles when compile=true)")
    steps: int = opt(10, "timed training steps per configuration")
    sync_every: int = opt(0, "steps per timed sample, waiting for the device only around them (0 = 1 on a CPU, "
                             "10 on a GPU, where train.py waits only at log steps)")
    nanogpt: str = opt("", "path of a nanoGPT checkout: also time its model.py as its train.py runs it")
    compare: bool = opt(False, "also run the plain configuration (float32, eager, unfused) and print the ratio")
    peak_tflops: float = opt(0.0, "the device's peak TFLOP/s for MFU (0 = measure it on CPU, datasheet on GPU)")
    peak_size: int = opt(0, "matrix size for the measured matmul peak (0 = 2048 on CPU, 8192 on GPU)")
    sample_tokens: int = opt(1000, "tokens to generate in the sampling benchmark (0 = skip it)")
    sample_prompt: int = opt(200, "prompt length in tokens for the sampling benchmark")
    sample_dtype: str = opt("float32", "precision for sampling; float32 keeps cached and uncached tokens identical")
    profile: bool = opt(False, "print the torch.profiler table of one step of each configuration")
    out: str = opt("out/bench.json", "write the results here as JSON ('' = don't)")
    speedrun: bool = opt(False, "then train the config to its target_val_bpb (train.py) and score it on test "
                                "(evaluate.py): steps and time to the target")


def check(cfg: BenchConfig) -> None:
    validate(cfg)
    for key in ("steps", "sample_prompt"):
        if getattr(cfg, key) < 1:
            raise UserError(f"'{key}' must be at least 1, got {getattr(cfg, key)}")
    for key in ("warmup_steps", "sample_tokens", "peak_size", "sync_every"):
        if getattr(cfg, key) < 0:
            raise UserError(f"'{key}' must be >= 0, got {getattr(cfg, key)}")
    if cfg.peak_tflops < 0:
        raise UserError(f"'peak_tflops' must be >= 0 (0 = measure / datasheet), got {cfg.peak_tflops}")
    if cfg.speedrun and cfg.target_val_bpb <= 0:
        raise UserError("--speedrun needs a finish line: set target_val_bpb (config/speedrun_cpu.toml sets 1.6)")
    if cfg.sample_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"bad value for 'sample_dtype': {cfg.sample_dtype!r}; use one of auto, float32, bfloat16, float16")


# ----------------------------------------------------------------------------- arithmetic

def throughput(flops_per_token: int, tokens_per_step: int, seconds_per_step: float,
               peak_flops: float | None) -> dict[str, float | None]:
    """The figures of one timed configuration, from its training FLOPs per token (6N + attention)."""
    tokens_per_s = tokens_per_step / seconds_per_step
    tflops = flops_per_token * tokens_per_s / 1e12
    return {"ms_per_step": seconds_per_step * 1e3, "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
            "tflops": tflops, "mfu": tflops * 1e12 / peak_flops if peak_flops else None}


def matmul_peak(dtype: torch.dtype, n: int, device: str, seconds: float = 1.0, max_reps: int = 50) -> float:
    """Best FLOP/s of an n x n x n matrix product in dtype (of the repetitions that fit in `seconds`):
    the practical ceiling of this device."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    a @ b
    sync(device)
    best, spent, reps = math.inf, 0.0, 0
    while reps < 3 or (spent < seconds and reps < max_reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * n ** 3 / best


def gpu_peak_tflops(name: str) -> float | None:
    """The datasheet bf16 TFLOP/s of a GPU by its CUDA name, or None when it is not in the table."""
    return next((tf for key, tf in GPU_PEAK_TFLOPS if key in name), None)


def device_peaks(cfg: BenchConfig, device: str) -> dict[str, Any]:
    """Measured bf16 and fp32 matmul peaks, and the peak MFU is taken against (in FLOP/s)."""
    n = cfg.peak_size or (8192 if device.startswith("cuda") else 2048)
    peaks: dict[str, Any] = {"matmul_size": n}
    cpu_bf16 = device != "cpu" or native_bf16("cpu")  # emulated bf16: a 2048^3 product takes a minute
    for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        peaks[f"measured_{name}_flops"] = matmul_peak(dt, n if name == "float32" or cpu_bf16 else min(n, 256), device)
    if cfg.peak_tflops > 0:
        peaks.update(peak_flops=cfg.peak_tflops * 1e12, source="--peak_tflops")
    elif device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device))
        tf = gpu_peak_tflops(gpu)
        peaks.update(peak_flops=tf * 1e12 if tf else None,
                     source=f"datasheet bf16 ({gpu})" if tf else f"unknown GPU {gpu}: pass --peak_tflops")
    elif cpu_bf16:  # a CPU has no datasheet figure worth trusting: its best bf16 product, measured here
        peaks.update(peak_flops=peaks["measured_bfloat16_flops"], source=f"measured bf16 matmul {n}^3")
    else:  # no bf16 units: float32 is this CPU's fastest precision (and what dtype=auto picks)
        peaks.update(peak_flops=peaks["measured_float32_flops"], source=f"measured fp32 matmul {n}^3 (no bf16 units)")
    return peaks


# ----------------------------------------------------------------------------- training

def load_nanogpt(path: str) -> Any:
    """nanoGPT's model.py (GPT, GPTConfig, configure_optimizers) from a checkout the user points at."""
    import importlib.util
    file = Path(path) / "model.py"
    if not file.is_file():
        raise UserError(f"no nanoGPT model.py in {path}: pass --nanogpt=PATH of a nanoGPT checkout "
                        f"(git clone https://github.com/karpathy/nanoGPT)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.GPT, module.GPTConfig  # noqa: B018 - the names this benchmark uses
    except Exception as e:  # noqa: BLE001 - someone else's file: any failure is the user's to fix
        raise UserError(f"cannot load nanoGPT's model from {file}: {type(e).__name__}: {e}") from None
    return module


class TrainRun:
    """One configuration's model, optimizers and batches, stepped with train.py's own train_step.

    kind: "bookgpt" (as train.py runs it), "plain" (float32, eager, the unfused math attention, a
    for-loop AdamW: the reference), or "nanogpt" (nanoGPT's model.py as its train.py runs it:
    autocast on a GPU, torch.compile, its configure_optimizers, clipping; `nanogpt` is its module)."""

    def __init__(self, kind: str, cfg: BenchConfig, device: str, nanogpt: Any = None) -> None:
        self.name, self.cfg, self.device, self.plain = kind, cfg, device, kind == "plain"
        self.dtype = resolve_dtype(cfg.dtype, device)
        torch.manual_seed(cfg.seed)  # every configuration starts from the same weights
        gpt_cfg = GPTConfig.from_dict(config_dict(cfg))
        self.flops_per_token = GPT(gpt_cfg).flops_per_token(cfg.block_size)
        if kind == "nanogpt":
            self.model = nanogpt.GPT(nanogpt.GPTConfig(
                block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)).to(device)
            self.flops_per_token = training_flops(self.model, cfg.n_layer, cfg.n_embd, cfg.block_size)
            with contextlib.redirect_stdout(None):  # it prints its choice of fused AdamW
                self.optimizers = [self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                                   (cfg.beta1, cfg.beta2), device.split(":")[0])]
            # nanoGPT's train.py: no autocast on a CPU ("cpu" gets a nullcontext there)
            self.dtype = self.dtype if device.startswith("cuda") else "float32"
        else:
            self.model = GPT(gpt_cfg).to(device)
            self.optimizers = make_optimizers(self.model, cfg, device)
        if self.plain:  # the reference implementation: one parameter at a time, no multi-tensor or fused kernels
            for group in (g for o in self.optimizers for g in o.param_groups):
                group.update(fused=False, foreach=False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # train.py updates its weight average after every step: that is part of the step's time
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay and kind == "bookgpt" else None
        self.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=self.dtype == "float16")
        self.ctx = autocast(device, self.dtype)
        gen = torch.Generator().manual_seed(cfg.seed)
        tokens = torch.randint(cfg.vocab_size, (cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size + 1),
                               generator=gen).to(device)
        self.batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]  # nanoGPT .view()s them
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.attention = self.attention_backend()
        self.forward: torch.nn.Module = self.model
        if cfg.compile and not self.plain:
            self.forward = CompiledWithFallback(self.model)
        self.first_step_s = 0.0
        self.times: list[float] = []
        self.split: dict[str, float] = {}

    def kernels(self) -> contextlib.AbstractContextManager:
        """Plain attention is the unfused reference (softmax(QK^T)V as separate ops)."""
        return sdpa_kernel([SDPBackend.MATH]) if self.plain else contextlib.nullcontext()

    def attention_backend(self) -> str:
        """The attention kernel this configuration runs (eager), read from the profiler's op names of
        one forward and backward: SDPA's flash, efficient, cudnn or math backend, or "explicit"
        (no SDPA op: model.py's own softmax(QK^T)V, which it uses for bf16 on a CPU)."""
        from torch.profiler import ProfilerActivity, profile
        x, y = (t[:1] for t in self.batches[0])
        with warnings.catch_warnings():
            # SDPA explains each backend it skips, and some torch releases warn about the profiler's cycles
            # as it starts: the op names say it all
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with self.kernels(), self.ctx:
                    _, loss = self.model(x, y)
                loss.backward()
        self.model.zero_grad(set_to_none=True)
        names = {e.key for e in prof.key_averages()}
        found = [label for key, label in SDPA_OPS if any(key in n for n in names)]
        return "+".join(found) if found else "explicit"

    def step(self) -> torch.Tensor:
        """One training step (all micro-batches, clip, optimizers, the weight average); the loss is left
        unread, as train.py does."""
        with self.kernels():
            loss, _ = train_step(self.forward, self.optimizers, self.scaler, self.params, iter(self.batches),
                                 len(self.batches), self.ctx, self.cfg.grad_clip)
        if self.ema is not None:
            self.ema.update()
        return loss

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        self.step()  # compiles when compile=true (CompiledWithFallback: eager if the compiler fails)
        sync(self.device)
        self.first_step_s = time.perf_counter() - t0
        for _ in range(self.cfg.warmup_steps - 1):
            self.step()

    def timed_steps(self, n: int) -> None:
        """n steps back to back, waiting for the device only before and after (as train.py waits only
        at log steps); their mean is one sample."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        self.times.append((time.perf_counter() - t0) / n)

    def time_parts(self, n: int = 3) -> None:
        """Median ms of the forward and backward passes and of the optimizer step, timed apart."""
        fb, opt = [], []
        for _ in range(n):
            with self.kernels():
                sync(self.device)
                t0 = time.perf_counter()
                forward_backward(self.forward, iter(self.batches), len(self.batches), self.ctx, self.scaler)
                sync(self.device)
                t1 = time.perf_counter()
                optimizer_step(self.optimizers, self.scaler, self.params, self.cfg.grad_clip)
                sync(self.device)
                fb.append(t1 - t0)
                opt.append(time.perf_counter() - t1)
        self.split = {"forward_backward_ms": statistics.median(fb) * 1e3, "optimizer_ms": statistics.median(opt) * 1e3}

    def result(self, peak_flops: float | None, measured: dict[str, Any]) -> dict[str, Any]:
        # the median sample: a neighbour's burst of work on a shared machine does not move it
        seconds = statistics.median(self.times)
        figures = throughput(self.flops_per_token, self.tokens_per_step, seconds, peak_flops)
        own_peak = measured.get(f"measured_{'float32' if self.dtype == 'float32' else 'bfloat16'}_flops")
        compiled = isinstance(self.forward, CompiledWithFallback) and self.forward.compiled
        parts = sum(self.split.values()) if self.split else 0.0
        return {"name": self.name, "dtype": self.dtype, "compile": compiled, "attention": self.attention,
                "fused_adamw": bool(self.optimizers[0].param_groups[0].get("fused")),
                "params": sum(p.numel() for p in self.params), "tokens_per_step": self.tokens_per_step, **figures,
                # MFU against the measured peak of this configuration's own precision (fp32 rows: fp32 peak)
                "mfu_own_dtype": figures["tflops"] * 1e12 / own_peak if own_peak else None,
                **self.split, "optimizer_share": self.split["optimizer_ms"] / parts if parts else None,
                "first_step_s": self.first_step_s,
                "compile_s": max(0.0, self.first_step_s - seconds) if compiled else 0.0,
                "compile_error": getattr(self.forward, "error", ""), "step_s_all": self.times}

    def profile(self) -> str:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            self.step()
            sync(self.device)
        key = "self_device_time_total" if self.device.startswith("cuda") else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=15)


def bench_training(cfg: BenchConfig, device: str, peaks: dict[str, Any]) -> list[dict[str, Any]]:
    runs = [TrainRun("bookgpt", cfg, device)]
    if cfg.compare:
        runs.insert(0, TrainRun("plain", replace(cfg, dtype="float32", compile=False), device))
    if cfg.nanogpt:
        runs.append(TrainRun("nanogpt", replace(cfg, dtype="auto"), device, nanogpt=load_nanogpt(cfg.nanogpt)))
    for r in runs:
        print(f"warming up {r.name} ({r.dtype}, {'compile' if r.forward is not r.model else 'eager'}, "
              f"attention: {r.attention})...", flush=True)
        r.warm_up()
    block = cfg.sync_every or (1 if device == "cpu" else 10)
    for _ in range(max(1, cfg.steps // block)):  # interleaved: a change in machine load hits every configuration alike
        for r in runs:
            r.timed_steps(block)
    for r in runs:
        r.time_parts()
    if cfg.profile:
        for r in runs:
            print(f"\nprofile of one {r.name} step:\n{r.profile()}")
    return [r.result(peaks["peak_flops"], peaks) for r in runs]


# ----------------------------------------------------------------------------- sampling

def bench_sampling(cfg: BenchConfig, device: str) -> dict[str, Any]:
    """Tokens/s of model.generate with and without the KV cache: same weights, seed and settings."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig.from_dict({**config_dict(cfg), "dropout": 0.0})).to(device).eval()
    dtype = resolve_dtype(cfg.sample_dtype, device)
    prompt = torch.randint(cfg.vocab_size, (1, cfg.sample_prompt), generator=torch.Generator().manual_seed(cfg.seed))
    prompt = prompt.to(device)

    def generate(n: int, use_cache: bool) -> tuple[torch.Tensor, float]:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            out = model.generate(prompt, n, TEMPERATURE, TOP_K or None, TOP_P if TOP_P < 1 else None,
                                 generator=gen, use_cache=use_cache)
        sync(device)
        return out, time.perf_counter() - t0

    # TF32 (which run() turns on for training) rounds a one-token product and a whole-context one
    # differently: full float32 here, so the two paths can give the same tokens
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        generate(8, True), generate(8, False)  # warm-up: first-call allocations and kernel choices
        cached, t_cached = generate(cfg.sample_tokens, True)
        uncached, t_uncached = generate(cfg.sample_tokens, False)
        error = cache_logit_error(model, cached[:, -model.config.block_size:], dtype, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    new_c, new_u = cached[0, cfg.sample_prompt:], uncached[0, cfg.sample_prompt:]
    same = torch.equal(new_c, new_u)
    diff = None if same else int((new_c != new_u).nonzero()[0, 0])
    return {"dtype": dtype, "prompt_tokens": cfg.sample_prompt, "new_tokens": cfg.sample_tokens,
            "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P,  # sample.py's defaults for a run without its own
            "cached_tokens_per_s": cfg.sample_tokens / t_cached, "uncached_tokens_per_s": cfg.sample_tokens / t_uncached,
            "speedup": t_uncached / t_cached, "identical": same, "first_difference": diff,
            "max_logit_error": error, **cache_verdict(device, dtype, same, error)}


def cache_verdict(device: str, dtype: str, identical: bool, logit_error: float) -> dict[str, Any]:
    """Whether the KV cache gave what recomputing gives. Bit-identical tokens are the test on a CPU in
    float32. Elsewhere (a GPU, or half precision) a one-token product and a whole-context one may round
    differently (other kernels), and one flipped draw changes every token after it: there the cache must
    give the same logits as recomputing, within rounding of the dtype."""
    exact = device == "cpu" and dtype == "float32"
    tolerance = 1e-3 if dtype == "float32" else 3e-2
    return {"logit_tolerance": tolerance, "check": "identical tokens" if exact else "logits within tolerance",
            "ok": identical if exact else logit_error <= tolerance}


@torch.no_grad()
def cache_logit_error(model: GPT, seq: torch.Tensor, dtype: str, device: str) -> float:
    """Largest difference between the logits of the KV-cache path (a prefill of half of seq, then
    one token at a time) and one forward pass over all of seq, relative to the largest logit."""
    half = seq.size(1) // 2
    with autocast(device, dtype):
        full, _ = model(seq)
        cache = model.new_cache(seq.size(0), seq.device)
        parts = [model(seq[:, :half], cache=cache)[0]]
        parts += [model(seq[:, i:i + 1], cache=cache)[0] for i in range(half, seq.size(1))]
    cached = torch.cat(parts, dim=1).float()
    return float((cached - full.float()).abs().max() / full.float().abs().max().clamp_min(1e-9))


# ----------------------------------------------------------------------------- report

def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_report(res: dict[str, Any]) -> None:
    m, p, load = res["machine"], res["peaks"], res["load_avg"]
    print(f"\n{m.get('gpu', m['cpu'])}, {m['torch_threads']} torch threads, torch {m['torch']}, "
          f"load average {load[0]:.2f} (1 min) at the start")
    print(f"matmul peak {p['matmul_size']}^3: bf16 {p['measured_bfloat16_flops'] / 1e12:.3f} TFLOP/s, "
          f"fp32 {p['measured_float32_flops'] / 1e12:.3f} TFLOP/s; MFU against "
          f"{_fmt(p['peak_flops'] and p['peak_flops'] / 1e12, '.3f')} TFLOP/s ({p['source']})")
    rows = res["train"]
    print(f"model: {rows[0]['params'] / 1e6:.2f}M params, {rows[0]['flops_per_token'] / 1e6:.1f} MFLOPs per token "
          f"(training), {rows[0]['tokens_per_step']:,} tokens per step\n")
    head = ("config", "dtype", "compile", "attention", "ms/step", "tokens/s", "TFLOP/s", "MFU", "MFU own",
            "optimizer", "1st step s")
    table = [head] + [(r["name"], r["dtype"], "yes" if r["compile"] else "no", r["attention"], f"{r['ms_per_step']:.1f}",
                       f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.3f}", _fmt(r["mfu"] and 100 * r["mfu"], ".1f") + "%",
                       _fmt(r["mfu_own_dtype"] and 100 * r["mfu_own_dtype"], ".1f") + "%",
                       f"{r['optimizer_ms']:.1f} ms ({100 * r['optimizer_share']:.0f}%)", f"{r['first_step_s']:.1f}")
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if "ratio" in res:
        print(f"\nbookgpt / plain: {res['ratio']:.2f}x the tokens/s")
    if "ratio_nanogpt" in res:
        print(f"bookgpt / nanoGPT: {res['ratio_nanogpt']:.2f}x the tokens/s")
    for r in rows:
        if r["compile"]:
            print(f"{r['name']}: compile took ~{r['compile_s']:.1f} s (first step minus a steady one)")
    if res.get("data_ms_per_batch") is not None:
        print(f"data loading (batches.Batches): {res['data_ms_per_batch']:.2f} ms per micro-batch")
    if s := res.get("sampling"):
        print(f"\nsampling {s['new_tokens']} tokens after a {s['prompt_tokens']}-token prompt ({s['dtype']}): "
              f"KV cache {s['cached_tokens_per_s']:,.1f} tokens/s, recomputing {s['uncached_tokens_per_s']:,.1f} "
              f"tokens/s: {s['speedup']:.1f}x; tokens identical: "
              + ("yes" if s["identical"] else f"no (first difference at new token {s['first_difference']})")
              + f"; largest logit difference {s['max_logit_error']:.1e} of the largest logit "
              + f"({s['check']}: {'passed' if s['ok'] else 'FAILED'})")


def data_ms_per_batch(cfg: BenchConfig, device: str, n: int = 20) -> float | None:
    """Time train.py's batch loader on the prepared data, when there is any."""
    data_dir = Path(cfg.data_dir)
    if not (data_dir / "meta.json").is_file():
        return None
    b = Batches(data_dir, "train", read_meta(data_dir)["dtype"], cfg.block_size, cfg.batch_size, device)
    gen = torch.Generator().manual_seed(0)
    b.get(gen)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        b.get(gen)
    sync(device)
    return (time.perf_counter() - t0) / n * 1e3


def run_script(script: str, keys: dict[str, Any]) -> None:
    """Run another of the scripts (python SCRIPT --key=value ...) with this one's output; its failure is this one's."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / script), *to_flags(keys)])
    if done.returncode:
        raise SystemExit(done.returncode)


def speedrun(cfg: BenchConfig, ms_per_step: float) -> dict[str, Any]:
    """Train the config from scratch until an eval's val bpb reaches target_val_bpb (or its max_iters),
    then evaluate.py's full pass of the best checkpoint on test (val chose the step; test reports it)."""
    print(f"\nspeedrun: training {cfg.out_dir} to val bpb <= {cfg.target_val_bpb:g}...", flush=True)
    run_script("train.py", {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})
    records, _ = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
    summary = records_of(records, "summary")[-1]
    # the weight average (ema_decay) or the weights, whichever val (training's estimate) scored better
    ckpt = "ema" if summary.get("best_ema_val_bpb", math.inf) < summary["best_val_bpb"] else "best"
    run_script("evaluate.py", {"out_dir": cfg.out_dir, "ckpt": ckpt, "num_prompts": 0, "baselines": False,
                               "device": cfg.device, "threads": cfg.threads})
    ev = json.loads((Path(cfg.out_dir) / output_names(ckpt)["json"]).read_text(encoding="utf-8"))
    out = {"reached": summary["reason"] == "target", "steps": summary["iter"], "tokens": summary["tokens_seen"],
           "train_minutes": summary["train_seconds"] / 60, "target_val_bpb": cfg.target_val_bpb, "checkpoint": ckpt,
           "best_iter": summary["best_ema_iter" if ckpt == "ema" else "best_iter"], "test_bpb": ev["likelihood"]["bpb"],
           "val_bpb": ev["splits"].get("val", ev["splits"][ev["data"]["split"]])["likelihood"]["bpb"],
           "bench_ms_per_step": ms_per_step, "minutes_at_bench_speed": summary["iter"] * ms_per_step / 60e3}
    print(f"\nspeedrun: {'reached' if out['reached'] else 'did NOT reach'} val bpb <= {cfg.target_val_bpb:g} "
          f"(training's estimate) in {out['steps']:,} steps, {out['tokens']:,} tokens, {out['train_minutes']:.1f} "
          f"minutes of training steps ({out['steps']:,} x the median {ms_per_step / 1e3:.2f} s a step measured above: "
          f"{out['minutes_at_bench_speed']:.1f} minutes); {ckpt}.pt (step {out['best_iter']:,}): test "
          f"{out['test_bpb']:.4f} bpb, val {out['val_bpb']:.4f} (full passes)")
    return out


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark as configured; returns the results (also written to cfg.out)."""
    check(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if device.startswith("cuda"):  # as train.py: TF32 for any float32 matmul left
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.vocab_size == 0:
        meta_path = Path(cfg.data_dir) / "meta.json"
        cfg = replace(cfg, vocab_size=read_meta(Path(cfg.data_dir))["vocab_size"] if meta_path.is_file() else CHAR_VOCAB)
        print(f"vocab_size {cfg.vocab_size}: " + (f"the data's ({meta_path})" if meta_path.is_file() else
              f"War and Peace's characters (no {meta_path}: prepare the data, or pass --vocab_size)"), flush=True)
    res: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                           "load_avg": list(os.getloadavg()), "machine": machine(device), "config": config_dict(cfg)}
    print("measuring the matmul peaks...", flush=True)
    res["peaks"] = device_peaks(cfg, device)
    res["train"] = bench_training(cfg, device, res["peaks"])
    rows = {r["name"]: r for r in res["train"]}
    if cfg.compare:
        res["ratio"] = rows["bookgpt"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
    if cfg.nanogpt:
        res["ratio_nanogpt"] = rows["bookgpt"]["tokens_per_s"] / rows["nanogpt"]["tokens_per_s"]
    res["data_ms_per_batch"] = data_ms_per_batch(cfg, device)
    if cfg.sample_tokens:
        print("sampling with and without the KV cache...", flush=True)
        res["sampling"] = bench_sampling(cfg, device)
    res["load_avg_end"] = list(os.getloadavg())
    print_report(res)
    if cfg.speedrun:
        res["speedrun"] = speedrun(cfg, rows["bookgpt"]["ms_per_step"])
    if cfg.out:
        atomic_write_json(cfg.out, res)
        print(f"\nwrote {cfg.out}")
    return res


def main(argv: list[str]) -> None:
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # silence the profiler's start/stop log lines
    cfg = parse_config(BenchConfig, argv, prog="bench.py", doc=__doc__.split("\n\n")[0])
    res = run(cfg)
    if cfg.sample_tokens and not res["sampling"]["ok"]:  # a cache that changes the output is a bug
        s = res["sampling"]
        print(f"error: sampling with the KV cache gave other {'tokens' if s['check'] == 'identical tokens' else 'logits'} "
              f"than recomputing the context", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    cli(main)
