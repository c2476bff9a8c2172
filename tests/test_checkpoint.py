"""checkpoint.py: saved keys are the plain module's whatever wraps it; inference loads onto the host."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint, load_for_inference, save_checkpoint, unwrap
from common import CompiledWithFallback
from config import parse_config
from conftest import tiny_train_args
from model import GPT, GPTConfig
from train import TrainConfig, train


def test_wrapped_models_save_plain_keys(tmp_path: Path) -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8))
    for wrapped in (torch.compile(model), CompiledWithFallback(model)):  # wrapping only: nothing compiles yet
        assert unwrap(wrapped) is model
        save_checkpoint(tmp_path / "c.pt", wrapped)
        assert set(load_checkpoint(tmp_path / "c.pt")["model"]) == set(model.state_dict())


def test_inference_loads_the_checkpoint_onto_the_host_then_moves_the_model(
        tiny_char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ckpt.pt holds the optimizer's moments (twice the weights): mapped straight onto a GPU they
    would take its memory for nothing. Only the model goes to the device."""
    out = tmp_path / "run"
    train(parse_config(TrainConfig, tiny_train_args(tiny_char_data, out, max_iters=2, eval_interval=2)))
    maps = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: maps.append(kw.get("map_location")) or real_load(*a, **kw))
    model, info = load_for_inference(out, "latest", device="meta")  # "meta" stands in for a GPU
    assert maps == ["cpu"]
    assert next(model.parameters()).device.type == "meta" and info["iter_num"] == 2
