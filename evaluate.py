"""Evaluate a trained run honestly: held-out likelihood, baselines, memorisation, style, themes, curves.

    python evaluate.py --out_dir=out/wp_bpe_cpu [--split=val|test] [--ckpt=best|latest|ema] [--stride=N]
                       [--dynamic_lr=LR] [--mix_ngram=ORDERS] [--ensemble=RUN,...]

1. Likelihood: one full pass over the whole split with sliding windows (HuggingFace's strided
   perplexity recipe): every token is scored exactly once, with at least block_size - stride tokens
   of context except at the very start. Reported as nats/token, perplexity, bits per character and
   bits per UTF-8 byte (bpb, the headline: it compares char, byte and BPE models and compressors).
   --dynamic_lr adds a second pass with dynamic evaluation (the model keeps learning as it reads), and
   --mix_ngram the model mixed with a Kneser-Ney n-gram over its tokens, --ensemble the model mixed with
   other runs (mixture.py). All are reported beside the static figure, which stays the headline, with
   every setting and weight chosen on val.
2. Baselines on the same split, fitted on the train split (baselines.py): a byte unigram, byte-level
   interpolated Kneser-Ney n-grams (orders 2..8) and zlib/bz2/xz. Cached in <data_dir>/baselines_<split>.json.
3. Generated text: continuations of held-out prompts, checked for memorisation (n-grams and the
   longest span found verbatim in the training text), style (distances to the book's statistics) and
   themes (who and where it names, what it talks about; against its own prompt and a shuffled-prompt
   control), all in textstats.py, beside the same figures for the real continuation of the same prompts.
   --temperature=A,B,... first continues val prompts at each and keeps the highest temperature whose
   samples stay within both caps (textstats.py: copying and misspelling against the real continuations),
   saved as the run's own (sampling.json) for sample.py, app.py and later evaluations.
4. Overfitting: train/val curves from metrics.jsonl, with the point where val stopped improving.

Writes out_dir/eval.json (every figure), out_dir/report.md and its PNG plots (report.py), atomically; for
--ckpt=latest or ema, eval_latest.json and report_latest.md (or _ema), beside the best's; with --ensemble,
eval_ensemble.json and report_ensemble.md, so the run's own figures are kept.
"""
from __future__ import annotations

import copy
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bookgpt.checkpoint import data_difference, load_run
from bookgpt.common import autocast, likelihood_figures, read_metrics, records_of, resolve_device, resolve_dtype
from bookgpt.config import UserError, atomic_write_json, cli, config_dict, opt, parse_config
from bookgpt.eval.baselines import cached_baselines
from bookgpt.eval.mixture import ensemble, ngram_mixture, parse_orders
from bookgpt.eval.report import output_names, plot_bpb, plot_curves, print_summary, write_report
from bookgpt.eval.textstats import COPY_CAP, MISSPELL_CAP, TrainIndex, memorisation, style_distance, style_stats, themes
from bookgpt.sampling import TOP_K, TOP_P, check_sampling, run_temperature, sampling_file
from bookgpt.tokenizer import read_meta
from model import GPT


@dataclass
class EvalConfig:
    out_dir: str = opt("", "run directory written by train.py ('' = the newest run under out/)")
    split: str = opt("test", "the headline split: test (val is scored beside it), or val alone for data without one")
    ckpt: str = opt("best", "best (lowest val loss), latest, or ema (the weight average at its lowest val "
                                     "loss: runs trained with --ema_decay)")
    data_dir: str = opt("", "prepared data folder (default: the one the run was trained on)")
    stride: int = opt(0, "tokens scored per window; context >= block_size - stride (0 = block_size // 2)")
    batch_size: int = opt(16, "windows per forward pass")
    dynamic_lr: str = opt("0", "dynamic evaluation at these learning rates, comma-separated: each is scored on "
                               "val, the best on the headline split (0 = off)")
    dynamic_method: str = opt("sgd", "dynamic evaluation's step: sgd, or rms (Krause et al.: each gradient divided by "
                                     "its RMS over training batches)")
    dynamic_decay: str = opt("0", "dynamic evaluation: pull the weights back towards the trained ones at these rates "
                                  "per window, comma-separated (tried with every learning rate; 0 = no pull)")
    mix_ngram: str = opt("0", "mix the model with a Kneser-Ney n-gram over its own tokens (fitted on train) of these "
                              "orders, comma-separated: each order's weight is fitted on val, the best order is "
                              "scored on the headline split (0 = off)")
    ensemble: str = opt("", "other runs trained on the same data (out_dirs, comma-separated, each at --ckpt): "
                            "their probabilities mixed with this run's, the weights fitted on val ('' = off)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16 (float32 = exact, slower on CPU)")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default; 1 is faster on a busy machine)")
    baselines: bool = opt(True, "compute (or read cached) n-gram and compressor baselines")
    ngram_order: int = opt(8, "highest Kneser-Ney n-gram order (2..8)")
    num_prompts: int = opt(8, "held-out prompts to continue for the memorisation/style checks (0 = skip)")
    prompt_chars: int = opt(200, "characters per prompt")
    gen_tokens: int = opt(500, "tokens generated per prompt")
    temperature: str = opt("auto", "sampling temperature: auto = the run's own (sample.py's default); several, "
                                   "comma-separated: each is tried on val prompts, the highest within the copy and "
                                   "misspelling caps is used on the headline split and saved as the run's own")
    top_k: int = opt(TOP_K, "top-k sampling, 0 = off (sample.py's default)")
    top_p: float = opt(TOP_P, "nucleus sampling, 1 = off (sample.py's default)")
    seed: int = opt(1, "seed for prompt positions and sampling")


# ============================================================================ 1. held-out likelihood

def strided_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n_scored) per window: the model reads tokens[start:end], predicts
    tokens[start+1:end+1] and the last n_scored of those predictions count.

    Targets 1..n_tokens-1 are each scored once (token 0 has no context to be predicted from).
    The first window scores all its targets; every later one moves `stride` tokens on and scores
    only the new ones, so each has at least block_size - stride + 1 tokens of context. The last
    window ends at the last token and is still a full block (HF's recipe shortens it instead)."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size={block_size}, got {stride}")
    windows: list[tuple[int, int, int]] = []
    done = 0  # targets 1..done are scored
    while done < n_tokens - 1:
        end = min(done + stride if done else block_size, n_tokens - 1)
        windows.append((max(0, end - block_size), end, end - done))
        done = end
    return windows


def strided_batches(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int, stride: int,
                    batch_size: int, device: str, dtype: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of windows: the nll (nats, float32 from the logits even under autocast) of the last m
    predictions of each row, shape (rows, m), and a mask of those that count (the last n_scored of each
    row). Read row by row, the counted entries are the targets 1..len(tokens)-1 in order."""
    tokens = np.asarray(tokens, dtype=np.int64)
    windows = strided_windows(len(tokens), block_size, stride)
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        # every window is a full block except when the whole text is shorter than one
        length = batch[0][1] - batch[0][0]
        xy = torch.from_numpy(np.stack([tokens[s:s + length + 1] for s, _, _ in batch])).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        with autocast(device, dtype):
            logits, _ = model(x)
        m = max(n for _, _, n in batch)  # only the last m positions of any row are scored
        nll = F.cross_entropy(logits[:, -m:].float().flatten(0, 1), y[:, -m:].reshape(-1), reduction="none")
        first = torch.tensor([m - n for _, _, n in batch], device=device)
        yield nll.view(len(batch), m), torch.arange(m, device=device)[None, :] >= first[:, None]


@torch.inference_mode()
def strided_nll(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int, stride: int,
                batch_size: int = 16, device: str = "cpu", dtype: str = "float32") -> tuple[float, int]:
    """Total negative log-likelihood (nats) of tokens[1:] under `model`, and how many tokens that is."""
    # one float32 sum per batch, left on the device: nothing waits for the GPU until the end; a mask, not
    # nll[scored]: boolean indexing waits for the GPU to count the selected elements
    sums = [torch.where(scored, nll, 0.0).sum()
            for nll, scored in strided_batches(model, tokens, block_size, stride, batch_size, device, dtype)]
    return host_sum(sums), max(len(tokens) - 1, 0)


@torch.inference_mode()
def strided_token_nll(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int, stride: int,
                      batch_size: int = 16, device: str = "cpu", dtype: str = "float32") -> np.ndarray:
    """strided_nll's pass, one nll (nats) per token of tokens[1:] (for mixing with another model)."""
    parts = [nll.cpu().numpy()[scored.cpu().numpy()]
             for nll, scored in strided_batches(model, tokens, block_size, stride, batch_size, device, dtype)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def host_sum(parts: list[torch.Tensor]) -> float:
    """Sum float32 device scalars exactly enough for a 3 MB book: in float64 on the host (MPS has
    no float64, and a float32 running total would drift over thousands of batches)."""
    return math.fsum(torch.stack(parts).cpu().tolist()) if parts else 0.0


def dynamic_token_nll(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int, stride: int,
                      lr: float, device: str = "cpu", dtype: str = "float32", decay: float = 0.0,
                      grad_rms: list[torch.Tensor] | None = None) -> np.ndarray:
    """strided_token_nll with dynamic evaluation (Krause et al., 2018): the windows are read in
    order, one at a time, and after scoring a window the model takes one step on the tokens it
    just scored. Every token is still predicted before the model learns from it (a prequential
    code, as bz2 and xz adapt while they read), so this is a fair held-out figure, but of a model
    that keeps learning from the text it is scored on: it is reported beside the static one,
    never instead. Works on a copy; `model` is left as it was.

    The step is plain SGD, or with `grad_rms` (train_gradient_rms) Krause et al.'s: each gradient
    divided by its RMS over training batches, and with `decay` a pull back towards the trained weights,
    theta += -lr * g / (rms + floor) + min(decay * rms / mean(rms), 1) * (theta_trained - theta)
    (without grad_rms: theta += -lr * g + decay * (theta_trained - theta))."""
    model = copy.deepcopy(model).train(False)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    trained = [p.detach().clone() for p in params] if decay else []
    if grad_rms is not None:
        mean_rms = torch.cat([r.flatten() for r in grad_rms]).mean()
        # a weight whose gradient was ~0 on the sampled batches (the embedding of a token they lack) must not
        # take an unbounded step: the floor is a tenth of its tensor's mean RMS (or of all of them; none: SGD)
        floors = [0.1 * (r.mean() if r.mean() > 0 else mean_rms) for r in grad_rms]
        scale = [1.0 / (r + f) if f > 0 else None for r, f in zip(grad_rms, floors)]
        pull = [torch.clamp(decay * r / mean_rms, max=1.0) if mean_rms > 0 else min(decay, 1.0) for r in grad_rms]
    else:
        scale, pull = [None] * len(params), [min(decay, 1.0)] * len(params)
    tokens_t = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)
    windows = strided_windows(len(tokens_t), block_size, stride)
    parts = []
    for start, end, n in windows:
        xy = tokens_t[start:end + 1][None]
        with autocast(device, dtype):
            logits, _ = model(xy[:, :-1])
        nll = F.cross_entropy(logits[0, -n:].float(), xy[0, -n:], reduction="none")
        parts.append(nll.detach())
        (nll.sum() / n).backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                step = -lr * (p.grad if scale[i] is None else p.grad * scale[i])
                if decay:
                    step += pull[i] * (trained[i] - p)
                p.add_(step)
                p.grad = None
    # float64 on the host (MPS has none)
    return torch.cat(parts).cpu().numpy().astype(np.float64) if parts else np.zeros(0)


def train_gradient_rms(model: torch.nn.Module, tokens: np.ndarray, block_size: int, device: str = "cpu",
                       dtype: str = "float32", batches: int = 16, batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """The RMS of each parameter's gradient over `batches` random batches of the training split (the mean
    loss per batch, as dynamic_nll's steps use): Krause et al.'s normaliser. Works on a copy."""
    model = copy.deepcopy(model).train(False)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    squares = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    rng = np.random.default_rng(seed)
    tokens = np.asarray(tokens, dtype=np.int64)
    for _ in range(batches):
        starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
        xy = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts])).to(device)
        with autocast(device, dtype):
            logits, _ = model(xy[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].reshape(-1)).backward()
        with torch.no_grad():
            for sq, p in zip(squares, params):
                sq += p.grad.float() ** 2
                p.grad = None
    return [(sq / batches).sqrt() for sq in squares]


# ============================================================================ 2. generation

def pick_prompts(text: str, num: int, prompt_chars: int, room: int, seed: int) -> list[int]:
    """Start offsets of `num` prompts, one drawn at random from each of `num` equal stretches of
    `text` (so they spread over the split), moved to the next word start, leaving `room`
    characters after each prompt for its real continuation where the stretch allows."""
    rng = random.Random(seed)
    stretch = len(text) // max(num, 1)
    starts = []
    for i in range(num):
        lo, hi = i * stretch, max(i * stretch, (i + 1) * stretch - prompt_chars - room)
        s = rng.randint(lo, hi)
        while 0 < s < hi and not (text[s - 1].isspace() and not text[s].isspace()):
            s += 1
        starts.append(s)
    return starts


@torch.inference_mode()
def generate_continuations(model: torch.nn.Module, tokenizer: Any, prompts: list[str], gen_tokens: int,
                           temperature: float, top_k: int, top_p: float, seed: int, device: str,
                           dtype: str = "float32") -> tuple[list[str], list[str]]:
    """Continue each prompt by gen_tokens tokens in one batch; returns (prompts as fed, continuations).

    A batch needs equal lengths, so prompts are cut from the left to the shortest one's token count
    (for char and byte tokenizers all have the same length already)."""
    ids = [tokenizer.encode(p) for p in prompts]
    keep = min(len(i) for i in ids)
    x = torch.tensor([i[len(i) - keep:] for i in ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with autocast(device, dtype):
        out = model.generate(x, gen_tokens, temperature=temperature, top_k=top_k or None,
                             top_p=top_p if top_p < 1 else None, generator=gen)
    rows = out.tolist()
    return [tokenizer.decode(r[:keep]) for r in rows], [tokenizer.decode(r[keep:]) for r in rows]


# ============================================================================ 3. curves

def overfitting_summary(evals: list[dict]) -> dict[str, Any]:
    """Where val stopped improving and how far it and the train/val gap moved afterwards."""
    if not evals:
        return {"evals": 0}
    best = min(evals, key=lambda r: r["val_loss"])
    last = evals[-1]
    return {"evals": len(evals), "best_iter": best["iter"], "best_val_loss": best["val_loss"],
            "best_val_bpb": best.get("val_bpb"), "last_iter": last["iter"], "last_val_loss": last["val_loss"],
            "evals_after_best": sum(r["iter"] > best["iter"] for r in evals),
            "val_rise_after_best": last["val_loss"] - best["val_loss"],
            "gap_at_best": best["val_loss"] - best["train_loss"], "gap_at_last": last["val_loss"] - last["train_loss"]}


# ============================================================================ main

def read_split(data_dir: Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        hint = ("; prepare.py writes one by default (data prepared without one: prepare it again, or evaluate "
                "--split=val)") if split == "test" else "; re-run prepare.py"
        raise UserError(f"no {split} split in {data_dir}: {path} is missing{hint}")
    return np.array(np.memmap(path, dtype=meta["dtype"], mode="r"), dtype=np.int64)


def continue_prompts(cfg: EvalConfig, model: torch.nn.Module, tok: Any, text: str, n_tokens: int, temperature: float,
                     device: str, dtype: str) -> tuple[list[str], list[str], list[str]]:
    """num_prompts prompts spread over `text` (of n_tokens tokens), continued at `temperature`: the prompts
    as fed, the generated continuations, and the real ones of the same length."""
    room = int(1.5 * cfg.gen_tokens * len(text) / n_tokens)
    starts = pick_prompts(text, cfg.num_prompts, cfg.prompt_chars, room, cfg.seed)
    prompts = [text[s:s + cfg.prompt_chars] for s in starts]
    fed, gens = generate_continuations(model, tok, prompts, cfg.gen_tokens, temperature, cfg.top_k, cfg.top_p,
                                       cfg.seed, device, dtype)
    return fed, gens, [text[s + len(p):s + len(p) + len(g)] for s, p, g in zip(starts, prompts, gens)]


def judge(index: TrainIndex, gens: list[str], refs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Memorisation and style of the generated continuations, beside the real ones'."""
    mem = {"generated": memorisation(index, gens), "reference": memorisation(index, refs)}
    style = {"generated": style_stats(gens, index.vocab_lower), "reference": style_stats(refs, index.vocab_lower)}
    return mem, style


def against_caps(mem: dict[str, Any], style: dict[str, Any]) -> dict[str, float]:
    """How many times the real continuations' rate the generated text copies 30-character spans of the
    training text and writes words never seen there (mostly misspellings); 1 = the real text's rate."""
    def ratio(generated: float, real: float) -> float:
        return generated / real if real else (1.0 if not generated else math.inf)
    return {"copy_ratio": ratio(mem["generated"]["char30_share"], mem["reference"]["char30_share"]),
            "misspell_ratio": ratio(style["generated"]["unknown_word_share"], style["reference"]["unknown_word_share"])}


def within_caps(ratios: dict[str, float]) -> bool:
    return ratios["copy_ratio"] <= COPY_CAP and ratios["misspell_ratio"] <= MISSPELL_CAP


def choose_temperature(trials: list[dict[str, float]]) -> dict[str, float]:
    """The highest temperature whose samples stay within both caps: the model's own distribution as far as it
    goes without copying the book or misspelling too much. If none does, the one nearest the caps."""
    within = [t for t in trials if within_caps(t)]
    if within:
        return max(within, key=lambda t: t["temperature"])
    return min(trials, key=lambda t: max(t["copy_ratio"] / COPY_CAP, t["misspell_ratio"] / MISSPELL_CAP))


def sampling_temperature(cfg: EvalConfig, model: torch.nn.Module, tok: Any, index: TrainIndex, val_text: str,
                         val_tokens: int, out_dir: Path, device: str, dtype: str, timings: dict[str, float],
                         log: Callable[[str], None]) -> dict[str, Any]:
    """The temperature of the generation checks: --temperature's value, or the run's own (auto), or with
    several values each tried on val prompts and the choice saved as the run's own (sampling.json)."""
    temperatures = parse_temperatures(cfg.temperature)
    if len(temperatures) == 1:
        return {"temperature": temperatures[0], "source": "--temperature"}
    path = sampling_file(out_dir, cfg.ckpt)
    if not temperatures:
        return {"temperature": run_temperature(out_dir, cfg.ckpt),
                "source": "the run's own" if path.is_file() else "the default"}
    t0 = time.perf_counter()
    trials = []
    for t in temperatures:
        log(f"continuing {cfg.num_prompts} val prompts at temperature {t:g}...")
        _, gens, refs = continue_prompts(cfg, model, tok, val_text, val_tokens, t, device, dtype)
        trials.append({"temperature": t, **against_caps(*judge(index, gens, refs))})
        log(f"  copies {trials[-1]['copy_ratio']:.2f}x and misspells {trials[-1]['misspell_ratio']:.2f}x "
            "as often as the real continuations")
    chosen = choose_temperature(trials)
    record = {"temperature": chosen["temperature"], "chosen_on": "val", "num_prompts": cfg.num_prompts,
              "gen_tokens": cfg.gen_tokens, "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed,
              "caps": {"copy_ratio": COPY_CAP, "misspell_ratio": MISSPELL_CAP},
              "within_caps": within_caps(chosen),
              "trials": trials}
    try:
        atomic_write_json(path, record)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    log(f"temperature {chosen['temperature']:g} chosen on val, saved as the run's own: {path}")
    timings["temperature on val"] = time.perf_counter() - t0
    return {**record, "source": "chosen on val"}


def judge_generations(cfg: EvalConfig, model: torch.nn.Module, tok: Any, index: TrainIndex, train_text: str,
                      split_text: str, n_tokens: int, temperature: float, device: str, dtype: str,
                      timings: dict[str, float], log: Callable[[str], None]
                      ) -> tuple[list[dict[str, str]], dict[str, Any], dict[str, Any]]:
    """Continue num_prompts held-out prompts; the samples, and memorisation and style statistics of the
    generated continuations beside the real ones (textstats.py)."""
    t0 = time.perf_counter()
    log(f"generating {cfg.num_prompts} x {cfg.gen_tokens} tokens at temperature {temperature:g}...")
    fed, gens, refs = continue_prompts(cfg, model, tok, split_text, n_tokens, temperature, device, dtype)
    timings["generation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = [{"prompt": f, "generated": g, "reference": r} for f, g, r in zip(fed, gens, refs)]
    mem, style = judge(index, gens, refs)
    style["book"] = book = style_stats([train_text], index.vocab_lower)
    style["generated_distance"] = style_distance(style["generated"], book)
    style["reference_distance"] = style_distance(style["reference"], book)
    style["themes"] = themes(gens, refs, train_text, cfg.seed)
    timings["memorisation, style and themes"] = time.perf_counter() - t0
    return samples, mem, style


def score(model: torch.nn.Module, tok: Any, tokens: np.ndarray, name: str, block_size: int, stride: int,
          cfg: EvalConfig, device: str, dtype: str, timings: dict[str, float], log: Callable[[str], None],
          per_token: bool = False) -> tuple[dict, np.ndarray | None]:
    """The likelihood figures of one split's full pass, and with per_token each token's nll (for a mixture)."""
    if len(tokens) < 2:
        raise UserError(f"the {name} split has fewer than 2 tokens; nothing to evaluate")
    log(f"scoring {len(tokens):,} {name} tokens (block {block_size}, stride {stride}, {device}/{dtype})...")
    t0 = time.perf_counter()
    token_nll = None
    if per_token:
        token_nll = strided_token_nll(model, tokens, block_size, stride, cfg.batch_size, device, dtype)
        total, n = math.fsum(token_nll), len(token_nll)
    else:
        total, n = strided_nll(model, tokens, block_size, stride, cfg.batch_size, device, dtype)
    timings[f"likelihood on {name}"] = time.perf_counter() - t0
    text = tok.decode_bytes(tokens[1:])  # the first token is context only
    lk = likelihood_figures(total, n, len(text), len(text.decode("utf-8", errors="replace")))
    log(f"  {lk['bpb']:.4f} bpb, loss {lk['loss']:.4f} in {timings[f'likelihood on {name}']:.1f} s")
    return lk, token_nll


def dynamic_evaluation(cfg: EvalConfig, model: torch.nn.Module, tokens: dict[str, np.ndarray],
                       train_tokens: np.ndarray | None, scored: dict,
                       block_size: int, stride: int, device: str, dtype: str, timings: dict[str, float],
                       log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Dynamic evaluation at each learning rate on val; the best rate, on the headline split too.
    Returns the headline split's figures with the rate, where it was chosen and every rate's val bpb,
    and the chosen setting's nll per token on val and the headline split (for an n-gram mixture)."""
    lrs = parse_lrs(cfg.dynamic_lr)
    if not lrs:
        return {}, {}
    decays = parse_lrs(cfg.dynamic_decay, "dynamic_decay", keep_zero=True) or [0.0]
    grad_rms = None
    if cfg.dynamic_method == "rms":
        t0 = time.perf_counter()
        grad_rms = train_gradient_rms(model, train_tokens, block_size, device, dtype, seed=cfg.seed)
        timings["gradient RMS on train"] = time.perf_counter() - t0

    def label(lr: float, decay: float) -> str:
        return format(lr, "g") + (f", decay {decay:g}" if decay else "")

    def run(name: str, lr: float, decay: float) -> tuple[dict[str, float], np.ndarray]:
        log(f"dynamic evaluation on {name} ({cfg.dynamic_method}, lr {label(lr, decay)})...")
        t0 = time.perf_counter()
        nll = dynamic_token_nll(model, tokens[name], block_size, stride, lr, device, dtype, decay, grad_rms)
        timings[f"dynamic evaluation on {name}, lr {label(lr, decay)}"] = time.perf_counter() - t0
        lk = scored[name]["likelihood"]
        out = {"lr": lr, "decay": decay, **likelihood_figures(math.fsum(nll), len(nll), lk["bytes"], lk["chars"])}
        log(f"  {out['bpb']:.4f} bpb, loss {out['loss']:.4f}")
        return out, nll

    on_val = {label(lr, d): run("val", lr, d) for lr in lrs for d in decays}
    # a rate can diverge
    best, best_nll = min(on_val.values(), key=lambda r: r[0]["bpb"] if math.isfinite(r[0]["bpb"]) else math.inf)
    headline, headline_nll = (best, best_nll) if cfg.split == "val" else run(cfg.split, best["lr"], best["decay"])
    return ({**headline, "method": cfg.dynamic_method, "chosen_on": "val",
             "val_bpb_by_lr": {k: r["bpb"] if math.isfinite(r["bpb"]) else None for k, (r, _) in on_val.items()}},
            {"val": best_nll, cfg.split: headline_nll})


def ensemble_members(cfg: EvalConfig, meta: dict[str, Any], tokens: dict[str, np.ndarray], device: str, dtype: str,
                     timings: dict[str, float], log: Callable[[str], None]) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """The other runs of --ensemble, each checked to be trained on this data and scored token by token on
    every split in `tokens` (with its own context length: every target is still scored once)."""
    runs, token_nll = [], []
    for run in [r.strip() for r in cfg.ensemble.split(",") if r.strip()]:
        ckpt, info = load_run(run, cfg.ckpt)
        model = GPT.from_checkpoint(ckpt, info["path"], device)
        if diff := data_difference(info["meta"], meta):
            raise UserError(f"{run} was trained on other data than the evaluated run ({diff}); the runs of an "
                            "ensemble must share one prepared data folder")
        block_size = model.config.block_size
        stride = min(cfg.stride or max(1, block_size // 2), block_size)
        log(f"scoring {run} ({Path(info['path']).name}, step {info['iter_num']:,}) for the ensemble...")
        t0 = time.perf_counter()
        token_nll.append({name: strided_token_nll(model, t, block_size, stride, cfg.batch_size, device, dtype)
                          for name, t in tokens.items()})
        timings[f"ensemble: {run}"] = time.perf_counter() - t0
        runs.append(info["out_dir"])
    return runs, token_nll


def parse_lrs(text: str, key: str = "dynamic_lr", keep_zero: bool = False) -> list[float]:
    """A comma-separated list of rates (dynamic_lr, dynamic_decay); zeros dropped unless keep_zero."""
    try:
        lrs = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad value for '{key}': {text!r}; use rates such as 0.03 or 0.01,0.03,0.1") from None
    if any(not lr >= 0 for lr in lrs):
        raise UserError(f"{key} must be >= 0, got {text}")
    return [lr for lr in lrs if lr > 0 or keep_zero]


def parse_temperatures(text: str) -> list[float]:
    """--temperature's values; none for auto (the run's own)."""
    if text.strip().lower() == "auto":
        return []
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"bad value for 'temperature': {text!r}; use auto, a number such as 0.8, or several: "
                        "0.6,0.65,0.7,0.75,0.8,0.9") from None


def check_settings(cfg: EvalConfig) -> None:
    if cfg.split not in ("val", "test"):
        raise UserError(f"bad value for 'split': {cfg.split!r}; use val or test")
    if cfg.batch_size < 1 or cfg.stride < 0:
        raise UserError("batch_size must be >= 1 and stride >= 0")
    parse_lrs(cfg.dynamic_lr)
    parse_lrs(cfg.dynamic_decay, "dynamic_decay")
    parse_orders(cfg.mix_ngram, 2)  # the form; the model's vocabulary bounds the orders once it is loaded
    if cfg.dynamic_method not in ("sgd", "rms"):
        raise UserError(f"bad value for 'dynamic_method': {cfg.dynamic_method!r}; use sgd or rms")
    if not 1 <= cfg.ngram_order <= 8:
        raise UserError(f"ngram_order must be 1..8 (byte n-grams are packed into 64 bits), got {cfg.ngram_order}")
    if cfg.num_prompts < 0 or cfg.prompt_chars < 1:
        raise UserError("num_prompts must be >= 0 and prompt_chars >= 1")
    temperatures = parse_temperatures(cfg.temperature)
    if cfg.num_prompts:
        for t in temperatures:
            check_sampling(cfg.gen_tokens, t, cfg.top_k, cfg.top_p)
    elif len(temperatures) > 1:
        raise UserError("choosing a temperature needs prompts: pass --num_prompts=64 (or more) with it")


def evaluate(cfg: EvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every part of the evaluation as configured; writes eval.json, report.md and plots."""
    check_settings(cfg)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(cfg.out_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    ckpt, info = load_run(cfg.out_dir, cfg.ckpt)
    model = GPT.from_checkpoint(ckpt, info["path"], device)
    out_dir = Path(info["out_dir"])
    log(f"evaluating {info['path']} (step {info['iter_num']:,})")
    tok = info["tokenizer"]
    data_dir = Path(cfg.data_dir or (info.get("config") or {}).get("data_dir", ""))
    if not data_dir.is_dir():
        raise UserError(f"data folder '{data_dir}' not found (the run was trained on it); "
                        f"run from the directory you trained in or pass --data_dir")
    meta = read_meta(data_dir)
    trained = info["meta"]
    # the same text, tokenizer and split points, or "held-out" text could be text it trained on
    if diff := data_difference(trained, meta):
        raise UserError(f"{data_dir} holds other data than {out_dir} was trained on ({diff}); pass that run's --data_dir")

    # -- 1, 2. likelihood (one full pass) and baselines: the headline split, and val beside test
    block_size = model.config.block_size
    stride = cfg.stride or max(1, block_size // 2)
    if stride > block_size:
        raise UserError(f"stride={stride} is larger than the model's block_size={block_size}")
    names = [cfg.split] + (["val"] if cfg.split == "test" else [])
    tokens = {name: read_split(data_dir, name, meta) for name in names}
    texts = {name: tok.decode(t) for name, t in tokens.items()}  # decoding the bins gives the split texts
    train_tokens = read_split(data_dir, "train", meta)
    train_text = tok.decode(train_tokens)
    orders = parse_orders(cfg.mix_ngram, tok.vocab_size)
    members, member_nll = ensemble_members(cfg, meta, tokens, device, dtype, timings, log)
    scored, token_nll = {}, {}
    for name in names:
        lk, token_nll[name] = score(model, tok, tokens[name], name, block_size, stride, cfg, device, dtype, timings, log,
                                    per_token=bool(orders or members))
        scored[name] = {"likelihood": lk}
        if cfg.baselines:
            t0 = time.perf_counter()
            log(f"baselines on {name}:")
            base, cached = cached_baselines(data_dir, name, train_text.encode("utf-8"), texts[name].encode("utf-8"),
                                            meta, cfg.ngram_order, log)
            if cached:
                log(f"  read from {data_dir / f'baselines_{name}.json'}")
            timings[f"baselines on {name}" + (" (cached)" if cached else "")] = time.perf_counter() - t0
            scored[name]["baselines"] = base
    lk, baselines = scored[cfg.split]["likelihood"], scored[cfg.split].get("baselines", {})
    dynamic, dynamic_nll = dynamic_evaluation(cfg, model, tokens, train_tokens, scored, block_size, stride, device,
                                              dtype, timings, log)
    ngram_cache: dict[tuple[int, str], np.ndarray] = {}
    mixture = ngram_mixture(orders, token_nll, tokens, train_tokens, tok.vocab_size, scored, cfg.split, timings, log,
                            cache=ngram_cache)
    if dynamic and mixture:  # the two together: dynamic evaluation's probabilities mixed with the n-gram
        dynamic["mixture"] = ngram_mixture(orders, dynamic_nll, tokens, train_tokens, tok.vocab_size, scored,
                                           cfg.split, timings, log, of="dynamic evaluation", cache=ngram_cache)
    ensembled = {}
    if members:
        ensembled, ensemble_nll = ensemble([info["out_dir"], *members], [token_nll, *member_nll], scored, cfg.split, log)
        if mixture:  # the ensemble mixed with the n-gram, as the single model above
            ensembled["mixture"] = ngram_mixture(orders, ensemble_nll, tokens, train_tokens, tok.vocab_size, scored,
                                                 cfg.split, timings, log, of="the ensemble", cache=ngram_cache)

    # -- 3. generation, memorisation, style: at a temperature chosen on val prompts when asked to
    samples, mem, style, sampling = [], {}, {}, {}
    if cfg.num_prompts > 0:
        index = TrainIndex(train_text)
        sampling = sampling_temperature(cfg, model, tok, index, texts["val"], len(tokens["val"]), out_dir, device,
                                        dtype, timings, log)
        samples, mem, style = judge_generations(cfg, model, tok, index, train_text, texts[cfg.split],
                                                len(tokens[cfg.split]), sampling["temperature"], device, dtype,
                                                timings, log)
        sampling.update(against_caps(mem, style))  # on the headline split's prompts
    tokens, split_text = tokens[cfg.split], texts[cfg.split]

    # -- 4. curves
    records, _ = read_metrics(out_dir / "metrics.jsonl")
    train_rows, eval_rows = records_of(records, "train"), records_of(records, "eval")
    curves = overfitting_summary(eval_rows)

    timings["total"] = time.perf_counter() - t_start
    ev = {
        "run": {"out_dir": str(out_dir), "checkpoint": Path(info["path"]).name, "iter_num": info.get("iter_num"),
                "best_val_loss": info.get("best_val_loss"), "best_iter": info.get("best_iter"),
                "params": sum(p.numel() for p in model.parameters())},
        "data": {"data_dir": str(data_dir), "split": cfg.split, "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
                 "split_tokens": len(tokens), "split_bytes": len(split_text.encode("utf-8")),
                 "split_chars": len(split_text), "sha256_clean": meta.get("sha256_clean")},
        "settings": {**config_dict(cfg), "stride": stride, "block_size": block_size, "device": device, "dtype": dtype},
        "likelihood": lk, "dynamic": dynamic, "mixture": mixture, "ensemble": ensembled, "baselines": baselines,
        "splits": scored, "sampling": sampling, "memorisation": mem, "style": style,
        "curves": curves,
        "samples": samples, "timings": timings,
    }
    names = output_names(cfg.ckpt, cfg.ensemble)
    plots = {names["curves"]: plot_curves(train_rows, eval_rows, curves)} if eval_rows else {}
    if baselines:
        plots[names["bpb_plot"]] = plot_bpb(lk["bpb"], baselines)
    try:
        write_report(out_dir, ev, plots)
        atomic_write_json(out_dir / names["json"], ev)
    except OSError as e:
        raise UserError(f"cannot write the report into {out_dir}: {e.strerror or e}") from None
    return ev


def main(argv: list[str]) -> dict[str, Any]:
    cfg = parse_config(EvalConfig, argv, prog="evaluate.py", doc=__doc__.split("\n\n")[0])
    ev = evaluate(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print_summary(ev)
    return ev


if __name__ == "__main__":
    cli(main)
