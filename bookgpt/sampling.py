"""Sampling that sample.py, evaluate.py and app.py share: the defaults, their checks, a run's own
temperature (sampling.json), and text streamed from the model as it is written."""
from __future__ import annotations

import codecs
import functools
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


# UTF-8 as a small automaton (the Unicode standard's table of well-formed byte sequences): the states are how a
# character in progress may go on. 0: between characters; 1, 2, 3: that many continuation bytes (80-BF) still due;
# 4-7: after E0, ED, F0 or F4, whose next byte has a narrower range (no overlong forms, surrogates or code points
# past U+10FFFF), then 1 or 2 more.
_CONT = range(0x80, 0xC0)
_AFTER = {1: (_CONT, 0), 2: (_CONT, 1), 3: (_CONT, 2), 4: (range(0xA0, 0xC0), 1), 5: (range(0x80, 0xA0), 1),
          6: (range(0x90, 0xC0), 2), 7: (range(0x80, 0x90), 2)}
_STATES = 8


def _utf8_step(state: int, byte: int) -> int:
    """The state after `byte`, or -1 where no valid UTF-8 goes on with it."""
    if state:
        allowed, then = _AFTER[state]
        return then if byte in allowed else -1
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return 1
    if 0xE0 <= byte <= 0xEF:
        return {0xE0: 4, 0xED: 5}.get(byte, 2)
    if 0xF0 <= byte <= 0xF4:
        return {0xF0: 6, 0xF4: 7}.get(byte, 3)
    return -1  # 80-C1 and F5-FF never start a character


def utf8_state(data: bytes) -> int:
    """The state after `data`; a byte that cannot go on starts afresh, as a decoder resynchronises."""
    state = 0
    for byte in data:
        state = _utf8_step(state, byte)
        if state < 0:
            state = max(0, _utf8_step(0, byte))
    return state


@functools.lru_cache(maxsize=8)
def utf8_table(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a vocabulary, built once: `after` (states, vocab), the state each token leaves from each state (-1: not
    valid UTF-8 there; ids past the tokenizer's vocabulary never are), and `ok` (tokens left + 1, states, vocab):
    the tokens that also leave a state that can reach the end of a character in that many more tokens. None when
    every token is whole characters (char tokenizers): nothing to guard."""
    after = torch.full((_STATES, vocab_size), -1, dtype=torch.long)
    for token in range(min(vocab_size, tokenizer.vocab_size)):
        data = tokenizer.decode_bytes([token])
        for start in range(_STATES):
            state = start
            for byte in data:
                state = _utf8_step(state, byte)
                if state < 0:
                    break
            after[start, token] = state
    if bool((after[0, :tokenizer.vocab_size] == 0).all()) and vocab_size == tokenizer.vocab_size:
        return None
    # fewest tokens from each state to the end of a character (_STATES stands for never)
    finish = torch.full((_STATES,), _STATES, dtype=torch.long)
    finish[0] = 0
    for _ in range(_STATES):
        via = torch.where(after >= 0, finish[after.clamp_min(0)] + 1, _STATES).amin(dim=1)
        finish = torch.minimum(finish, via.clamp_max(_STATES))
    reach = int(finish[finish < _STATES].max())
    ok = torch.stack([(after >= 0) & (finish[after.clamp_min(0)] <= left) for left in range(reach + 1)])
    return after, ok


class Utf8Guard:
    """`allowed` for model.generate: at each step the tokens whose bytes continue the bytes still pending into
    valid UTF-8, and, near the end, only those that let the sample end on a whole character. Every sample of a
    byte-level (byte, BPE, GPT-2) tokenizer then decodes exactly, streamed or not. One guard per generation."""

    def __init__(self, decode_bytes: Any, after: torch.Tensor, ok: torch.Tensor):
        self.decode_bytes, self.after, self.ok = decode_bytes, after, ok
        self.states: torch.Tensor | None = None
        self.seen = 0

    def __call__(self, seq: torch.Tensor, left: int) -> torch.Tensor:
        """seq (B, T), every token so far; left: tokens still to come after the next one -> (B, vocab) bool."""
        if self.after.device != seq.device:
            self.after, self.ok = self.after.to(seq.device), self.ok.to(seq.device)
        if self.states is None:  # the prompt: it may start or end inside a character (evaluate.py cuts prompts)
            rows = [self.decode_bytes(row) for row in seq.tolist()]
            self.states = torch.tensor([utf8_state(r) for r in rows], dtype=torch.long, device=seq.device)
        else:
            for t in range(self.seen, seq.size(1)):
                self.states = self.after[self.states, seq[:, t]].clamp_min(0)
        self.seen = seq.size(1)
        mask = self.ok[min(left, self.ok.size(0) - 1)][self.states]
        return mask | ~mask.any(dim=-1, keepdim=True)  # never an empty choice


def utf8_guard(tokenizer: Any, vocab_size: int) -> Utf8Guard | None:
    """A fresh guard for one generation with this tokenizer and a model of `vocab_size` outputs (None for a
    tokenizer whose every token is whole characters)."""
    table = utf8_table(tokenizer, vocab_size)
    return None if table is None else Utf8Guard(tokenizer.decode_bytes, *table)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    if not prompt:
        raise UserError("the prompt is empty: pass --prompt=\"some text\" or --prompt_file=FILE")
    return tokenizer.encode(prompt)  # a char tokenizer raises UserError naming unknown characters


def stream_text(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 500, temperature: float = TEMPERATURE,
                top_k: int = TOP_K, top_p: float = TOP_P, seed: int = 1, dtype: str = "float32",
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as tokens are sampled.

    Byte and BPE tokens can end inside a UTF-8 character; an incremental decoder holds such
    bytes back until the character is complete, and a Utf8Guard lets only tokens through that keep
    the bytes valid UTF-8 and end the sample on a whole character. Pass `generator` to continue one random
    stream across several samples (sample.py does, so --seed fixes all of them)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # the guard leaves nothing to replace
    steps = model.generate_stream(ids, max_new_tokens, temperature, top_k or None, top_p if top_p < 1 else None,
                                  generator, allowed=utf8_guard(tokenizer, model.config.vocab_size))
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
