"""The KV-cached one-token step, eager against torch.compile(dynamic=True) (one graph for every cache length):
tried for sampling on a CPU and not kept (docs/benchmarks.md, "Sampling: the KV cache").

    python docs/bench/compiled_decode.py      # from the repository root: the 2x4090 shape, float32, random weights
"""
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model import GPT, GPTConfig  # noqa: E402

torch.manual_seed(0)
config = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=104, value_embeds=1, unet_skips=True)
model = GPT(config).eval()
prompt = torch.randint(config.vocab_size, (1, 200))


@torch.no_grad()
def decode(step, tokens: int, weights_t: bool) -> tuple[float, torch.Tensor]:
    """ms a token for `tokens` greedy one-token steps after the prompt's prefill, and the last logits."""
    cache = model.new_cache(1, prompt.device)
    with model.sampling_weights() if weights_t else contextlib.nullcontext():
        model(prompt, cache=cache)
        token = prompt[:, -1:]
        start = time.perf_counter()
        for _ in range(tokens):
            logits, _ = step(token, cache=cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / tokens * 1e3, logits


runs = {"eager, (in, out) weights": (model, True), "eager, nn.Linear's weights": (model, False),
        "compiled, (in, out) weights": (torch.compile(model, dynamic=True), True),
        "compiled, nn.Linear's weights": (torch.compile(model, dynamic=True), False)}
for name, (step, weights_t) in runs.items():
    start = time.perf_counter()
    decode(step, 3, weights_t)
    print(f"{name}: first 3 tokens {time.perf_counter() - start:.1f} s (compiling, if compiled)", flush=True)
times = {name: [] for name in runs}
for _ in range(3):  # interleaved
    for name, (step, weights_t) in runs.items():
        times[name].append(decode(step, 50, weights_t)[0])
reference = decode(model, 50, True)[1]
for name, (step, weights_t) in runs.items():
    error = (decode(step, 50, weights_t)[1] - reference).abs().max().item()
    print(f"{name:30s} {statistics.median(times[name]):5.2f} ms a token (median of 3 x 50), largest logit "
          f"difference from eager {error:.1e}")
