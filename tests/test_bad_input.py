"""Bad input: every mistake a user can make ends in one `error: ...` line on stderr, exit
status 2, and no half-written file. The scripts' `main` run in-process through config.cli,
exactly as `python train.py ...` runs them, minus the interpreter start.

Happy paths and the errors already checked elsewhere (mistyped config keys: test_config.py;
unknown prompt characters, empty prompt, max_new_tokens, temperature < 0, top_p: test_sample.py;
prepare.py's inputs: test_prepare.py) are not repeated here.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepare
import sample
from bookgpt.sampling import stream_text
import train
from bookgpt.checkpoint import load_checkpoint
from bookgpt.config import UserError, cli, parse_config
from conftest import load_model, tiny_train_args
from bookgpt.tokenizer import load_tokenizer


def tiny(data: Path, out: Path, **kw) -> list[str]:
    return tiny_train_args(data, out, **{"n_layer": 1, "threads": 1, **kw})


@pytest.fixture
def error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., str]:
    """Run a script's main(argv) under config.cli; assert exit status 2 and one error line; return it."""

    def run(main: Callable[[list[str]], object], *argv: str) -> str:
        monkeypatch.setattr(sys, "argv", ["script.py", *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli(main)
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("warning: ")]
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    return run


@pytest.fixture(scope="module")
def run_dir(tiny_char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (read-only for the tests: copy it before breaking it)."""
    out = tmp_path_factory.mktemp("bad_input") / "run"
    train.train(parse_config(train.TrainConfig, tiny(tiny_char_data, out, max_iters=10, eval_interval=5)))
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def byte_data(tiny_char_data: Path, root: Path) -> Path:
    """The same text as tiny_char_data, hand-written as a byte-level data folder (vocab 256)."""
    char = load_tokenizer(tiny_char_data)
    meta = json.loads((tiny_char_data / "meta.json").read_text())
    texts = {s: char.decode(np.fromfile(tiny_char_data / f"{s}.bin", dtype=np.uint8)) for s in meta["splits"]}
    parts = {s: t.encode() for s, t in texts.items()}
    root.mkdir(parents=True)
    for s, raw in parts.items():
        (root / f"{s}.bin").write_bytes(raw)
    byte_meta = {"tokenizer": {"kind": "byte"}, "vocab_size": 256, "dtype": "uint8",
                 "sha256_clean": hashlib.sha256(prepare.join_blocks(texts, meta["layout"]).encode()).hexdigest(),
                 "fractions": meta["fractions"], "layout": meta["layout"],
                 "splits": {s: {"tokens": len(raw), "chars": len(raw.decode()), "bytes": len(raw)}
                            for s, raw in parts.items()}}
    assert byte_meta["sha256_clean"] == meta["sha256_clean"]  # same book, other tokenizer
    (root / "meta.json").write_text(json.dumps(byte_meta))
    return root


# ----------------------------------------------------------------------------- train.py

def test_train_missing_data_dir(error_line, tiny_char_data: Path, tmp_path: Path) -> None:
    line = error_line(train.main, *tiny(tmp_path / "nope", tmp_path / "out"))
    assert "meta.json" in line and str(tmp_path / "nope") in line and "python prepare.py" in line, line
    assert not (tmp_path / "out").exists()
    # the hint matches the folder's name: the BPE vocabulary it implies ...
    line = error_line(train.main, *tiny(tmp_path / "data" / "war_and_peace_bpe4096", tmp_path / "out"))
    assert line.endswith("prepare the data first: python prepare.py --vocab_size=4096 "
                         f"--out_dir={tmp_path / 'data' / 'war_and_peace_bpe4096'}"), line
    # ... or a prepared folder beside it that was meant
    shutil.copytree(tiny_char_data, tmp_path / "data" / "war_and_peace_char")
    line = error_line(train.main, *tiny(tmp_path / "data" / "war_and_peace_chr", tmp_path / "out"))
    assert line.endswith(f"did you mean --data_dir={tmp_path / 'data' / 'war_and_peace_char'}? (it is prepared)"), line


@pytest.mark.parametrize("damage, message", [
    ("no val.bin", "val.bin is missing; run prepare.py again"),
    ("truncated meta.json", "meta.json is corrupt ("),
    ("meta.json without dtype", "dtype"),
])
def test_train_damaged_data_dir(error_line, tiny_char_data: Path, tmp_path: Path, damage: str, message: str) -> None:
    data = Path(shutil.copytree(tiny_char_data, tmp_path / "data"))
    meta = (data / "meta.json").read_text()
    if damage == "no val.bin":
        (data / "val.bin").unlink()
    elif damage == "truncated meta.json":
        (data / "meta.json").write_text(meta[: len(meta) // 2])
    else:
        (data / "meta.json").write_text(json.dumps({k: v for k, v in json.loads(meta).items() if k != "dtype"}))
    line = error_line(train.main, *tiny(data, tmp_path / "out"))
    assert message in line and "prepare.py" in line, line
    assert not (tmp_path / "out").exists()


def test_train_block_size_larger_than_the_val_split(error_line, tiny_char_data: Path, tmp_path: Path) -> None:
    val_tokens = json.loads((tiny_char_data / "meta.json").read_text())["splits"]["val"]["tokens"]
    line = error_line(train.main, *tiny(tiny_char_data, tmp_path / "out", block_size=val_tokens))
    assert line == (f"error: {tiny_char_data / 'val.bin'} has {val_tokens} tokens, not more than "
                    f"block_size={val_tokens}; use a smaller block_size or a bigger split")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_train_resume_without_a_checkpoint(error_line, tiny_char_data: Path, tmp_path: Path) -> None:
    line = error_line(train.main, *tiny(tiny_char_data, tmp_path / "out", init_from="resume"))
    assert line.startswith(f"error: no checkpoint at {tmp_path / 'out' / 'ckpt.pt'}: train first")


def test_train_resume_from_a_truncated_checkpoint(error_line, tiny_char_data: Path, run_dir: Path,
                                                  tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path)
    data = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(data[: len(data) // 2])
    line = error_line(train.main, *tiny(tiny_char_data, run, init_from="resume", max_iters=20))
    assert line.startswith(f"error: {run / 'ckpt.pt'} is corrupt or truncated (")
    assert (run / "ckpt.pt").read_bytes() == data[: len(data) // 2]  # left for the user to inspect


@pytest.mark.parametrize("change, message", [
    ({"n_embd": 48}, "the model differs (n_embd: checkpoint 32 vs now 48); use the run's config"),
    ({"n_layer": 2, "mlp": "swiglu"}, "the model differs (n_layer: checkpoint 1 vs now 2, mlp: checkpoint 'relu2' "
                                      "vs now 'swiglu')"),
    ({"optimizer": "adamw"}, "it was trained with optimizer=muon, not adamw; pass --optimizer=muon"),
])
def test_train_resume_with_an_incompatible_config(error_line, tiny_char_data: Path, run_dir: Path, tmp_path: Path,
                                                  change: dict, message: str) -> None:
    run = copy_run(run_dir, tmp_path)
    before = (run / "ckpt.pt").read_bytes(), (run / "metrics.jsonl").read_bytes()
    line = error_line(train.main, *tiny(tiny_char_data, run, init_from="resume", max_iters=20, **change))
    assert line.startswith(f"error: cannot resume from {run / 'ckpt.pt'}: ") and message in line
    assert ((run / "ckpt.pt").read_bytes(), (run / "metrics.jsonl").read_bytes()) == before


def test_train_resume_on_other_data(error_line, tiny_char_data: Path, run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path)
    other = byte_data(tiny_char_data, tmp_path / "bytes")
    line = error_line(train.main, *tiny(other, run, init_from="resume", max_iters=20))
    assert line == (f"error: cannot resume from {run / 'ckpt.pt'}: it was trained on other data than data_dir "
                    f"(vocab 94 vs 256); pass the run's --data_dir")


def test_a_folder_prepared_before_the_test_split_still_trains_and_evaluates(book_text: str, tmp_path: Path) -> None:
    """Older prepare.py wrote a tail split (val the last 10%, no test) and no layout in meta.json."""
    import evaluate

    src = tmp_path / "book.txt"
    src.write_text(book_text[:200_000], encoding="utf-8")
    data = tmp_path / "old"
    prepare.prepare(prepare.PrepareConfig(input=str(src), out_dir=str(data), split_layout="tail",
                                          val_fraction=0.1, test_fraction=0.0))
    meta = json.loads((data / "meta.json").read_text())
    del meta["layout"]
    (data / "meta.json").write_text(json.dumps(meta))
    run = tmp_path / "run"
    train.train(parse_config(train.TrainConfig, tiny(data, run, max_iters=4, eval_interval=2)))
    train.train(parse_config(train.TrainConfig, tiny(data, run, max_iters=6, eval_interval=2, init_from="resume")))
    with pytest.raises(UserError, match="no test split in .*; prepare.py writes one by default"):
        evaluate.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false"])
    ev = evaluate.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--split=val"])
    assert ev["likelihood"]["tokens"] == meta["splits"]["val"]["tokens"] - 1


def test_hand_made_byte_data_trains(tiny_char_data: Path, tmp_path: Path) -> None:
    # the byte folder above is a real data folder: train.py and the byte tokenizer accept it
    data = byte_data(tiny_char_data, tmp_path / "bytes")
    summary = train.train(parse_config(train.TrainConfig, tiny(data, tmp_path / "out", max_iters=2, eval_interval=2)))
    assert summary["iter"] == 2 and load_checkpoint(tmp_path / "out" / "ckpt.pt")["meta"]["vocab_size"] == 256


# ----------------------------------------------------------------------------- checkpoints (sample.py, app.py, evaluate.py)

@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "zip with a missing member"])
def test_corrupt_checkpoint(error_line, run_dir: Path, tmp_path: Path, damage: str) -> None:
    run = copy_run(run_dir, tmp_path)
    data = (run / "best.pt").read_bytes()
    broken = {"truncated": data[: len(data) * 2 // 3], "empty": b"",
              "random bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
              "zip with a missing member": data.replace(b"data/0", b"data/X")}[damage]
    (run / "best.pt").write_bytes(broken)
    line = error_line(sample.main, f"--out_dir={run}", "--max_new_tokens=5")
    if damage == "random bytes":  # happen to start like a pickle, which the safe unpickler refuses
        assert line == f"error: {run / 'best.pt'} is not a bookgpt checkpoint and was not loaded " \
                       f"(safe loading: Unsupported operand 95)"
    else:
        why = {"truncated": "RuntimeError", "empty": "EOFError", "zip with a missing member": "RuntimeError"}[damage]
        assert line == (f"error: {run / 'best.pt'} is corrupt or truncated ({why}); "
                        f"use the other checkpoint (--ckpt=best/latest) or train again")
    load_model(run, "latest")  # the other one still works


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["plain pickle", "torch zip"])
def test_a_malicious_pickle_is_refused_without_running_it(error_line, run_dir: Path, tmp_path: Path,
                                                          container: str) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"format": "bookgpt", "version": 1, "model": Payload(marker)}, protocol=2)
    pickle.loads(payload)  # the payload is live: an unsafe load would run it ...
    assert marker.exists()
    marker.unlink()
    run = copy_run(run_dir, tmp_path)
    if container == "plain pickle":
        (run / "best.pt").write_bytes(payload)
    else:
        torch.save({"format": "bookgpt", "version": 1, "model": Payload(marker)}, run / "best.pt")
    line = error_line(sample.main, f"--out_dir={run}")
    assert line.startswith(f"error: {run / 'best.pt'} is not a bookgpt checkpoint and was not loaded (safe loading: ")
    assert "posix.system" in line or "Unsupported" in line, line
    assert not marker.exists()  # ... the safe load did not


@pytest.mark.parametrize("edit, message", [
    (lambda ck: {"model": ck["model"], "model_args": ck["model_config"], "iter_num": 10}, "is not a bookgpt checkpoint"),
    (lambda ck: {**ck, "version": 2}, "has checkpoint version 2, this code reads 1"),
    (lambda ck: {**ck, "model": {k: v for k, v in ck["model"].items() if "mlp" not in k}},
     "does not match this version of model.py: Error(s) in loading state_dict for GPT"),
    (lambda ck: {**ck, "model_config": {**ck["model_config"], "n_heads": 2}}, "does not match this version of model.py"),
    (lambda ck: {**ck, "meta": {**ck["meta"], "tokenizer": {"kind": "morse"}}}, "unknown tokenizer kind 'morse'"),
])
def test_checkpoints_that_are_not_ours_or_not_this_version(error_line, run_dir: Path, tmp_path: Path,
                                                           edit: Callable[[dict], dict], message: str) -> None:
    run = copy_run(run_dir, tmp_path)
    torch.save(edit(load_checkpoint(run / "best.pt")), run / "best.pt")  # nanoGPT's layout, a newer schema, ...
    line = error_line(sample.main, f"--out_dir={run}")
    assert line.startswith("error: ") and message in line


# ----------------------------------------------------------------------------- sample.py requests

@pytest.mark.parametrize("args, message", [
    (["--num_samples=0"], "num_samples must be at least 1, got 0"),
    (["--top_k=-1"], "top_k must be >= 0 (0 = off), got -1"),
    (["--top_p=1.5"], "top_p must be in (0, 1] (1 = off), got 1.5"),
    (["--temperature=-0.1"], "temperature must be >= 0 (0 = greedy), got -0.1"),
    (["--temperature=hot"], "bad value for 'temperature': 'hot'; use a number such as 0.8 (0 = greedy) or auto"),
    (["--max_new_tokens=-5"], "max_new_tokens must be between 1 and 100,000, got -5"),
    (["--device=tpu"], "unknown device 'tpu'"),
    (["--ckpt=final"], "unknown checkpoint 'final': use best, latest, ema"),
    (["--ckpt=ema"], "ema.pt: only runs trained with --ema_decay have one; use --ckpt=best or --ckpt=latest"),
])
def test_sample_bad_requests(error_line, run_dir: Path, args: list[str], message: str) -> None:
    assert message in error_line(sample.main, f"--out_dir={run_dir}", *args)


@pytest.mark.parametrize("content", ["{not json", '{"temperature": "hot"}', '{"temperature": -1}', "{}"])
def test_a_damaged_sampling_file_is_one_clear_line(error_line, run_dir: Path, tmp_path: Path, content: str) -> None:
    run = copy_run(run_dir, tmp_path)
    (run / "sampling.json").write_text(content, encoding="utf-8")
    line = error_line(sample.main, f"--out_dir={run}")
    assert line.startswith("error: ") and str(run / "sampling.json") in line and "delete it" in line
    sample.main([f"--out_dir={run}", "--temperature=0.5", "--max_new_tokens=3"])  # a number given: the file is not read


@pytest.mark.parametrize("content, message", [
    (b"Pierre \xe9tait", "is not UTF-8 text"),
    (None, "prompt file not found"),
    ("dir", "is a folder, not a file"),
])
def test_sample_bad_prompt_files(error_line, run_dir: Path, tmp_path: Path, content, message: str) -> None:
    f = tmp_path / "prompt.txt"
    if content == "dir":
        f.mkdir()
    elif content is not None:
        f.write_bytes(content)
    assert message in error_line(sample.main, f"--out_dir={run_dir}", f"--prompt_file={f}")


def test_temperature_zero_is_greedy_and_a_huge_top_k_is_off(run_dir: Path) -> None:
    model, info = load_model(run_dir)
    tok = info["tokenizer"]
    ids = tok.encode("Prince ")
    for _ in range(12):  # argmax by hand, recomputing the whole context
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    greedy = "".join(stream_text(model, tok, "Prince ", max_new_tokens=12, temperature=0, seed=5))
    assert greedy == tok.decode(ids[len("Prince "):])
    # top_k beyond the vocabulary means "all tokens", not an error
    assert len("".join(stream_text(model, tok, "Prince ", max_new_tokens=12, top_k=10**6))) == 12


# ----------------------------------------------------------------------------- prepare.py (what test_prepare.py leaves out)

@pytest.mark.parametrize("content, message", [
    ("dir", "input file is a folder, not a file: "),
    ("War and Peace\n".encode("utf-16") * 20, "looks binary (it contains NUL bytes); expected a plain-text book "
                                              "(a UTF-16 file? convert it: iconv -f utf-16 -t utf-8 IN > OUT)"),
    (b" \n\t\r\n" * 100, "is empty"),
])
def test_prepare_more_bad_files(error_line, tmp_path: Path, content, message: str) -> None:
    book = tmp_path / "book.txt"
    if content == "dir":
        book.mkdir()
    else:
        book.write_bytes(content)
    line = error_line(prepare.main, f"--input={book}", f"--out_dir={tmp_path / 'out'}")
    assert message in line
    assert not (tmp_path / "out").exists()


@pytest.fixture
def local_server() -> Iterator[str]:
    """http://127.0.0.1:PORT: /silent accepts the connection and never answers, anything else is a 404."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/silent":
                time.sleep(3)  # longer than the client's timeout
                return
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path, message", [
    ("/pg2600.txt", "failed (HTTP 404); download it yourself and pass --input=path/to/book.txt"),
    ("/silent", "timed out after 0.5s; download it yourself and pass --input=path/to/book.txt"),
])
def test_prepare_download_errors_from_a_real_local_server(error_line, local_server: str, tmp_path: Path,
                                                          path: str, message: str) -> None:
    line = error_line(prepare.main, f"--input={local_server}{path}", f"--out_dir={tmp_path / 'out'}",
                      f"--raw_dir={tmp_path / 'raw'}", "--timeout=0.5")
    assert line == f"error: download of {local_server}{path} {message}"
    assert not (tmp_path / "out").exists() and not any((tmp_path / "raw").glob("*"))  # no partial download


# ----------------------------------------------------------------------------- fuzzing: any bytes, one clear error

@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_to_text_or_a_user_error(raw: bytes) -> None:
    try:
        text = prepare.decode_text(raw)
    except UserError:
        return
    assert text.encode("utf-8") == raw and raw.strip() and b"\0" not in raw


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
                        max_size=40), max_size=40),
       st.floats(0.05, 0.5), st.sampled_from([0.0, 0.1]))
def test_splits_are_whole_lines_or_a_user_error(lines: list[str], val: float, test: float) -> None:
    text = "".join(l + "\n" for l in lines)
    try:
        splits = prepare.split_text(text, val, test)
    except UserError as e:
        assert "too short" in str(e)
        return
    assert "".join(splits.values()) == text
    assert all(part.endswith("\n") and len(part) >= prepare.MIN_SPLIT_CHARS for part in splits.values())
    try:
        blocks, layout = prepare.split_blocks(text, val, test or 0.05, 0.05)
    except UserError as e:
        assert "too short" in str(e)
        return
    assert prepare.join_blocks(blocks, layout) == text
    assert all(part.endswith("\n") and len(part) >= prepare.MIN_SPLIT_CHARS for part in blocks.values())


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600) | st.sampled_from([b"PK\x03\x04", b"\x80\x02}q\x00.", b"\x80\x02"]))
def test_any_bytes_as_a_checkpoint_are_a_user_error(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "best.pt"
    path.write_bytes(raw)
    try:
        ck = load_checkpoint(path)
    except UserError as e:
        assert str(e).startswith(str(path))
        return
    raise AssertionError(f"loaded a checkpoint from {raw!r}: {ck!r}")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=60) | st.builds(json.dumps, st.dictionaries(
    st.sampled_from(["kind", "iter", "loss"]), st.integers(-3, 12) | st.sampled_from(["train", "eval", "summary"])))),
    st.integers(0, 10))
def test_resume_reads_any_metrics_file(tmp_path_factory: pytest.TempPathFactory, lines: list[str], it: int) -> None:
    path = tmp_path_factory.mktemp("metrics") / "metrics.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    train.Metrics(path, resume_iter=it)
    kept = [json.loads(l) for l in path.read_text().splitlines()]
    assert all(isinstance(r, dict) and r["iter"] <= it and r.get("kind") != "summary" for r in kept)
