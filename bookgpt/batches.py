"""Training batches: windows of a prepared split (random, or shuffled passes over it), read from its
memory-mapped bin, drawn one batch ahead so the copy to the device overlaps the step, from a generator
whose state a checkpoint saves; and the meta.json check of the folder training reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bookgpt.config import UserError
from bookgpt.tokenizer import read_meta


class Batches:
    """(x, y) windows from a split's token file: `windows="random"` draws each window anywhere, independently;
    "epoch" cuts each pass over the text into whole windows from a random offset and hands them out shuffled, so a
    pass covers every token once before the next begins (each process of a multi-process run makes its own passes).

    The memmap is opened per batch (a long-lived one grows resident memory, a nanoGPT
    complaint), and every draw comes from a torch.Generator, so the stream can be saved and
    resumed exactly (`where`, `resume`). Each rank seeds its own generator, so ranks draw different batches."""

    def __init__(self, data_dir: Path, split: str, dtype: str, block_size: int, batch_size: int, device: str,
                 windows: str = "random") -> None:
        self.path = data_dir / f"{split}.bin"
        self.dtype, self.block_size, self.batch_size, self.device = np.dtype(dtype), block_size, batch_size, device
        self.windows = windows
        self.n_tokens = self.path.stat().st_size // self.dtype.itemsize
        if self.n_tokens <= block_size:
            raise UserError(f"{self.path} has {self.n_tokens} tokens, not more than block_size={block_size}; "
                            f"use a smaller block_size or a bigger split")
        if windows == "epoch" and (self.n_tokens - block_size) // block_size < batch_size:
            raise UserError(f"{self.path} holds fewer than batch_size={batch_size} whole windows of {block_size} "
                            f"tokens, so a pass cannot fill a batch; use windows=random or a smaller batch_size")
        self.order: list[int] | None = None  # this pass's window starts (windows="epoch"), drawn at its first batch
        self.pos = 0  # the first of them not yet handed out
        self.pass_state: torch.Tensor | None = None  # the generator's state when this pass was drawn

    def starts(self, gen: torch.Generator) -> list[int]:
        if self.windows == "random":
            return torch.randint(self.n_tokens - self.block_size, (self.batch_size,), generator=gen).tolist()
        while self.order is None or self.pos + self.batch_size > len(self.order):
            if self.order is not None:  # this pass is used up (a last part batch is left out): the next one
                self.pos = 0
            self.pass_state = gen.get_state()
            offset = int(torch.randint(self.block_size, (1,), generator=gen))
            count = (self.n_tokens - 1 - offset) // self.block_size  # windows of block_size + 1 tokens (x and y)
            self.order = (offset + self.block_size * torch.randperm(count, generator=gen)).tolist()
        self.pos += self.batch_size
        return self.order[self.pos - self.batch_size:self.pos]

    def where(self, gen: torch.Generator) -> tuple[torch.Tensor, int]:
        """Where the stream stands: a generator state and a position in the pass that state draws."""
        if self.order is None:  # random windows, or a pass not drawn yet: the generator draws it
            return gen.get_state(), self.pos
        return self.pass_state, self.pos

    def resume(self, gen: torch.Generator, state: torch.Tensor, pos: int = 0) -> None:
        """Go back to where `where` stood: the next batch is the one that came next then."""
        gen.set_state(state)
        self.order, self.pos = None, pos

    def get(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        rows = np.stack([data[s:s + self.block_size + 1] for s in self.starts(gen)]).astype(np.int64)
        del data
        xy = torch.from_numpy(rows)
        if self.device.startswith("cuda"):  # pinned memory: the copy runs without the host waiting for it
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[:, :-1], xy[:, 1:]


class Loader:
    """The training batches, each drawn one ahead: while the GPU works through one micro-batch,
    the host has already cut the next from the memmap and queued its copy to the device.

    `state()` is the batch stream where the first batch not yet handed out begins (the one drawn
    ahead is not counted as used): a checkpoint saves it, and a resume draws that batch again."""

    def __init__(self, batches: Batches, gen: torch.Generator) -> None:
        self.batches, self.gen = batches, gen
        self._state = batches.where(gen)
        self._next = batches.get(gen)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._next
        self._state = self.batches.where(self.gen)
        self._next = self.batches.get(self.gen)
        return batch

    def state(self) -> tuple[torch.Tensor, int]:
        """Batches.where for the first batch not yet handed out."""
        return self._state


def read_data_meta(data_dir: Path, train_split: str = "train") -> dict[str, Any]:
    """meta.json of a prepared folder (tokenizer.read_meta checks it), and the bins training needs."""
    meta = read_meta(data_dir)
    for split in ("train", "val"):
        if not (data_dir / f"{split}.bin").is_file():
            raise UserError(f"{data_dir / (split + '.bin')} is missing; run prepare.py again")
    if train_split == "train_dropout" and not (data_dir / "train_dropout.bin").is_file():
        raise UserError(f"{data_dir} has no train_dropout.bin; write it with python prepare.py --bpe_dropout=0.1 "
                        "(and the folder's other options), or train on --train_split=train")
    return meta
