"""A Gradio page to generate text from a trained run, streamed token by token.

    pip install -r requirements-app.txt
    python app.py --out_dir=out/wp_bpe_cpu [--host=127.0.0.1] [--port=7860]

The page offers every run found under --runs_dir (any folder with best.pt or ckpt.pt), shows its
facts (parameters, tokenizer, held-out bits per byte), and samples with sample.py's own code.
Requests wait in a queue and run --concurrency at a time. The page works offline: no analytics,
no version check, no share link, no web fonts.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bookgpt.checkpoint import FILES, checkpoint_path, load_run, newest_run
from bookgpt.common import read_metrics, records_of, resolve_device, resolve_dtype
from bookgpt.config import UserError, cli, opt, parse_config
from bookgpt.sampling import MAX_NEW_TOKENS, TOP_K, TOP_P, check_sampling, encode_prompt, run_temperature, stream_text
from model import GPT

MAX_PROMPT_CHARS = 20_000  # longer is a paste accident; the model only sees its last block_size tokens anyway
# Openings of passages of War and Peace (Maude translation, Gutenberg #2600).
EXAMPLES = ["Well, Prince, so Genoa and Lucca are now just family estates of the Buonapartes.",
            "Prince Andrew looked at the sky and", "Natasha ran into the drawing room,", "Pierre Bezukhov",
            "The French army"]


@dataclass
class AppConfig:
    out_dir: str = opt("", "run shown first (a directory written by train.py; '' = the newest run under out/)")
    runs_dir: str = opt("out", "other runs offered on the page: folders under here with best.pt or ckpt.pt")
    ckpt: str = opt("best", "best (lowest val loss), latest, or ema (the weight average at its lowest val "
                                     "loss: runs trained with --ema_decay)")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 to share on the network)")
    port: int = opt(7860, "port to listen on")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16")
    max_new_tokens: int = opt(300, "the length slider's starting value")
    max_tokens_limit: int = opt(2000, "the longest generation one request may ask for")
    concurrency: int = opt(1, "requests generated at the same time; the others wait in the queue")
    queue_size: int = opt(32, "requests allowed to wait; more are turned away with a message")


def find_runs(runs_dir: str | Path, *extra: str | Path) -> list[str]:
    """Every folder under runs_dir (and the extra ones) holding a checkpoint, sorted, as strings."""
    found = {str(Path(p)) for p in extra if any((Path(p) / f).is_file() for f in FILES.values())}
    root = Path(runs_dir)
    if root.is_dir():
        found |= {str(ck.parent) for name in FILES.values() for ck in root.rglob(name)}
    return sorted(found)


def val_bpb(out_dir: Path) -> str:
    """The run's held-out bits per byte: evaluate.py's full pass if it ran, else training's best estimate."""
    try:
        ev = json.loads((out_dir / "eval.json").read_text(encoding="utf-8"))
        return (f"{ev['likelihood']['bpb']:.4f} (evaluate.py, full pass over the {ev['data']['split']} split, "
                f"{ev['run']['checkpoint']})")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records, _ = read_metrics(out_dir / "metrics.jsonl")
    if not records:
        return "unknown (no readable eval.json or metrics.jsonl)"
    summary = records_of(records, "summary")
    evals = [r["val_bpb"] for r in records_of(records, "eval") if isinstance(r.get("val_bpb"), (int, float))]
    best = summary[-1].get("best_val_bpb") if summary else min(evals, default=None)
    if not isinstance(best, (int, float)):
        return "unknown (not evaluated yet)"
    return f"{best:.4f} (training's estimate on val batches; evaluate.py gives the full pass)"


def run_facts(out_dir: str, model: Any, info: dict[str, Any]) -> str:
    """Markdown describing a loaded run."""
    tok, c = info["tokenizer"], model.config
    return (f"**{out_dir}** ({Path(info['path']).name}, step {info['iter_num']:,})  \n"
            f"{model.num_params() / 1e6:.2f}M parameters: {c.n_layer} layers, {c.n_head} heads, "
            f"{c.n_embd} wide, context {c.block_size} tokens  \n"
            f"tokenizer: {tok.kind}, {tok.vocab_size:,} tokens  \n"
            f"val bits per byte: {val_bpb(Path(out_dir))}")


class Runs:
    """Loaded models by run directory, so a request does not reload its checkpoint; a checkpoint
    rewritten since (a run still training) is loaded afresh."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg, self.device = cfg, resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.loaded: dict[str, tuple[int, Any, dict[str, Any]]] = {}  # out_dir -> (file mtime, model, info)
        self.lock = threading.Lock()

    def choices(self) -> list[str]:
        return find_runs(self.cfg.runs_dir, self.cfg.out_dir)

    def get(self, out_dir: str) -> tuple[Any, dict[str, Any]]:
        if out_dir != self.cfg.out_dir and out_dir not in self.choices():  # the API could name any path
            raise UserError(f"unknown run '{out_dir}': choose one of {', '.join(self.choices())}")
        path = checkpoint_path(out_dir, self.cfg.ckpt)
        stamp = path.stat().st_mtime_ns if path.is_file() else -1  # no file: load_run says so
        with self.lock:
            if out_dir not in self.loaded or self.loaded[out_dir][0] != stamp:
                ckpt, info = load_run(out_dir, self.cfg.ckpt)
                self.loaded[out_dir] = (stamp, GPT.from_checkpoint(ckpt, info["path"], self.device), info)
            return self.loaded[out_dir][1:]


def build(cfg: AppConfig, runs: Runs) -> Any:
    import gradio as gr

    def facts(run: str) -> str:
        try:
            return run_facts(run, *runs.get(run))
        except UserError as e:
            return f"**{run}**: cannot load ({e})"

    def own_temperature(run: str) -> Any:  # the slider moves to a run's own temperature when it is chosen
        try:
            return gr.Slider(value=run_temperature(run, cfg.ckpt))
        except UserError as e:
            raise gr.Error(str(e)) from None

    def generate(run: str, prompt: str, max_new_tokens: float, temperature: float, top_k: float,
                 top_p: float, seed: float | None) -> Iterator[str]:
        if not prompt:
            raise gr.Error("The prompt is empty: type the beginning of a passage for the model to continue.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise gr.Error(f"The prompt has {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted.")
        if not 1 <= max_new_tokens <= cfg.max_tokens_limit:
            raise gr.Error(f"Max new tokens must be between 1 and {cfg.max_tokens_limit:,}, got {max_new_tokens}.")
        if seed is None or not float(seed).is_integer():
            raise gr.Error(f"The seed must be a whole number, got {seed}.")
        try:
            model, info = runs.get(run)
            check_sampling(int(max_new_tokens), temperature, int(top_k), top_p)
            n_prompt = len(encode_prompt(info["tokenizer"], prompt))  # unknown characters fail here, clearly
            if n_prompt > model.config.block_size:
                gr.Warning(f"The prompt is {n_prompt} tokens; the model reads only its last "
                           f"{model.config.block_size}.")
            text = prompt
            for piece in stream_text(model, info["tokenizer"], prompt, int(max_new_tokens), temperature,
                                     int(top_k), top_p, int(seed), dtype=runs.dtype):
                text += piece
                yield text
        except UserError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="bookgpt", analytics_enabled=False) as demo:
        gr.Markdown("# bookgpt\nA small GPT trained from scratch on one book. Type the start of a passage; "
                    "the model writes the rest, token by token.")
        with gr.Row():
            with gr.Column(scale=2):
                run = gr.Dropdown(runs.choices(), value=cfg.out_dir, label="Run")
                info = gr.Markdown(facts(cfg.out_dir), elem_id="facts")
                prompt = gr.Textbox(label="Prompt", lines=3, value=EXAMPLES[0], elem_id="prompt")
                gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Prompts from the book")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop")
            with gr.Column(scale=1):
                length = gr.Slider(1, cfg.max_tokens_limit, value=min(cfg.max_new_tokens, cfg.max_tokens_limit),
                                   step=1, label="Max new tokens")
                temperature = gr.Slider(0, 2, value=run_temperature(cfg.out_dir, cfg.ckpt), step=0.05,
                                        label="Temperature (0 = greedy; starts at the run's own)", elem_id="temperature")
                top_k = gr.Slider(0, 200, value=TOP_K, step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0.05, 1, value=TOP_P, step=0.01, label="Top-p (1 = off)")
                seed = gr.Number(1, precision=0, label="Seed (the same seed gives the same text)")
        output = gr.Textbox(label="Generated text", lines=16, max_lines=40, interactive=False, autoscroll=True,
                            elem_id="output")

        event = go.click(generate, [run, prompt, length, temperature, top_k, top_p, seed], output,
                         api_name="generate", concurrency_limit=cfg.concurrency)
        stop.click(None, cancels=[event])
        run.change(facts, run, info, api_visibility="private")
        run.change(own_temperature, run, temperature, api_visibility="private")
        # A run trained after the page started appears on reload.
        demo.load(lambda r: gr.Dropdown(choices=runs.choices(), value=r), run, run, api_visibility="private")
    return demo.queue(max_size=cfg.queue_size)


def main(argv: list[str]) -> None:
    cfg = parse_config(AppConfig, argv, prog="app.py", doc=__doc__.split("\n\n")[0])
    if not 1 <= cfg.port <= 65535:
        raise UserError(f"port must be between 1 and 65535, got {cfg.port}")
    if not 1 <= cfg.max_tokens_limit <= MAX_NEW_TOKENS:
        raise UserError(f"max_tokens_limit must be between 1 and {MAX_NEW_TOKENS:,}, got {cfg.max_tokens_limit}")
    if cfg.concurrency < 1 or cfg.queue_size < 1:
        raise UserError("concurrency and queue_size must be at least 1")
    cfg.out_dir = str(Path(cfg.out_dir) if cfg.out_dir else newest_run(cfg.runs_dir))  # one spelling, as find_runs writes it
    runs = Runs(cfg)
    model, _ = runs.get(cfg.out_dir)  # a bad run is a clear error now, not a broken page later
    run_temperature(cfg.out_dir, cfg.ckpt)  # and so is a damaged sampling.json
    # Before gradio is imported: it reads these once. The page must not phone home or need the internet.
    for key, value in {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SSR_MODE": "False", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("gradio is not installed: pip install -r requirements-app.txt") from None
    check_port(cfg.host, cfg.port)
    print(f"{cfg.out_dir}: {model.num_params() / 1e6:.2f}M parameters on {runs.device} ({runs.dtype})")
    try:
        build(cfg, runs).launch(server_name=cfg.host, server_port=cfg.port, share=False, show_error=True,
                                footer_links=["api"], mcp_server=False)
    except OSError as e:  # taken between the check and the start; Gradio's message names its env variable
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or 'in use'}); pass --port=N "
                        f"with a free port") from None


def check_port(host: str, port: int) -> None:
    """Fail with one line if the page cannot listen on host:port, before Gradio starts and says so
    with a traceback (as Gradio checks: SO_REUSEADDR, so a port a closed page just left is free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = {errno.EADDRINUSE: f"port {port} is in use", errno.EACCES: f"port {port} needs more privileges",
                   errno.EADDRNOTAVAIL: f"{host} is not an address of this machine"}.get(e.errno, e.strerror)
            raise UserError(f"cannot listen on {host}:{port}: {why}; pass --port=N with a free port"
                            f"{'' if e.errno != errno.EADDRNOTAVAIL else ' or --host=127.0.0.1'}") from None
        except socket.gaierror:
            raise UserError(f"cannot listen on {host}:{port}: unknown host; pass --host=127.0.0.1 or "
                            f"--host=0.0.0.0") from None


if __name__ == "__main__":
    cli(main)
