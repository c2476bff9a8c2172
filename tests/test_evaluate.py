"""evaluate.py: strided likelihood, bits per byte, baselines, memorisation, style, report, errors."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import evaluate as E
from bookgpt.eval import likelihood as L, report
from bookgpt.eval.textstats import against_caps, choose_temperature
from bookgpt.config import UserError, parse_config
from conftest import tiny_train_args
from model import GPT, GPTConfig
from bookgpt.common import bits_per_byte, likelihood_figures, read_metrics, records_of
from train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- likelihood

@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), block=st.integers(1, 40), data=st.data())
def test_windows_score_every_target_once_with_enough_context(n: int, block: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, block))
    scored = []
    for k, (start, end, n_scored) in enumerate(L.strided_windows(n, block, stride)):
        assert 0 <= start < end <= n - 1 and end - start <= block and 1 <= n_scored <= end - start
        for j in range(end - n_scored + 1, end + 1):  # target j is predicted from tokens[start:j]
            scored.append(j)
            if k > 0:
                assert j - start >= block - stride + 1
    assert scored == list(range(1, n))


def tiny_gpt(vocab: int = 11, block: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16, pos_emb="learned",
                          norm="layernorm", qk_norm=False, mlp="gelu"))
    for p in model.parameters():  # larger weights than GPT init: predictions that depend on context
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.mark.parametrize("n, stride, batch", [(100, 5, 3), (100, 16, 4), (57, 1, 64), (10, 8, 2)])
def test_strided_equals_naive_per_window(n: int, stride: int, batch: int) -> None:
    model, block = tiny_gpt(), 16
    tokens = np.random.default_rng(n).integers(0, 11, size=n)
    total, count = L.strided_nll(model, tokens, block, stride, batch_size=batch)
    naive, naive_count = 0.0, 0
    with torch.no_grad():
        for start, end, n_scored in L.strided_windows(n, block, stride):  # one window at a time
            logits, _ = model(torch.tensor(tokens[None, start:end]))
            target = torch.tensor(tokens[end - n_scored + 1:end + 1])
            naive += F.cross_entropy(logits[0, -n_scored:], target, reduction="sum").item()
            naive_count += n_scored
    assert count == naive_count == n - 1
    assert total == pytest.approx(naive, rel=1e-5)


@pytest.mark.parametrize("n, stride, batch", [(100, 5, 3), (57, 1, 64), (10, 8, 2), (2, 4, 1)])
def test_per_token_nll_is_the_same_pass_token_by_token(n: int, stride: int, batch: int) -> None:
    model, block = tiny_gpt(), 16
    tokens = np.random.default_rng(n).integers(0, 11, size=n)
    per_token = L.strided_token_nll(model, tokens, block, stride, batch_size=batch)
    assert per_token.shape == (n - 1,) and per_token.sum() == pytest.approx(L.strided_nll(model, tokens, block, stride)[0],
                                                                            rel=1e-5)
    with torch.no_grad():  # token j's nll, from the window that scores it
        for start, end, n_scored in L.strided_windows(n, block, stride):
            logits, _ = model(torch.tensor(tokens[None, start:end]))
            target = torch.tensor(tokens[end - n_scored + 1:end + 1])
            expected = F.cross_entropy(logits[0, -n_scored:], target, reduction="none").numpy()
            np.testing.assert_allclose(per_token[end - n_scored:end], expected, rtol=1e-5)


def test_stride_one_is_full_context_and_context_matters() -> None:
    model, block = tiny_gpt(), 16
    tokens = np.random.default_rng(1).integers(0, 11, size=60)
    total, _ = L.strided_nll(model, tokens, block, stride=1)
    with torch.no_grad():  # each target predicted from the block_size tokens before it (fewer at the start)
        per_token = sum(F.cross_entropy(model(torch.tensor(tokens[None, max(0, j - block):j]))[0][0, -1:],
                                        torch.tensor(tokens[j:j + 1])).item() for j in range(1, 60))
    assert total == pytest.approx(per_token, rel=1e-5)
    chunks, _ = L.strided_nll(model, tokens, block, stride=block)  # disjoint blocks: less context
    assert chunks != pytest.approx(total, rel=1e-6)


def test_bf16_autocast_is_close_to_float32() -> None:
    model = tiny_gpt()
    tokens = np.random.default_rng(2).integers(0, 11, size=200)
    exact, n = L.strided_nll(model, tokens, 16, 8, dtype="float32")
    fast, _ = L.strided_nll(model, tokens, 16, 8, dtype="bfloat16")
    assert abs(fast - exact) / n < 0.05


def test_bits_per_byte_on_a_hand_made_example() -> None:
    # "Pé’s!" as 4 tokens (say "P", "é", "’s", "!"): 5 chars, 8 bytes (é is 2 bytes in UTF-8, ’ is 3),
    # scored 6 nats in all.
    text = "Pé’s!"
    assert (len(text), len(text.encode("utf-8"))) == (5, 8)
    total_nats, n_tokens = 6.0, 4
    f = likelihood_figures(total_nats, n_tokens, n_bytes=8, n_chars=5)
    assert f["loss"] == pytest.approx(1.5)
    assert f["bpb"] == pytest.approx(1.5 * 4 / 8 / math.log(2))  # nats/token x tokens/bytes / ln 2
    assert f["bpb"] == pytest.approx(6.0 / math.log(2) / 8)      # = total bits / bytes
    assert f["bpb"] == pytest.approx(bits_per_byte(1.5, {"tokens": 4, "bytes": 8}))  # train.py's formula agrees
    assert f["bpc"] == pytest.approx(6.0 / 5 / math.log(2))
    assert f["ppl"] == pytest.approx(math.exp(1.5)) and f["ppl_char"] == pytest.approx(math.exp(6.0 / 5))


class Uniform(torch.nn.Module):
    """Predicts every token with probability 1/vocab, whatever the context."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor, targets=None):
        return torch.zeros(*idx.shape, self.vocab), None


@pytest.mark.parametrize("vocab", [2, 104, 256])
def test_uniform_model_gets_log2_vocab_bits_per_token(vocab: int) -> None:
    tokens = np.random.default_rng(0).integers(0, vocab, size=500)
    total, n = L.strided_nll(Uniform(vocab), tokens, block_size=32, stride=7, batch_size=5)
    f = likelihood_figures(total, n, n_bytes=n, n_chars=n)
    assert n == 499
    assert f["bits_per_token"] == pytest.approx(math.log2(vocab), rel=1e-6)
    assert f["ppl"] == pytest.approx(vocab, rel=1e-5)


def test_prompts_are_spread_start_at_words_and_are_reproducible(book_text: str) -> None:
    text = book_text[:100_000]
    starts = L.pick_prompts(text, 8, 200, 500, seed=3)
    assert starts == L.pick_prompts(text, 8, 200, 500, seed=3) != L.pick_prompts(text, 8, 200, 500, seed=4)
    stretch = len(text) // 8
    for i, s in enumerate(starts):
        assert i * stretch <= s <= (i + 1) * stretch - 700
        assert s == 0 or (text[s - 1].isspace() and not text[s].isspace())


def test_overfitting_summary_and_metrics_reader(tmp_path: Path) -> None:
    lines = [{"kind": "train", "iter": 10, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 1.0, "time_s": 1.0}]
    for it, tr, va in [(0, 4.0, 4.0), (100, 2.0, 2.1), (200, 1.5, 1.9), (300, 1.2, 2.0), (400, 1.0, 2.2)]:
        lines.append({"kind": "eval", "iter": it, "train_loss": tr, "val_loss": va, "val_bpb": va / 0.7})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{half a line", encoding="utf-8")
    records, skipped = read_metrics(path)
    train_rows, evals = records_of(records, "train"), records_of(records, "eval")
    assert len(train_rows) == 1 and len(evals) == 5 and skipped == 1
    s = report.overfitting_summary(evals)
    assert (s["best_iter"], s["best_val_loss"], s["evals_after_best"], s["last_iter"]) == (200, 1.9, 2, 400)
    assert s["val_rise_after_best"] == pytest.approx(0.3) and s["gap_at_last"] == pytest.approx(1.2)
    assert report.plot_curves(train_rows, evals, s).startswith(b"\x89PNG")


def test_dynamic_evaluation_scores_before_it_learns() -> None:
    model, block = tiny_gpt(), 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = np.random.default_rng(3).integers(0, 11, size=100)
    static, n = L.strided_nll(model, tokens, block, 8)
    per_token = L.dynamic_token_nll(model, tokens, block, 8, lr=0.0)
    assert len(per_token) == n and per_token.sum() == pytest.approx(static, rel=1e-5)
    np.testing.assert_allclose(per_token, L.strided_token_nll(model, tokens, block, 8), rtol=1e-5)
    # one window: its tokens are scored before the only SGD step, so any learning rate gives the static score
    one = tokens[:block + 1]
    assert L.dynamic_token_nll(model, one, block, 8, lr=10.0).sum() == pytest.approx(L.strided_nll(model, one, block, 8)[0],
                                                                           rel=1e-5)
    assert L.dynamic_token_nll(model, tokens, block, 8, lr=0.5).sum() != pytest.approx(static, rel=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # it worked on a copy


def test_dynamic_evaluation_adapts_to_the_text_it_reads() -> None:
    model, block = tiny_gpt(), 16
    tokens = np.tile(np.random.default_rng(4).integers(0, 11, size=7), 40)  # one phrase, over and over
    static, n = L.strided_nll(model, tokens, block, 8)
    dynamic = L.dynamic_token_nll(model, tokens, block, 8, lr=0.3).sum()
    assert dynamic < 0.6 * static  # (here about half)
    # pulled all the way back to the trained weights after every step, it keeps only the last step's learning
    pulled = L.dynamic_token_nll(model, tokens, block, 8, lr=0.3, decay=1.0).sum()
    assert dynamic < pulled < static


def test_krause_steps_divide_by_the_training_gradients_rms() -> None:
    model, block = tiny_gpt(), 16
    tokens = np.random.default_rng(6).integers(0, 11, size=120)
    rms = L.train_gradient_rms(model, tokens, block, batches=4, batch_size=2)
    assert [r.shape for r in rms] == [p.shape for p in model.parameters()] and all((r >= 0).all() for r in rms)
    assert all(torch.equal(a, b) for a, b in zip(rms, L.train_gradient_rms(model, tokens, block, batches=4, batch_size=2)))
    ones = [torch.full_like(r, 1 / 1.1) for r in rms]  # an RMS of 1/1.1 everywhere (plus its floor, 0.1/1.1) is SGD
    assert L.dynamic_token_nll(model, tokens, block, 8, lr=0.2, grad_rms=ones).sum() == \
        pytest.approx(L.dynamic_token_nll(model, tokens, block, 8, lr=0.2).sum(), rel=1e-5)
    # a weight the training batches never moved (rms 0) takes a bounded step, not an infinite one
    zeros = [torch.zeros_like(r) for r in rms]
    assert math.isfinite(L.dynamic_token_nll(model, tokens, block, 8, lr=1e-3, grad_rms=zeros).sum())
    assert likelihood_figures(1e6, 10, 10, 10)["ppl"] == math.inf  # a diverged pass is reported, not a crash
    assert L.dynamic_token_nll(model, tokens, block, 8, lr=1e-3, grad_rms=rms, decay=0.1).sum() != \
        pytest.approx(L.strided_nll(model, tokens, block, 8)[0], rel=1e-4)


class Ops(TorchDispatchMode):
    """Records the dtype of every tensor an op returns, and every op that makes the host wait."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dtypes |= {t.dtype for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.reads.append(str(func))
        return out


def test_likelihood_needs_no_float64_on_the_device_and_waits_for_it_once() -> None:
    """MPS has no float64: the running totals were float64 tensors on the device. And boolean-mask
    indexing (logits[scored]) waits for the GPU every batch to count what it selects."""
    model, block = tiny_gpt(), 16
    tokens = np.random.default_rng(5).integers(0, 11, size=90)
    with Ops() as ops:
        total, _ = L.strided_nll(model, tokens, block, 5, batch_size=3)
    assert torch.float64 not in ops.dtypes and not ops.reads
    assert total == pytest.approx(L.strided_nll(model, tokens, block, 5, batch_size=64)[0], rel=1e-6)
    with Ops() as ops:
        L.dynamic_token_nll(model, tokens, block, 8, lr=0.1)
    assert torch.float64 not in ops.dtypes


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_eval_run(tiny_char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny trained run, and a copy of its data folder (evaluate caches baselines in it)."""
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data"
    shutil.copytree(tiny_char_data, data)
    train(parse_config(TrainConfig, tiny_train_args(data, root / "run", max_iters=30, learning_rate=3e-3)))
    return root / "run", data


def test_end_to_end_report(tiny_eval_run: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    run, data = tiny_eval_run
    args = [f"--out_dir={run}", "--num_prompts=3", "--gen_tokens=60", "--prompt_chars=50", "--dtype=float32",
            "--ngram_order=4"]
    ev = E.main(args)
    out = capsys.readouterr().out
    assert "bits per byte" in out and "Kneser-Ney, order 4" in out and "memorisation" in out
    saved = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    lk = saved["likelihood"]
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    # the headline is test, every token of it (the first as context only); val is scored beside it
    assert saved["data"]["split"] == "test" and list(saved["splits"]) == ["test", "val"]
    assert saved["splits"]["test"]["likelihood"] == lk
    for name in ("test", "val"):
        sp = saved["splits"][name]["likelihood"]
        assert sp["tokens"] == meta["splits"][name]["tokens"] - 1 and sp["bytes"] == meta["splits"][name]["bytes"] - 1
        assert sp["bpb"] == pytest.approx(sp["loss"] * sp["tokens"] / sp["bytes"] / math.log(2))
        assert 2.0 < sp["bpb"] < 6.0  # trained a little: better than uniform over 100+ chars (6.7 bits)
        assert set(saved["splits"][name]["baselines"]) == {"unigram", "kn2", "kn3", "kn4", "mkn4", "zlib", "bz2", "xz"}
    assert saved["baselines"] == saved["splits"]["test"]["baselines"]
    assert "test" in out.splitlines()[1] and "val" in out.splitlines()[1]  # the two columns of the summary
    assert len(saved["samples"]) == 3 and all(len(s["generated"]) == 60 for s in saved["samples"])
    assert all(len(s["reference"]) == 60 for s in saved["samples"])
    assert 0.0 <= saved["memorisation"]["generated"]["char30_share"] <= 1.0
    assert "skipped" in saved["two_sample"]  # 3 prompts: too few for 5 folds, and the report says so
    assert saved["curves"]["evals"] == 4 and saved["curves"]["best_iter"] in (0, 10, 20, 30)
    report = (run / "report.md").read_text(encoding="utf-8")
    for heading in ("## Held-out likelihood", "## Baselines", "## Overfitting", "## Memorisation", "## Style",
                    "## Themes", "## Samples"):
        assert heading in report
    th = saved["style"]["themes"]  # generated against the real continuations of the same prompts, and a control
    assert 0.0 <= th["content_per_prompt"]["own"] <= 1.0 and 0.0 <= th["content_per_prompt"]["shuffled"] <= 1.0
    assert "| content words, other prompt's real | - |" in report and "content words, own prompt's real" in out
    assert f"{lk['bpb']:.4f}" in report and saved["samples"][0]["generated"] in report
    assert "| measure | test | val |" in report and "**test** is the headline" in report
    for png in ("loss_curves.png", "bpb_baselines.png"):
        assert f"]({png})" in report and (run / png).read_bytes().startswith(b"\x89PNG")
    from bookgpt.eval.report import Evaluation, output_names, render  # report.md: from eval.json's record alone
    assert render(Evaluation(**saved), output_names("best")) == report
    assert (data / "baselines_val.json").is_file() and (data / "baselines_test.json").is_file()
    # a second run reads the cached baselines and gets the same figures
    again = E.main(args + ["--num_prompts=0"])
    assert any(k.endswith("(cached)") for k in again["timings"])
    assert again["baselines"] == ev["baselines"] and again["likelihood"] == pytest.approx(ev["likelihood"])
    assert ev["dynamic"] == {} and ev["mixture"] == {}  # off unless asked for


def test_ngram_mixture_end_to_end(tiny_eval_run: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    run, _ = tiny_eval_run
    # characters take 7 bits, so 9 of them fit in an n-gram key (bytes: 8)
    ev = E.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--dtype=float32", "--mix_ngram=1,3,9"])
    mix, lk = ev["mixture"], ev["likelihood"]
    # each order's weight fitted on val, the order with the best val bpb scored on test with that weight
    by_order = mix["val_bpb_by_order"]
    assert set(by_order) == {"1", "3", "9"} and mix["chosen_on"] == "val"
    assert str(mix["order"]) == min(by_order, key=by_order.get) and 0 <= mix["weight"] <= 1
    assert mix["tokens"] == lk["tokens"] and mix["bytes"] == lk["bytes"]  # the figures are test's
    # the fitted weight does no worse on val than the model alone (w = 1)
    assert by_order[str(mix["order"])] <= ev["splits"]["val"]["likelihood"]["bpb"] + 1e-9
    out = capsys.readouterr().out
    assert f"bpb, mixed with an n-gram (order {mix['order']}, model weight {mix['weight']:.3f})" in out
    assert f"**{mix['bpb']:.4f} bpb**" in (run / "report.md").read_text(encoding="utf-8")
    # the per-token pass gives the static figures of the plain pass
    plain = E.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--dtype=float32"])
    assert lk == pytest.approx(plain["likelihood"], rel=1e-6)
    # with dynamic evaluation, its probabilities are mixed too, the weight again fitted on val
    both = E.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--dtype=float32", "--mix_ngram=3",
                   "--dynamic_lr=0.05"])
    dyn = both["dynamic"]
    assert dyn["mixture"]["val_bpb_by_order"]["3"] <= dyn["val_bpb_by_lr"]["0.05"] + 1e-9
    assert dyn["mixture"]["tokens"] == lk["tokens"] and 0 <= dyn["mixture"]["weight"] <= 1
    assert f"bpb, dynamic evaluation and n-gram (order 3, model weight {dyn['mixture']['weight']:.3f})" in \
        capsys.readouterr().out


def test_ensemble_end_to_end(tiny_eval_run: tuple[Path, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    run, data = tiny_eval_run
    # a second run on the same data with another seed and a shorter context (every token is still scored once)
    other = tmp_path / "other"
    train(parse_config(TrainConfig, tiny_train_args(data, other, max_iters=30, learning_rate=3e-3, seed=7,
                                                    block_size=16)))
    args = [f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--dtype=float32"]
    single = E.main(args)  # the run's own evaluation, which the ensemble's must leave as it is
    ev = E.main(args + [f"--ensemble={other}", "--mix_ngram=3"])
    ens, lk = ev["ensemble"], ev["likelihood"]
    assert ens["runs"] == [str(run), str(other)] and ens["chosen_on"] == "val"
    assert sum(ens["weights"]) == pytest.approx(1) and all(0 <= w <= 1 for w in ens["weights"])
    assert ens["tokens"] == lk["tokens"] and ens["bytes"] == lk["bytes"]  # the figures are test's
    assert ens["runs_bpb"][0] == pytest.approx(lk["bpb"])
    alone = E.main([f"--out_dir={other}", "--num_prompts=0", "--baselines=false", "--dtype=float32"])
    assert ens["runs_bpb"][1] == pytest.approx(alone["likelihood"]["bpb"])
    # fitted on val, the ensemble does no worse there than either run alone
    val_alone = [ev["splits"]["val"]["likelihood"]["bpb"], alone["splits"]["val"]["likelihood"]["bpb"]]
    assert ens["val_bpb"] <= min(val_alone) + 1e-6
    # its probabilities mixed with the n-gram as well, the weight again fitted on val
    assert ens["mixture"]["val_bpb_by_order"]["3"] <= ens["val_bpb"] + 1e-9 and ens["mixture"]["tokens"] == lk["tokens"]
    out = capsys.readouterr().out
    assert f"wrote {run}/eval_ensemble.json and report_ensemble.md" in out
    assert f"bpb, ensemble (2 runs, weights {ens['weights'][0]:.3f} / {ens['weights'][1]:.3f})" in out
    assert "bpb, ensemble and n-gram (order 3" in out
    # written beside the run's own evaluation, which stays the single model's
    assert f"**{ens['bpb']:.4f} bpb**" in (run / "report_ensemble.md").read_text(encoding="utf-8")
    assert json.loads((run / "eval_ensemble.json").read_text(encoding="utf-8"))["ensemble"]["bpb"] == ens["bpb"]
    assert json.loads((run / "eval.json").read_text(encoding="utf-8"))["timings"] == single["timings"]
    assert ev["mixture"]["bpb"] != pytest.approx(ens["bpb"])  # the single model's mixture is still there, apart
    # a run on other data, or none at all, is one clear error
    with pytest.raises(UserError, match="run directory not found"):
        E.main(args + [f"--ensemble={tmp_path / 'missing'}"])
    ckpt = torch.load(other / "best.pt", weights_only=True)
    ckpt["meta"] = {**ckpt["meta"], "sha256_clean": "0" * 64}
    torch.save(ckpt, other / "best.pt")
    with pytest.raises(UserError, match=r"trained on other data than the evaluated run \(another text"):
        E.main(args + [f"--ensemble={other}"])


def test_dynamic_evaluation_end_to_end(tiny_eval_run: tuple[Path, Path], capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = tiny_eval_run
    # lr 5 diverges: whether it reaches inf or only a huge finite loss depends on the CPU's kernels, so
    # the divergence is made certain here
    real_nll = E.dynamic_token_nll
    def nll(model, tokens, block_size, stride, lr, *rest):  # noqa: ANN001, ANN202
        out = real_nll(model, tokens, block_size, stride, lr, *rest)
        return np.full_like(out, np.nan) if lr == 5 else out
    monkeypatch.setattr(E, "dynamic_token_nll", nll)
    ev = E.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--dtype=float32",
                 "--dynamic_lr=0.05,0.5,5"])
    dyn, lk = ev["dynamic"], ev["likelihood"]
    # each rate scored on val, the best one then on test, the headline
    by_lr = dyn["val_bpb_by_lr"]
    assert set(by_lr) == {"0.05", "0.5", "5"} and dyn["chosen_on"] == "val"
    assert format(dyn["lr"], "g") == min((k for k in by_lr if by_lr[k] is not None), key=by_lr.get)
    assert dyn["tokens"] == lk["tokens"] and dyn["bytes"] == lk["bytes"]  # the figures are test's
    assert dyn["bpb"] == pytest.approx(dyn["loss"] * dyn["tokens"] / dyn["bytes"] / math.log(2))
    assert dyn["bpb"] != pytest.approx(lk["bpb"], rel=1e-4)
    assert f"bpb, dynamic evaluation (lr {dyn['lr']:g})" in capsys.readouterr().out
    assert f"**{dyn['bpb']:.4f} bpb**" in (run / "report.md").read_text(encoding="utf-8")
    saved = json.loads((run / "eval.json").read_text(encoding="utf-8"))["dynamic"]
    assert saved["val_bpb_by_lr"]["5"] is None  # lr 5 diverged on val: recorded, never chosen
    assert {k: v for k, v in saved.items() if k not in ("val_bpb_by_lr", "method", "chosen_on")} == \
        pytest.approx({k: v for k, v in dyn.items() if k not in ("val_bpb_by_lr", "method", "chosen_on")})
    # Krause et al.'s steps: every learning rate with every decay, chosen on val
    ev = E.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--dtype=float32",
                 "--dynamic_method=rms", "--dynamic_lr=1e-4,1e-3", "--dynamic_decay=0,0.02"])
    dyn = ev["dynamic"]
    assert set(dyn["val_bpb_by_lr"]) == {"0.0001", "0.001", "0.0001, decay 0.02", "0.001, decay 0.02"}
    assert dyn["method"] == "rms" and any(k.endswith("gradient RMS on train") for k in ev["timings"])
    assert "(lr " + format(dyn["lr"], "g") in capsys.readouterr().out


def test_temperature_choice_keeps_the_highest_within_both_caps() -> None:
    t = lambda temperature, copy, misspell: {"temperature": temperature, "copy_ratio": copy, "misspell_ratio": misspell}
    trials = [t(0.6, 1.9, 0.9), t(0.7, 0.6, 1.5), t(0.8, 0.2, 2.3), t(0.9, 0.1, 3.3)]
    assert choose_temperature(trials)["temperature"] == 0.7  # 0.6 is within too, but colder
    assert choose_temperature([t(0.7, 3.0, 1.0), t(0.8, 0.5, 2.1)])["temperature"] == 0.8  # none within: 2.1/1.5 < 3/2
    assert choose_temperature([t(0.7, 4.1, 1.0), t(0.8, 0.5, 2.9)])["temperature"] == 0.8  # 2.9/1.5 < 4.1/2
    mem = lambda g, r: {"generated": {"char30_share": g}, "reference": {"char30_share": r}}
    style = lambda g, r: {"generated": {"unknown_word_share": g}, "reference": {"unknown_word_share": r}}
    assert against_caps(mem(0.002, 0.001), style(0.03, 0.02)) == pytest.approx({"copy_ratio": 2.0, "misspell_ratio": 1.5})
    assert against_caps(mem(0.0, 0.0), style(0.01, 0.0)) == {"copy_ratio": 1.0, "misspell_ratio": math.inf}


def test_temperature_chosen_on_val_prompts_becomes_the_runs_own(tiny_eval_run: tuple[Path, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from bookgpt import sampling as sample
    run, _ = tiny_eval_run
    seen = []  # (split, temperature) of each batch of continuations
    real = E.continue_prompts
    def spy(ctx, name, temperature):
        seen.append((name, temperature))
        return real(ctx, name, temperature)
    monkeypatch.setattr(E, "continue_prompts", spy)
    args = [f"--out_dir={run}", "--num_prompts=5", "--gen_tokens=60", "--prompt_chars=50", "--baselines=false",
            "--dtype=float32", "--two_sample_chars=20"]
    try:
        ev = E.main(args + ["--temperature=0.3,1.6"])
        sampling = ev["sampling"]
        trials = sampling["trials"]
        assert [t["temperature"] for t in trials] == [0.3, 1.6] and sampling["source"] == "chosen on val"
        assert all(0.0 <= t["distinguishable"] <= 1.0 for t in trials)  # each temperature's two-sample test on val
        assert sampling["temperature"] == choose_temperature(trials)["temperature"]
        assert seen == [("val", 0.3), ("val", 1.6), ("test", sampling["temperature"])]  # chosen on val, shown on test
        saved = json.loads((run / "sampling.json").read_text(encoding="utf-8"))
        assert saved["temperature"] == sampling["temperature"] and saved["chosen_on"] == "val"
        assert sample.run_temperature(run) == sampling["temperature"]
        assert {"copy_ratio", "misspell_ratio"} <= set(sampling)  # the test prompts' own ratios, reported
        report_md = (run / "report.md").read_text(encoding="utf-8")
        assert "The temperature was chosen on 5 val prompts" in report_md and " (chosen) |" in report_md
        ts = ev["two_sample"]  # on the test prompts, with its real-vs-real control
        assert ts["prompts"] == 5 and ts["pieces"] == 15 and set(ts["real_vs_real"]) == set(ts["generated_vs_real"])
        assert ts["real_vs_real"]["char 1-5-grams"] is None  # 2 pairs of prompts: too few for its 5 folds
        assert "## Can a reader tell?" in report_md and "| told apart |" in report_md
        # later evaluations (and sample.py, app.py) use the run's own temperature: the same samples again
        again = E.main(args)
        assert again["sampling"]["source"] == "the run's own" and again["samples"] == ev["samples"]
        assert seen[-1] == ("test", sampling["temperature"])
    finally:
        (run / "sampling.json").unlink(missing_ok=True)
    assert E.main(args + ["--num_prompts=0"])["sampling"] == {}
    assert sample.run_temperature(run) == sample.TEMPERATURE


@pytest.mark.slow
def test_errors_are_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    for out_dir, says in [(tmp_path / "missing", "run directory not found"), (tmp_path / "empty_run", "no checkpoint")]:
        r = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={out_dir}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and says in r.stderr


def test_data_with_other_splits_is_refused(tiny_eval_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = tiny_eval_run
    other = tmp_path / "data"
    shutil.copytree(data, other)
    meta = json.loads((other / "meta.json").read_text(encoding="utf-8"))
    meta["fractions"] = {"val": 0.2, "test": 0.0}  # re-prepared: the new val overlaps the old train
    (other / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(UserError, match=r"holds other data than .* was trained on \(split fractions"):
        E.main([f"--out_dir={run}", f"--data_dir={other}", "--num_prompts=0", "--baselines=false"])


def test_list_options_are_typed_from_the_command_line_and_toml(tmp_path: Path) -> None:
    cfg = parse_config(E.EvalConfig, ["--temperature=0.6,0.65,0.7", "--dynamic_lr=0,1e-5,3e-5", "--mix_ngram=2, 3",
                                      "--ensemble=out/a,out/b,"])
    assert (cfg.temperature, cfg.dynamic_lr, cfg.mix_ngram, cfg.ensemble) == \
        ((0.6, 0.65, 0.7), (0.0, 1e-5, 3e-5), (2, 3), ("out/a", "out/b"))
    assert parse_config(E.EvalConfig, ["--temperature=auto"]).temperature == () == E.EvalConfig().temperature
    (tmp_path / "eval.toml").write_text("temperature = [0.7, 1]\ndynamic_decay = 0.02\n", encoding="utf-8")
    toml = parse_config(E.EvalConfig, [str(tmp_path / "eval.toml")])
    assert (toml.temperature, toml.dynamic_decay) == ((0.7, 1.0), (0.02,))


@pytest.mark.parametrize("arg, says", [("--dynamic_lr=fast", "bad value for 'dynamic_lr'"), ("--split=train", "use val or test"),
                                       ("--stride=1000", "larger than the model's block_size"),
                                       ("--dynamic_lr=-1", "dynamic_lr must be >= 0"),
                                       ("--dynamic_decay=x", "bad value for 'dynamic_decay'"),
                                       ("--dynamic_method=adam", "use sgd or rms"),
                                       ("--mix_ngram=x", "bad value for 'mix_ngram'"),
                                       ("--mix_ngram=12", r"orders must be 1..\d+ for a vocabulary of"),
                                       ("--temperature=hot,cold", "bad value for 'temperature'"),
                                       ("--temperature=0.7,0.9", "choosing a temperature needs prompts"),
                                       ("--two_sample_chars=-5", "two_sample_chars must be >= 0"),
                                       ("--data_dir=/nonexistent", "not found")])
def test_bad_options_are_user_errors(tiny_eval_run: tuple[Path, Path], arg: str, says: str) -> None:
    run, _ = tiny_eval_run
    with pytest.raises(UserError, match=says):
        E.main([f"--out_dir={run}", arg, "--baselines=false", "--num_prompts=0"])
