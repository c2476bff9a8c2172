"""Evaluate a trained run honestly: held-out likelihood, baselines, memorisation, style, themes, curves.

    python evaluate.py --out_dir=out/wp_bpe_cpu [--split=val|test] [--ckpt=best|latest|ema] [--stride=N]
                       [--dynamic_lr=LR] [--mix_ngram=ORDERS] [--ensemble=RUN,...]

1. Likelihood (likelihood.py): one full pass over the whole split with sliding windows (HuggingFace's strided perplexity
   recipe): every token is scored exactly once, with at least block_size - stride tokens of context except at the very
   start. Reported as nats/token, perplexity, bits per character and bits per UTF-8 byte (bpb, the headline: it compares
   char, byte and BPE models and compressors). --dynamic_lr adds a second pass with dynamic evaluation (the model keeps
   learning as it reads), and --mix_ngram the model mixed with a Kneser-Ney n-gram over its tokens, --ensemble the model
   mixed with other runs (mixture.py). All are reported beside the static figure, which stays the headline, with every
   setting and weight chosen on val.
2. Baselines on the same split, fitted on the train split (baselines.py): a byte unigram, byte-level
   interpolated Kneser-Ney n-grams (orders 2..8) and zlib/bz2/xz. Cached in <data_dir>/baselines_<split>.json.
3. Generated text: continuations of held-out prompts, checked for memorisation (n-grams and the longest span found
   verbatim in the training text), style (distances to the book's statistics) and themes (who and where it names, what
   it talks about; against its own prompt and a shuffled-prompt control), all in textstats.py, beside the same figures
   for the real continuation of the same prompts. --temperature=A,B,... first continues val prompts at each and keeps
   the highest temperature whose samples stay within both caps (textstats.py: copying and misspelling against the real
   continuations), saved as the run's own (sampling.json) for sample.py, app.py and later evaluations.
4. Overfitting: train/val curves from metrics.jsonl, with the point where val stopped improving.

Writes out_dir/eval.json (every figure), out_dir/report.md and its PNG plots (report.py), atomically; for
--ckpt=latest or ema, eval_latest.json and report_latest.md (or _ema), beside the best's; with --ensemble,
eval_ensemble.json and report_ensemble.md, so the run's own figures are kept.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bookgpt.checkpoint import data_difference, load_run
from bookgpt.common import autocast, likelihood_figures, read_metrics, records_of, resolve_device, resolve_dtype
from bookgpt.config import UserError, atomic_write_json, cli, config_dict, opt, parse_config
from bookgpt.eval.baselines import cached_baselines, max_order
from bookgpt.eval.likelihood import dynamic_token_nll, pick_prompts, strided_nll, strided_token_nll, train_gradient_rms
from bookgpt.eval.mixture import NgramMixture, ensemble
from bookgpt.eval.report import Evaluation, overfitting_summary, print_summary, write
from bookgpt.eval.textstats import (COPY_CAP, MISSPELL_CAP, TrainIndex, against_caps, choose_temperature, judge,
                                    within_caps)
from bookgpt.eval.twosample import HEADLINE, require_sklearn, two_sample_test
from bookgpt.sampling import TOP_K, TOP_P, check_sampling, run_temperature, sampling_file, utf8_guard
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
    dynamic_lr: tuple[float, ...] = opt((0.0,), "dynamic evaluation at these learning rates: each is scored on val, "
                                                "the best on the headline split (0 = off)")
    dynamic_method: str = opt("sgd", "dynamic evaluation's step: sgd, or rms (Krause et al.: each gradient divided by "
                                     "its RMS over training batches)")
    dynamic_decay: tuple[float, ...] = opt((0.0,), "dynamic evaluation: pull the weights back towards the trained ones "
                                                   "at these rates per window (tried with every learning rate; 0 = no pull)")
    mix_ngram: tuple[int, ...] = opt((0,), "mix the model with a Kneser-Ney n-gram over its own tokens (fitted on train) "
                                           "of these orders: each order's weight is fitted on val, the best order is "
                                           "scored on the headline split (0 = off)")
    ensemble: tuple[str, ...] = opt((), "other runs trained on the same data (out_dirs, each at --ckpt): their "
                                        "probabilities mixed with this run's, the weights fitted on val (none = off)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16 (float32 = exact, slower on CPU)")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default; 1 is faster on a busy machine)")
    baselines: bool = opt(True, "compute (or read cached) n-gram and compressor baselines")
    ngram_order: int = opt(8, "highest Kneser-Ney n-gram order (2..8)")
    num_prompts: int = opt(8, "held-out prompts to continue for the memorisation/style checks (0 = skip)")
    prompt_chars: int = opt(200, "characters per prompt")
    gen_tokens: int = opt(500, "tokens generated per prompt")
    temperature: tuple[float, ...] = opt((), "sampling temperature: auto (or none) = the run's own (sample.py's "
                                             "default); several: each is tried on val prompts, the highest within the "
                                             "copy and misspelling caps is used on the headline split and saved")
    top_k: int = opt(TOP_K, "top-k sampling, 0 = off (sample.py's default)")
    top_p: float = opt(TOP_P, "nucleus sampling, 1 = off (sample.py's default)")
    two_sample_chars: int = opt(400, "the two-sample test of style: a classifier tells the generated continuations "
                                     "from the real ones in pieces of this many characters (0 = off; needs "
                                     "scikit-learn); with several temperatures, the least distinguishable within "
                                     "the caps is chosen")
    seed: int = opt(1, "seed for prompt positions and sampling")

    def check(self, vocab_size: int = 2) -> None:
        """One clear line for a bad setting; the n-gram orders' bound waits for the model's vocabulary."""
        if self.split not in ("val", "test"):
            raise UserError(f"bad value for 'split': {self.split!r}; use val or test")
        if self.batch_size < 1 or self.stride < 0:
            raise UserError("batch_size must be >= 1 and stride >= 0")
        for key in ("dynamic_lr", "dynamic_decay"):
            if any(not rate >= 0 for rate in getattr(self, key)):  # NaN too
                raise UserError(f"{key} must be >= 0, got {','.join(f'{rate:g}' for rate in getattr(self, key))}")
        if any(not 0 <= o <= max_order(vocab_size) for o in self.mix_ngram):
            raise UserError(f"mix_ngram orders must be 1..{max_order(vocab_size)} for a vocabulary of {vocab_size} "
                            f"(the n-grams are packed into 64 bits), got {','.join(map(str, self.mix_ngram))}")
        if self.dynamic_method not in ("sgd", "rms"):
            raise UserError(f"bad value for 'dynamic_method': {self.dynamic_method!r}; use sgd or rms")
        if not 1 <= self.ngram_order <= 8:
            raise UserError(f"ngram_order must be 1..8 (byte n-grams are packed into 64 bits), got {self.ngram_order}")
        if self.num_prompts < 0 or self.prompt_chars < 1 or self.two_sample_chars < 0:
            raise UserError("num_prompts and two_sample_chars must be >= 0 and prompt_chars >= 1")
        if self.num_prompts and self.two_sample_chars:
            require_sklearn()
        if self.num_prompts:
            for t in self.temperature:
                check_sampling(self.gen_tokens, t, self.top_k, self.top_p)
        elif len(self.temperature) > 1:
            raise UserError("choosing a temperature needs prompts: pass --num_prompts=64 (or more) with it")


@dataclass
class Context:
    """What every part of one evaluation reads: settings, model, the data it trained on, timings and log."""
    cfg: EvalConfig
    model: torch.nn.Module
    tok: Any
    info: dict[str, Any]             # load_run's: the checkpoint's path and step, the run's folder and config
    meta: dict[str, Any]
    data_dir: Path
    out_dir: Path                    # the run's folder
    device: str
    dtype: str
    block_size: int                  # the model's context
    stride: int
    tokens: dict[str, np.ndarray]    # the scored splits: the headline one, then val beside test
    texts: dict[str, str]            # the same, decoded
    train_tokens: np.ndarray
    train_text: str
    log: Callable[[str], None]
    timings: dict[str, float] = field(default_factory=dict)


def read_split(data_dir: Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        hint = ("; prepare.py writes one by default (data prepared without one: prepare it again, or evaluate "
                "--split=val)") if split == "test" else "; re-run prepare.py"
        raise UserError(f"no {split} split in {data_dir}: {path} is missing{hint}")
    return np.array(np.memmap(path, dtype=meta["dtype"], mode="r"), dtype=np.int64)


def load(cfg: EvalConfig, log: Callable[[str], None]) -> Context:
    """The run's checkpoint and the data it was trained on."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    ckpt, info = load_run(cfg.out_dir, cfg.ckpt)
    model = GPT.from_checkpoint(ckpt, info["path"], device)
    log(f"evaluating {info['path']} (step {info['iter_num']:,})")
    data_dir = Path(cfg.data_dir or (info.get("config") or {}).get("data_dir", ""))
    if not data_dir.is_dir():
        raise UserError(f"data folder '{data_dir}' not found (the run was trained on it); "
                        f"run from the directory you trained in or pass --data_dir")
    meta = read_meta(data_dir)
    # the same text, tokenizer and split points, or "held-out" text could be text it trained on
    if diff := data_difference(info["meta"], meta):
        raise UserError(f"{data_dir} holds other data than {Path(info['out_dir'])} was trained on ({diff}); "
                        "pass that run's --data_dir")
    block_size = model.config.block_size
    stride = cfg.stride or max(1, block_size // 2)
    if stride > block_size:
        raise UserError(f"stride={stride} is larger than the model's block_size={block_size}")
    tok, names = info["tokenizer"], [cfg.split] + (["val"] if cfg.split == "test" else [])
    tokens = {name: read_split(data_dir, name, meta) for name in names}
    train_tokens = read_split(data_dir, "train", meta)
    return Context(cfg, model, tok, info, meta, data_dir, Path(info["out_dir"]), device, dtype, block_size, stride,
                   tokens, {name: tok.decode(t) for name, t in tokens.items()},  # decoding the bins gives the texts
                   train_tokens, tok.decode(train_tokens), log)


def score(ctx: Context, name: str, per_token: bool) -> tuple[dict[str, dict], np.ndarray | None]:
    """One split's full pass (per_token: each token's nll too, for a mixture) and its baselines, fitted on train."""
    tokens = ctx.tokens[name]
    if len(tokens) < 2:
        raise UserError(f"the {name} split has fewer than 2 tokens; nothing to evaluate")
    ctx.log(f"scoring {len(tokens):,} {name} tokens (block {ctx.block_size}, stride {ctx.stride}, "
            f"{ctx.device}/{ctx.dtype})...")
    t0 = time.perf_counter()
    args = (ctx.model, tokens, ctx.block_size, ctx.stride, ctx.cfg.batch_size, ctx.device, ctx.dtype)
    token_nll = strided_token_nll(*args) if per_token else None
    total, n = strided_nll(*args) if token_nll is None else (math.fsum(token_nll), len(token_nll))
    ctx.timings[f"likelihood on {name}"] = seconds = time.perf_counter() - t0
    text = ctx.tok.decode_bytes(tokens[1:])  # the first token is context only
    lk = likelihood_figures(total, n, len(text), len(text.decode("utf-8", errors="replace")))
    ctx.log(f"  {lk['bpb']:.4f} bpb, loss {lk['loss']:.4f} in {seconds:.1f} s")
    if not ctx.cfg.baselines:
        return {"likelihood": lk}, token_nll
    t0 = time.perf_counter()
    ctx.log(f"baselines on {name}:")
    base, cached = cached_baselines(ctx.data_dir, name, ctx.train_text.encode("utf-8"),
                                    ctx.texts[name].encode("utf-8"), ctx.meta, ctx.cfg.ngram_order, ctx.log)
    ctx.timings[f"baselines on {name}" + (" (cached)" if cached else "")] = time.perf_counter() - t0
    return {"likelihood": lk, "baselines": base}, token_nll


def dynamic_evaluation(ctx: Context, scored: dict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Dynamic evaluation at each learning rate (and decay) on val; the best, on the headline split too.
    Returns the headline split's figures with the setting, where it was chosen and every setting's val bpb,
    and the chosen setting's nll per token on val and the headline split (for an n-gram mixture)."""
    cfg = ctx.cfg
    lrs = [lr for lr in cfg.dynamic_lr if lr > 0]
    if not lrs:
        return {}, {}
    grad_rms = None
    if cfg.dynamic_method == "rms":
        t0 = time.perf_counter()
        grad_rms = train_gradient_rms(ctx.model, ctx.train_tokens, ctx.block_size, ctx.device, ctx.dtype, seed=cfg.seed)
        ctx.timings["gradient RMS on train"] = time.perf_counter() - t0

    def label(lr: float, decay: float) -> str:
        return format(lr, "g") + (f", decay {decay:g}" if decay else "")

    def run(name: str, lr: float, decay: float) -> tuple[dict[str, float], np.ndarray]:
        ctx.log(f"dynamic evaluation on {name} ({cfg.dynamic_method}, lr {label(lr, decay)})...")
        t0 = time.perf_counter()
        nll = dynamic_token_nll(ctx.model, ctx.tokens[name], ctx.block_size, ctx.stride, lr, ctx.device, ctx.dtype,
                                decay, grad_rms)
        ctx.timings[f"dynamic evaluation on {name}, lr {label(lr, decay)}"] = time.perf_counter() - t0
        lk = scored[name]["likelihood"]
        out = {"lr": lr, "decay": decay, **likelihood_figures(math.fsum(nll), len(nll), lk["bytes"], lk["chars"])}
        ctx.log(f"  {out['bpb']:.4f} bpb, loss {out['loss']:.4f}")
        return out, nll

    on_val = {label(lr, d): run("val", lr, d) for lr in lrs for d in cfg.dynamic_decay or (0.0,)}
    # a rate can diverge
    best, best_nll = min(on_val.values(), key=lambda r: r[0]["bpb"] if math.isfinite(r[0]["bpb"]) else math.inf)
    headline, headline_nll = (best, best_nll) if cfg.split == "val" else run(cfg.split, best["lr"], best["decay"])
    return ({**headline, "method": cfg.dynamic_method, "chosen_on": "val",
             "val_bpb_by_lr": {k: r["bpb"] if math.isfinite(r["bpb"]) else None for k, (r, _) in on_val.items()}},
            {"val": best_nll, cfg.split: headline_nll})


def ensemble_members(ctx: Context) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """The other runs of --ensemble, each checked to be trained on this data and scored token by token on
    every scored split (with its own context length: every target is still scored once)."""
    cfg, runs, token_nll = ctx.cfg, [], []
    for run in cfg.ensemble:
        ckpt, info = load_run(run, cfg.ckpt)
        model = GPT.from_checkpoint(ckpt, info["path"], ctx.device)
        if diff := data_difference(info["meta"], ctx.meta):
            raise UserError(f"{run} was trained on other data than the evaluated run ({diff}); the runs of an "
                            "ensemble must share one prepared data folder")
        block_size = model.config.block_size
        stride = min(cfg.stride or max(1, block_size // 2), block_size)
        ctx.log(f"scoring {run} ({Path(info['path']).name}, step {info['iter_num']:,}) for the ensemble...")
        t0 = time.perf_counter()
        token_nll.append({name: strided_token_nll(model, t, block_size, stride, cfg.batch_size, ctx.device, ctx.dtype)
                          for name, t in ctx.tokens.items()})
        ctx.timings[f"ensemble: {run}"] = time.perf_counter() - t0
        runs.append(info["out_dir"])
    return runs, token_nll


@torch.inference_mode()
def continue_prompts(ctx: Context, name: str, temperature: float) -> tuple[list[str], list[str], list[str]]:
    """num_prompts prompts spread over split `name`, continued at `temperature` in one batch: the prompts as fed,
    the generated continuations, and the real ones of the same length. A batch needs equal lengths, so prompts
    are cut from the left to the shortest one's token count (char and byte tokenizers give equal ones anyway)."""
    cfg, text, tok = ctx.cfg, ctx.texts[name], ctx.tok
    room = int(1.5 * cfg.gen_tokens * len(text) / len(ctx.tokens[name]))
    starts = pick_prompts(text, cfg.num_prompts, cfg.prompt_chars, room, cfg.seed)
    prompts = [text[s:s + cfg.prompt_chars] for s in starts]
    ids = [tok.encode(p) for p in prompts]
    keep = min(len(i) for i in ids)
    x = torch.tensor([i[len(i) - keep:] for i in ids], dtype=torch.long, device=ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    with autocast(ctx.device, ctx.dtype):
        rows = ctx.model.generate(x, cfg.gen_tokens, temperature=temperature, top_k=cfg.top_k or None,
                                  top_p=cfg.top_p if cfg.top_p < 1 else None, generator=gen,
                                  allowed=utf8_guard(tok, ctx.model.config.vocab_size)).tolist()
    fed, gens = [tok.decode(r[:keep]) for r in rows], [tok.decode(r[keep:]) for r in rows]
    return fed, gens, [text[s + len(p):s + len(p) + len(g)] for s, p, g in zip(starts, prompts, gens)]


def sampling_temperature(ctx: Context, index: TrainIndex) -> dict[str, Any]:
    """The temperature of the generation checks: --temperature's value, or the run's own (auto), or with
    several values each tried on val prompts and the choice saved as the run's own (sampling.json)."""
    cfg = ctx.cfg
    if len(cfg.temperature) == 1:
        return {"temperature": cfg.temperature[0], "source": "--temperature"}
    path = sampling_file(ctx.out_dir, cfg.ckpt)
    if not cfg.temperature:
        return {"temperature": run_temperature(ctx.out_dir, cfg.ckpt),
                "source": "the run's own" if path.is_file() else "the default"}
    t0, trials = time.perf_counter(), []
    for t in cfg.temperature:
        ctx.log(f"continuing {cfg.num_prompts} val prompts at temperature {t:g}...")
        _, gens, refs = continue_prompts(ctx, "val", t)
        trials.append({"temperature": t, **against_caps(*judge(index, gens, refs))})
        told = ""
        if cfg.two_sample_chars:
            test = two_sample_test(gens, refs, cfg.two_sample_chars, control=False, features=(HEADLINE,))
            if "generated_vs_real" in test:
                trials[-1]["distinguishable"] = test["generated_vs_real"][HEADLINE]
                told = f"; a classifier tells them apart {trials[-1]['distinguishable']:.2f} of the time"
        ctx.log(f"  copies {trials[-1]['copy_ratio']:.2f}x and misspells {trials[-1]['misspell_ratio']:.2f}x "
                f"as often as the real continuations{told}")
    chosen = choose_temperature(trials)
    record = {"temperature": chosen["temperature"], "chosen_on": "val", "num_prompts": cfg.num_prompts,
              "gen_tokens": cfg.gen_tokens, "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed,
              "caps": {"copy_ratio": COPY_CAP, "misspell_ratio": MISSPELL_CAP}, "within_caps": within_caps(chosen),
              "trials": trials}
    try:
        atomic_write_json(path, record)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    ctx.log(f"temperature {chosen['temperature']:g} chosen on val, saved as the run's own: {path}")
    ctx.timings["temperature on val"] = time.perf_counter() - t0
    return {**record, "source": "chosen on val"}


def evaluate(cfg: EvalConfig, log: Callable[[str], None] = print) -> Evaluation:
    """Run every part of the evaluation as configured; writes eval.json, report.md and plots."""
    cfg.check()
    t_start = time.perf_counter()
    ctx = load(cfg, log)
    cfg.check(ctx.tok.vocab_size)
    orders = [o for o in cfg.mix_ngram if o > 0]
    members, member_nll = ensemble_members(ctx)

    # -- 1, 2. likelihood (one full pass) and baselines: the headline split, and val beside test
    scored, token_nll = {}, {}
    for name in ctx.tokens:
        scored[name], token_nll[name] = score(ctx, name, per_token=bool(orders or members))
    dynamic, dynamic_nll = dynamic_evaluation(ctx, scored)
    mix = NgramMixture(orders, ctx.train_tokens, ctx.tokens, ctx.tok.vocab_size, ctx.timings, log)
    mixture = mix(token_nll, scored, cfg.split)
    if dynamic and mixture:  # the two together: dynamic evaluation's probabilities mixed with the n-gram
        dynamic["mixture"] = mix(dynamic_nll, scored, cfg.split, of="dynamic evaluation")
    ensembled = {}
    if members:
        ensembled, ensemble_nll = ensemble([ctx.info["out_dir"], *members], [token_nll, *member_nll], scored,
                                           cfg.split, log)
        if mixture:  # the ensemble mixed with the n-gram, as the single model above
            ensembled["mixture"] = mix(ensemble_nll, scored, cfg.split, of="the ensemble")

    # -- 3. generation, memorisation, style and themes (textstats.py): at a temperature chosen on val prompts if asked
    samples, mem, style, sampling, told = [], {}, {}, {}, {}
    if cfg.num_prompts > 0:
        index = TrainIndex(ctx.train_text)
        sampling = sampling_temperature(ctx, index)
        t0 = time.perf_counter()
        log(f"generating {cfg.num_prompts} x {cfg.gen_tokens} tokens at temperature {sampling['temperature']:g}...")
        fed, gens, refs = continue_prompts(ctx, cfg.split, sampling["temperature"])
        ctx.timings["generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = [{"prompt": f, "generated": g, "reference": r} for f, g, r in zip(fed, gens, refs)]
        mem, style = judge(index, gens, refs, book=ctx.train_text, seed=cfg.seed)
        ctx.timings["memorisation, style and themes"] = time.perf_counter() - t0
        sampling.update(against_caps(mem, style))  # on the headline split's prompts
        if cfg.two_sample_chars:
            t0 = time.perf_counter()
            log(f"the two-sample test of style ({cfg.two_sample_chars}-character pieces)...")
            told = two_sample_test(gens, refs, cfg.two_sample_chars)
            ctx.timings["two-sample test"] = time.perf_counter() - t0

    # -- 4. curves
    records, _ = read_metrics(ctx.out_dir / "metrics.jsonl")
    train_rows, eval_rows = records_of(records, "train"), records_of(records, "eval")
    ctx.timings["total"] = time.perf_counter() - t_start
    info, text = ctx.info, ctx.texts[cfg.split]
    ev = Evaluation(
        run={"out_dir": str(ctx.out_dir), "checkpoint": Path(info["path"]).name, "iter_num": info.get("iter_num"),
             "best_val_loss": info.get("best_val_loss"), "best_iter": info.get("best_iter"),
             "params": sum(p.numel() for p in ctx.model.parameters())},
        data={"data_dir": str(ctx.data_dir), "split": cfg.split, "tokenizer": ctx.tok.kind,
              "vocab_size": ctx.tok.vocab_size, "split_tokens": len(ctx.tokens[cfg.split]),
              "split_bytes": len(text.encode("utf-8")), "split_chars": len(text), "sha256_clean": ctx.meta.get("sha256_clean")},
        settings={**config_dict(cfg), "stride": ctx.stride, "block_size": ctx.block_size, "device": ctx.device,
                  "dtype": ctx.dtype},
        likelihood=scored[cfg.split]["likelihood"], dynamic=dynamic, mixture=mixture, ensemble=ensembled,
        baselines=scored[cfg.split].get("baselines", {}), splits=scored, sampling=sampling, memorisation=mem,
        style=style, curves=overfitting_summary(eval_rows), samples=samples, timings=ctx.timings, two_sample=told)
    write(ev, train_rows, eval_rows)
    return ev


def main(argv: list[str]) -> dict[str, Any]:
    cfg = parse_config(EvalConfig, argv, prog="evaluate.py", doc=__doc__.split("\n\n")[0])
    ev = evaluate(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print_summary(ev)
    return vars(ev)  # eval.json's record


if __name__ == "__main__":
    cli(main)
