"""Generate text from a trained run, streamed to the terminal as it is written.

    python sample.py --prompt="Prince Andrew" --num_samples=3       # the run just trained (the newest under out/)
    python sample.py --out_dir=out/wp_bpe_cpu --prompt="Prince Andrew" --num_samples=3
    python sample.py --out_dir=out/wp_bpe_cpu --prompt_file=prompt.txt --temperature=0

temperature=0 is greedy decoding (always the most likely token); top_k=0 and top_p=1 are off. The
default temperature is the run's own when evaluate.py has chosen one on val prompts, else 0.9.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bookgpt.checkpoint import load_run
from bookgpt.common import resolve_device, resolve_dtype
from bookgpt.config import UserError, cli, opt, parse_config
from bookgpt.sampling import TEMPERATURE, TOP_K, TOP_P, check_sampling, encode_prompt, parse_temperature, stream_text
from model import GPT


@dataclass
class SampleConfig:
    out_dir: str = opt("", "run directory written by train.py ('' = the newest run under out/)")
    ckpt: str = opt("best", "best (lowest val loss), latest, or ema (the weight average at its lowest val "
                                     "loss: runs trained with --ema_decay)")
    prompt: str = opt("\n", "text to continue")
    prompt_file: str = opt("", "read the prompt from this file instead")
    num_samples: int = opt(3, "how many continuations")
    max_new_tokens: int = opt(500, "tokens to generate per sample")
    temperature: str = opt("auto", "softmax temperature; 0 = greedy; auto = the run's own, which evaluate.py "
                                   f"chose on val prompts (sampling.json), else {TEMPERATURE}")
    top_k: int = opt(TOP_K, "sample among the k most likely tokens (0 = off)")
    top_p: float = opt(TOP_P, "nucleus sampling: smallest set with this much probability (1 = off)")
    seed: int = opt(1, "random seed: the same seed gives the same samples")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16")


def main(argv: list[str]) -> None:
    cfg = parse_config(SampleConfig, argv, prog="sample.py", doc=__doc__.split("\n\n")[0])
    prompt = cfg.prompt
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        try:
            prompt = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"prompt file not found: {path}") from None
        except UnicodeDecodeError:
            raise UserError(f"prompt file {path} is not UTF-8 text") from None
        except IsADirectoryError:
            raise UserError(f"prompt file {path} is a folder, not a file") from None
    if cfg.num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {cfg.num_samples}")
    device = resolve_device(cfg.device)
    ckpt, info = load_run(cfg.out_dir, cfg.ckpt)
    model = GPT.from_checkpoint(ckpt, info["path"], device)
    temperature = parse_temperature(cfg.temperature, info["out_dir"], cfg.ckpt)
    check_sampling(cfg.max_new_tokens, temperature, cfg.top_k, cfg.top_p)
    tokenizer = info["tokenizer"]
    encode_prompt(tokenizer, prompt)  # fail on a bad prompt before printing anything
    print(f"sampling from {info['path']} (step {info['iter_num']:,}) at temperature {temperature:g}",
          file=sys.stderr, flush=True)
    dtype = resolve_dtype(cfg.dtype, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = sys.stdout
    for i in range(cfg.num_samples):
        out.write(f"---------- sample {i + 1} of {cfg.num_samples}\n{prompt}")
        for piece in stream_text(model, tokenizer, prompt, cfg.max_new_tokens, temperature, cfg.top_k,
                                 cfg.top_p, dtype=dtype, generator=gen):
            out.write(piece)
            out.flush()
        out.write("\n")
    out.flush()


if __name__ == "__main__":
    cli(main)
