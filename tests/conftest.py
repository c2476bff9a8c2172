"""Shared test fixtures. Tests read the book and GPT-2's BPE files from where tests/testdata.py finds them
(../shared beside the repo in CI; `make test` fetches them once elsewhere) and never touch the internet."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

import testdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # import the flat modules (config, tokenizer, ...) from any cwd

# Property tests check behaviour, not speed: no per-example deadline, which a busy 2-core machine misses.
settings.register_profile("bookgpt", deadline=None)
settings.load_profile("bookgpt")


def _need(path: Path | None, what: str) -> Path:
    if path is None or not path.exists():
        pytest.fail(f"{what} is missing: {testdata.WHAT_TO_DO} (python tests/testdata.py fetches them)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def book_path() -> Path:
    """The Gutenberg file of War and Peace, exactly as prepare.py would download it."""
    return _need(testdata.book(), "War and Peace (pg2600.txt)")


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    return _need(testdata.gpt2_dir(), "GPT-2's BPE files")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the internet: GPT-2 loads from ../shared, and sockets may only reach this machine."""
    if testdata.gpt2_dir():
        monkeypatch.setenv("BOOKGPT_GPT2_DIR", str(testdata.gpt2_dir()))
    # subprocesses (train.py, sample.py, torchrun) run tiny models: one thread each is fastest
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local = {None, "", "localhost", "127.0.0.1", "::1", socket.gethostname()}
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and address[0] not in local:
            raise OSError(f"tests must not use the network (tried to connect to {address})")
        return real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if (host.decode() if isinstance(host, bytes) else host) not in local:
            raise socket.gaierror(f"tests must not use the network (tried to look up {host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="session")
def tiny_char_data(tmp_path_factory: pytest.TempPathFactory, book_path: Path) -> Path:
    """A char-level dataset of the book's first ~200k characters, prepared by prepare.py
    (session-wide: tests that train read it, none write to it)."""
    from prepare import PrepareConfig, clean_text, decode_text, prepare

    text, _ = clean_text(decode_text(book_path.read_bytes()))
    root = tmp_path_factory.mktemp("tiny_char")
    src = root / "book_slice.txt"
    src.write_text(text[:200_000], encoding="utf-8")
    prepare(PrepareConfig(tokenizer="char", input=str(src), out_dir=str(root / "data")))
    return root / "data"


def tiny_train_args(data_dir: Path, out_dir: Path, **overrides) -> list[str]:
    """Command-line arguments for a seconds-long train.py run of a tiny model."""
    args = {"data_dir": data_dir, "out_dir": out_dir, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
            "batch_size": 4, "max_iters": 20, "eval_interval": 10, "eval_iters": 2, "log_interval": 1,
            "warmup_iters": 2, "dtype": "float32", "device": "cpu", "dropout": 0.0, "threads": 1, "compile": False,
            "value_embeds": 0, "unet_skips": False, "zero_init": False,  # the defaults' levers need 6 layers
            **overrides}  # one thread: tiny matmuls only lose time to threading; compiling would take longer than the run
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def book_text(book_path: Path) -> str:
    """The cleaned text of the whole book (prepare.py's cleaning)."""
    from prepare import clean_text, decode_text

    return clean_text(decode_text(book_path.read_bytes()))[0]


def load_model(out_dir: Path | str, which: str = "best", device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """A trained run's model (eval mode, on device) and info, as sample.py loads them."""
    from bookgpt.checkpoint import load_run
    from model import GPT

    ckpt, info = load_run(out_dir, which)
    return GPT.from_checkpoint(ckpt, info["path"], device), info


@pytest.fixture
def old_run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A run folder in the layout the code before the bookgpt/ package wrote (tests/old_run.py), and what that
    code computed from it (expected.json): the last logits and a sample for a prompt, the losses of a resume."""
    from old_run import FIXTURE, make_old_run

    return make_old_run(tmp_path), json.loads((FIXTURE / "expected.json").read_text())
