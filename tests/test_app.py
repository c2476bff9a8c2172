"""app.py: the Gradio page in a real headless Chromium, its API through gradio_client, the run
list and facts, and clear errors. The server is the real `python app.py` on 127.0.0.1."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

import app
from app import find_runs, val_bpb
from conftest import load_model
from bookgpt.config import UserError, parse_config
from conftest import tiny_train_args
from bookgpt.sampling import TEMPERATURE, TOP_K, TOP_P, stream_text
from train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SSR_MODE": "False", "HF_HUB_OFFLINE": "1",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
OWN_TEMPERATURE = 0.35  # the second run's, as evaluate.py --temperature=A,B,... saves it
NEW = 200  # tokens per request: long enough that the stream arrives in several pieces


def require(playwright: bool = False) -> None:
    """Skip, saying why, when gradio (or the browser) is missing here; in CI (CI=true) fail instead."""
    why = []
    if importlib.util.find_spec("gradio") is None:
        why.append("gradio is not installed (pip install -r requirements-app.txt)")
    if playwright and importlib.util.find_spec("playwright") is None:
        why.append("playwright is not installed (pip install -r requirements-dev.txt)")
    if playwright and not Path(CHROMIUM).exists():
        why.append(f"no {CHROMIUM} (apt-get update && apt-get install -y chromium)")
    if why and os.environ.get("CI"):
        pytest.fail("cannot run in CI: " + "; ".join(why))
    if why:
        pytest.skip("; ".join(why))


@pytest.fixture(scope="module")
def runs_dir(tiny_char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("app") / "out"
    train(parse_config(TrainConfig, tiny_train_args(tiny_char_data, root / "tiny", max_iters=20, learning_rate=3e-3)))
    own = Path(shutil.copytree(root / "tiny", root / "tiny_own"))  # the same model with a temperature of its own
    (own / "sampling.json").write_text(json.dumps({"temperature": OWN_TEMPERATURE, "chosen_on": "val"}), encoding="utf-8")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs_dir: Path) -> Iterator[str]:
    """`python app.py` serving the tiny run on a free local port; stopped after the module."""
    require()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, "app.py", f"--out_dir={runs_dir / 'tiny'}", f"--runs_dir={runs_dir}",
                             f"--port={port}", "--device=cpu", "--dtype=float32", f"--max_new_tokens={NEW}"],
                            cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("app.py did not serve its page within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def expected_text(run: Path, prompt: str, n: int, seed: int, temperature: float = TEMPERATURE, top_k: int = TOP_K,
                  top_p: float = TOP_P) -> str:
    """What sample.py's stream_text writes for the same request, in this process (sample.py's defaults)."""
    model, info = load_model(run, "best", "cpu")
    return prompt + "".join(stream_text(model, info["tokenizer"], prompt, n, temperature, top_k, top_p, seed,
                                        dtype="float32"))


# ----------------------------------------------------------------------------- the API

@pytest.mark.slow
def test_api_generates_what_sample_py_generates(server: str, runs_dir: Path) -> None:
    from gradio_client import Client

    client = Client(server, verbose=False)
    run = str(runs_dir / "tiny")
    out = client.predict(run, "Pierre", 40, 0.8, 50, 0.95, 7, api_name="/generate")
    assert out.startswith("Pierre") and len(out) == len("Pierre") + 40  # char model: one token per character
    # the same code, the same seed: the same text
    assert out == expected_text(runs_dir / "tiny", "Pierre", 40, 7, 0.8, 50, 0.95)
    assert client.predict(run, "Pierre", 40, 0.8, 50, 0.95, 8, api_name="/generate") != out


@pytest.mark.slow
def test_api_errors_are_clear_messages(server: str, runs_dir: Path) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    run = str(runs_dir / "tiny")
    cases = [(("", 40, 1), "prompt is empty"),
             (("Пьер", 40, 1), "characters the char tokenizer does not know"),
             (("Pierre", 10**9, 1), "2000"),  # over the page's limit (gradio's own range check says so)
             (("Pierre", 40, None), "whole number")]
    for (prompt, n, seed), message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(run, prompt, n, 0.8, 50, 0.95, seed, api_name="/generate")
    with pytest.raises(AppError):  # only runs the page lists may be loaded
        client.predict("/etc", "Pierre", 40, 0.8, 50, 0.95, 1, api_name="/generate")


# ----------------------------------------------------------------------------- the page in a browser

@pytest.mark.slow
def test_page_in_headless_chromium(server: str, runs_dir: Path, tmp_path: Path) -> None:
    require(playwright=True)
    from playwright.sync_api import expect, sync_playwright

    prompt, outside = "Prince Andrew", []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})

            def only_local(route) -> None:  # the page must work offline: block and record anything else
                if route.request.url.startswith(server):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(server)
            expect(page.locator("#facts")).to_contain_text("tokenizer: char")
            expect(page.locator("#facts")).to_contain_text("val bits per byte: ")
            page.get_by_role("button", name="Pierre Bezukhov").click()  # an example fills the prompt
            expect(page.locator("#prompt textarea")).to_have_value("Pierre Bezukhov")

            page.locator("#prompt textarea").fill(prompt)
            output, seed = page.locator("#output textarea"), page.get_by_label("Seed", exact=False)
            # Record the output's length every few milliseconds, to see the text arrive in pieces; a busy
            # machine may hand the browser every piece at once, so up to three tries, each with its own seed.
            page.evaluate("""() => { window.lengths = [];
                setInterval(() => window.lengths.push(document.querySelector('#output textarea').value.length), 5); }""")
            for try_seed in (1, 2, 3):
                seed.fill(str(try_seed))
                page.evaluate("() => { window.lengths = []; }")
                page.locator("#generate").click()
                # the sliders start at sample.py's defaults, so the page writes what sample.py writes
                expect(output).to_have_value(expected_text(runs_dir / "tiny", prompt, NEW, try_seed), timeout=60_000)
                text, lengths = output.input_value(), page.evaluate("window.lengths")
                assert text.startswith(prompt) and len(text) == len(prompt) + NEW
                if any(0 < n < len(text) for n in lengths):
                    break
            assert any(0 < n < len(text) for n in lengths), "the text arrived all at once, three times: not streamed"
            seed.fill("1")
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

            # another run with a temperature of its own: the slider moves to it, and the page samples at it
            temperature = page.locator("#temperature input[type=number]")
            expect(temperature).to_have_value("0.9")
            page.get_by_role("combobox", name="Run").click()
            page.get_by_role("option", name=str(runs_dir / "tiny_own")).click()
            expect(temperature).to_have_value(str(OWN_TEMPERATURE))
            page.locator("#generate").click()
            expect(output).to_have_value(expected_text(runs_dir / "tiny_own", prompt, NEW, 1, OWN_TEMPERATURE),
                                         timeout=60_000)

            page.locator("#prompt textarea").fill("")  # a bad request shows a message in the page
            page.locator("#generate").click()
            expect(page.get_by_text("The prompt is empty").first).to_be_visible(timeout=20_000)
        finally:
            browser.close()
    assert outside == [], f"the page tried to reach the internet: {outside}"
    shot = (tmp_path / "demo.png").read_bytes()
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000


# ----------------------------------------------------------------------------- runs, facts, command line

def test_find_runs_lists_folders_with_a_checkpoint(tmp_path: Path) -> None:
    for rel in ("a/best.pt", "a/ckpt.pt", "b/sweep/x/ckpt.pt", "c/config.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "best.pt").write_bytes(b"")
    assert find_runs(tmp_path / "a", elsewhere) == sorted([str(tmp_path / "a"), str(elsewhere)])
    assert find_runs(tmp_path) == [str(tmp_path / "a"), str(tmp_path / "b/sweep/x"), str(elsewhere)]
    assert find_runs(tmp_path / "missing") == []


def test_val_bpb_prefers_evaluate_then_training_metrics(tmp_path: Path) -> None:
    assert val_bpb(tmp_path).startswith("unknown")
    lines = [{"kind": "train", "iter": 1, "loss": 4.0}, {"kind": "eval", "iter": 10, "val_loss": 2.0, "val_bpb": 2.5},
             {"kind": "eval", "iter": 20, "val_loss": 1.9, "val_bpb": 2.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert val_bpb(tmp_path).startswith("2.2500 (training's estimate")  # no summary yet: the best eval so far
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "summary", "iter": 20, "best_val_bpb": 2.125}) + "\n")
    assert val_bpb(tmp_path).startswith("2.1250 (training's estimate")
    (tmp_path / "eval.json").write_text(json.dumps({"likelihood": {"bpb": 2.0}, "data": {"split": "val"},
                                                     "run": {"checkpoint": "best.pt"}}))
    assert val_bpb(tmp_path) == "2.0000 (evaluate.py, full pass over the val split, best.pt)"


def test_runs_load_once_and_again_when_the_checkpoint_changes(runs_dir: Path) -> None:
    run = str(runs_dir / "tiny")
    runs = app.Runs(app.AppConfig(out_dir=run, runs_dir=str(runs_dir), device="cpu"))
    model, info = runs.get(run)
    assert runs.get(run)[0] is model and info["tokenizer"].kind == "char"
    best = runs_dir / "tiny" / "best.pt"
    st = best.stat()
    os.utime(best, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as if training saved a new best
    assert runs.get(run)[0] is not model
    with pytest.raises(UserError, match="unknown run"):
        runs.get(str(runs_dir))  # only folders with a checkpoint


@pytest.mark.parametrize("args, message", [
    (["--out_dir=does/not/exist"], "run directory not found"),
    (["--port=70000"], "port must be between"),
    (["--max_tokens_limit=0"], "max_tokens_limit must be between"),
    (["--concurrency=0"], "at least 1"),
    (["--prot=1"], "did you mean port"),
])
def test_bad_settings_are_user_errors(args: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        app.main(args)


@pytest.mark.slow
def test_command_line_error_is_one_line_and_status_2(runs_dir: Path) -> None:
    r = subprocess.run([sys.executable, "app.py", f"--out_dir={runs_dir / 'tiny'}", "--ckpt=newest"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV})
    assert r.returncode == 2
    assert r.stderr == "error: unknown checkpoint 'newest': use best, latest, ema\n"


@pytest.mark.slow
def test_a_port_in_use_is_one_clear_line_and_status_2(runs_dir: Path) -> None:
    """Gradio's own failure is a traceback that points at GRADIO_SERVER_PORT, not at --port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}: port {port} is in use; pass --port=N"):
            app.check_port("127.0.0.1", port)
        r = subprocess.run([sys.executable, "app.py", f"--out_dir={runs_dir / 'tiny'}", f"--port={port}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV})
    assert r.returncode == 2
    assert r.stderr == f"error: cannot listen on 127.0.0.1:{port}: port {port} is in use; pass --port=N with a free port\n"
    app.check_port("127.0.0.1", port)  # released: free again
    with pytest.raises(UserError, match="is not an address of this machine; pass --port=N with a free port or --host=127.0.0.1"):
        app.check_port("203.0.113.7", 8080)  # TEST-NET-3: never this machine's
