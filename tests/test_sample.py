"""sample.py: the requested number of samples, seeds, streaming of partial UTF-8, clear errors."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_model
from bookgpt.config import parse_config
from conftest import tiny_train_args
from bookgpt.sampling import stream_text, utf8_guard
from model import GPTConfig
from train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tiny_char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "run"
    train(parse_config(TrainConfig, tiny_train_args(tiny_char_data, out, max_iters=30, learning_rate=3e-3)))
    return out


def sample(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", f"--out_dir={run}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_number_of_samples_and_seed(tiny_run: Path) -> None:
    a = sample(tiny_run, "--prompt=Pierre", "--num_samples=3", "--max_new_tokens=40", "--seed=7")
    assert a.returncode == 0, a.stderr
    parts = a.stdout.split("---------- sample ")[1:]
    assert len(parts) == 3
    for i, part in enumerate(parts, 1):
        head, body = part.split("\n", 1)
        assert head == f"{i} of 3"
        assert body.startswith("Pierre") and len(body.rstrip("\n")) == len("Pierre") + 40  # char model: 1 token = 1 char
    again = sample(tiny_run, "--prompt=Pierre", "--num_samples=3", "--max_new_tokens=40", "--seed=7")
    other = sample(tiny_run, "--prompt=Pierre", "--num_samples=3", "--max_new_tokens=40", "--seed=8")
    assert again.stdout == a.stdout
    assert other.stdout != a.stdout


@pytest.mark.slow
def test_greedy_is_deterministic_whatever_the_seed(tiny_run: Path) -> None:
    outs = {sample(tiny_run, "--prompt=The ", "--num_samples=1", "--max_new_tokens=20", "--temperature=0",
                   f"--seed={s}").stdout for s in (1, 2)}
    assert len(outs) == 1


@pytest.mark.slow
def test_prompt_file_and_latest_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    f = tmp_path / "prompt.txt"
    f.write_text("Natasha said,", encoding="utf-8")
    r = sample(tiny_run, f"--prompt_file={f}", "--num_samples=1", "--max_new_tokens=5", "--ckpt=latest")
    assert r.returncode == 0 and "Natasha said," in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--prompt=Pierre \u20ac\u2603"], "'\u20ac', '\u2603'"),
    (["--prompt="], "the prompt is empty"),
    (["--max_new_tokens=0"], "max_new_tokens must be between 1"),
    (["--max_new_tokens=100000000"], "max_new_tokens must be between 1"),
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--top_p=0"], "top_p must be in"),
    (["--prompt_file=/nonexistent/p.txt"], "prompt file not found"),
    (["--ckpt=newest"], "unknown checkpoint 'newest'"),
])
@pytest.mark.slow
def test_bad_requests_are_one_clear_line(tiny_run: Path, args: list[str], message: str) -> None:
    r = sample(tiny_run, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


@pytest.mark.slow
def test_missing_run_directory(tmp_path: Path) -> None:
    r = sample(tmp_path / "nope")
    assert r.returncode == 2 and "run directory not found" in r.stderr


def test_stream_joins_to_the_generated_text(tiny_run: Path) -> None:
    model, info = load_model(tiny_run)
    tok = info["tokenizer"]
    pieces = list(stream_text(model, tok, "Prince", max_new_tokens=25, seed=3))  # sample.py's defaults
    ids = model.generate(torch.tensor([tok.encode("Prince")]), 25, temperature=0.9, top_k=None, top_p=None,
                         generator=torch.Generator().manual_seed(3))
    assert "".join(pieces) == tok.decode(ids[0, 6:].tolist())


class SplitUTF8:
    """A stand-in tokenizer whose tokens are single bytes, so characters arrive in pieces."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(ids)


def test_stream_holds_back_partial_utf8_characters() -> None:
    # a model forced to emit the bytes of "é" (0xC3 0xA9) one token at a time
    class Scripted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = GPTConfig(vocab_size=256)
            self.script = [0xC3, 0xA9, ord("!")]

        def generate_stream(self, idx, n, *args, **kwargs):
            for t in self.script[:n]:
                yield torch.tensor([t])

    pieces = list(stream_text(Scripted(), SplitUTF8(), "x", max_new_tokens=3, temperature=0))
    assert pieces == ["é", "!"]


def test_stream_keeps_autocast_when_another_thread_advances_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio runs each step of a streamed answer on a worker thread, and autocast's state is per thread. With
    the layout a GPU samples with (no CPU-only weight copies), a step run without autocast meets the bf16 KV
    cache with float32 weights and fails; stream_text enters autocast for every step."""
    from concurrent.futures import ThreadPoolExecutor

    from model import GPT
    monkeypatch.setattr(GPT, "sampling_weights", lambda self: contextlib.nullcontext())  # as on CUDA
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0)).eval()
    stream = stream_text(model, SplitUTF8(), "Prince", max_new_tokens=12, temperature=0, dtype="bfloat16")
    pieces = [next(stream)]  # the prefill, on this thread: it makes the cache in bf16
    with ThreadPoolExecutor(max_workers=1) as pool:
        while (piece := pool.submit(next, stream, None).result()) is not None:
            pieces.append(piece)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same tokens as one thread gives
        want = model.generate(torch.tensor([list(b"Prince")]), 12, temperature=0, allowed=utf8_guard(SplitUTF8(), 256))
    assert "".join(pieces) == bytes(want[0, 6:].tolist()).decode("utf-8")
