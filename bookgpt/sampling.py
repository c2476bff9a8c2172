"""Sampling that sample.py, evaluate.py and app.py share: the defaults, their checks, a run's own
temperature (sampling.json), and text streamed from the model as it is written."""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from bookgpt.common import autocast
from bookgpt.config import UserError

MAX_NEW_TOKENS = 100_000  # beyond this a request is a typo, not a plan
# No top-k/top-p truncation (top-k 50 / top-p 0.95 made BPE models copy 2.5-3.6x as much training text as real
# text does: docs/log.md, "BPE-2048 becomes the preset"), and 0.9 unless the run has its own temperature, which
# `evaluate.py --temperature=A,B,...` chooses on val prompts (the highest within eval/textstats.py's copy and
# misspelling caps) and saves in sampling.json beside the checkpoint. A char model reads better at 0.8, top-k 50, top-p 0.95.
TEMPERATURE, TOP_K, TOP_P = 0.9, 0, 1.0


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS:,}, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def sampling_file(out_dir: str | Path, ckpt: str = "best") -> Path:
    """Where a run keeps the sampling temperature chosen for one of its checkpoints."""
    return Path(out_dir) / ("sampling.json" if ckpt == "best" else f"sampling_{ckpt}.json")


def run_temperature(out_dir: str | Path, ckpt: str = "best") -> float:
    """The run's own temperature (chosen on val prompts by evaluate.py), else the default."""
    path = sampling_file(out_dir, ckpt)
    try:
        temperature = json.loads(path.read_text(encoding="utf-8"))["temperature"]
    except FileNotFoundError:
        return TEMPERATURE
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"cannot read the sampling temperature in {path}: delete it (or rerun evaluate.py "
                        "--temperature=A,B,...) to choose again") from None
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise UserError(f"{path} holds a bad temperature ({temperature!r}): delete it to use {TEMPERATURE}")
    return float(temperature)


def parse_temperature(text: str, out_dir: str | Path, ckpt: str = "best") -> float:
    """A --temperature value: a number, or auto (the run's own)."""
    if str(text).strip().lower() == "auto":
        return run_temperature(out_dir, ckpt)
    try:
        return float(text)
    except ValueError:
        raise UserError(f"bad value for 'temperature': {text!r}; use a number such as 0.8 (0 = greedy) "
                        "or auto") from None


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    if not prompt:
        raise UserError("the prompt is empty: pass --prompt=\"some text\" or --prompt_file=FILE")
    return tokenizer.encode(prompt)  # a char tokenizer raises UserError naming unknown characters


def stream_text(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 500, temperature: float = TEMPERATURE,
                top_k: int = TOP_K, top_p: float = TOP_P, seed: int = 1, dtype: str = "float32",
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as tokens are sampled.

    Byte and BPE tokens can end inside a UTF-8 character; an incremental decoder holds such
    bytes back until the character is complete. Pass `generator` to continue one random
    stream across several samples (sample.py does, so --seed fixes all of them)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    steps = model.generate_stream(ids, max_new_tokens, temperature, top_k or None, top_p if top_p < 1 else None,
                                  generator)
    while True:
        # autocast for each step, not once around the loop: its state is per thread, and a caller may advance
        # this generator from several (Gradio runs each step of a streamed answer on a worker thread)
        with autocast(device.type, dtype):
            tok = next(steps, None)
        if tok is None:
            break
        piece = decoder.decode(tokenizer.decode_bytes([int(tok[0])]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
