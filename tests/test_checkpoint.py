"""checkpoint.py: saved keys are the plain module's whatever wraps it; inference loads onto the host."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bookgpt.checkpoint import check_resumable, data_difference, load_checkpoint, load_run, save_checkpoint, unwrap
from bookgpt.common import CompiledWithFallback
from bookgpt.config import UserError, parse_config
from conftest import load_model, tiny_train_args
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
    model, info = load_model(out, "latest", device="meta")  # "meta" stands in for a GPU
    assert maps == ["cpu"]
    assert next(model.parameters()).device.type == "meta" and info["iter_num"] == 2


def test_one_same_data_check_for_resume_distillation_and_evaluation() -> None:
    """The three stages compared different keys: resuming on data re-prepared with another
    --val_fraction passed train.py's check, so part of the old val split was trained on."""
    meta = {"vocab_size": 94, "tokenizer": {"kind": "char"}, "sha256_clean": "a" * 64,
            "fractions": {"val": 0.1, "test": 0.0}}
    assert data_difference(meta, dict(meta)) == ""
    assert data_difference(meta, {**meta, "vocab_size": 256}) == "vocab 94 vs 256"
    assert data_difference(meta, {**meta, "tokenizer": {"kind": "byte"}}) == "tokenizer char vs byte"
    assert data_difference(meta, {**meta, "sha256_clean": "b" * 64}) == "another text: its sha256 differs"
    assert data_difference(meta, {**meta, "fractions": {"val": 0.2, "test": 0.0}}) == \
        "split fractions {'val': 0.1, 'test': 0.0} vs {'val': 0.2, 'test': 0.0}"
    old = {k: v for k, v in meta.items() if k != "fractions"}  # a checkpoint from before a key existed
    assert data_difference(old, meta) == ""
    # folders from before the split layout was recorded were all split at the tail
    blocks = {**meta, "layout": {"kind": "blocks", "bounds": [0, 5, 9], "owners": ["train", "val"]}}
    assert data_difference(meta, blocks) == "split layout tail vs blocks"
    assert data_difference(blocks, {**blocks, "layout": {**blocks["layout"], "bounds": [0, 6, 9]}}) == \
        "split layout blocks vs blocks with other blocks"
    assert data_difference(meta, {**meta, "layout": {"kind": "tail"}}) == ""
    ckpt = {"meta": meta, "model_config": dataclasses.asdict(GPTConfig(vocab_size=94)), "config": {}}
    with pytest.raises(UserError, match=r"cannot resume from ckpt.pt: it was trained on other data than data_dir "
                                        r"\(split fractions .*\); pass the run's --data_dir"):
        check_resumable(ckpt, GPTConfig(vocab_size=94), {**meta, "fractions": {"val": 0.2, "test": 0.0}}, Path("ckpt.pt"))
    check_resumable(ckpt, GPTConfig(vocab_size=94), meta, Path("ckpt.pt"))


def test_a_run_folder_saved_before_the_package_layout_still_samples_and_evaluates(
        old_run, capsys: pytest.CaptureFixture) -> None:
    """A run folder in the layout train.py wrote when every module stood at the top level (tests/old_run.py)."""
    import evaluate
    import sample

    run, expected = old_run
    ckpt, info = load_run(run, "latest")
    assert info["iter_num"] == 6 and ckpt["version"] == 1
    sample.main([f"--out_dir={run}", f"--prompt={expected['prompt']}", "--num_samples=1", "--max_new_tokens=40",
                 "--temperature=1", "--seed=1", "--device=cpu", "--dtype=float32"])
    assert capsys.readouterr().out == f"---------- sample 1 of 1\n{expected['sample_seed1_t1']}\n"  # as sampled then
    ev = evaluate.main([f"--out_dir={run}", f"--data_dir={run.parent / 'data'}", "--num_prompts=0", "--baselines=false",
                        "--device=cpu", "--dtype=float32"])
    assert 4.5 < ev["likelihood"]["bpb"] < 5.5 and (run / "eval.json").is_file()
