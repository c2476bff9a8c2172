"""A run folder as the code before the bookgpt/ package saved it, rebuilt from text: the checkpoint's layout
(tests/fixtures/run_before_package/schema.json: every key, and every tensor's shape and dtype, of the ckpt.pt that
code wrote for a 6-step run), its config.json and metrics.jsonl, filled with seeded values, and its data prepared
from the same made-up text. expected.json holds what the code before the package computed from this very folder."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "run_before_package"
WORDS = ("the prince said and she was not at all in his of that with for her it had as old count looked at pierre "
         "natasha moscow army went back to room").split()


def story() -> str:
    """The run's text: 400 sentences of the words above (no book is stored in the repository)."""
    rng = random.Random(0)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                     for _ in range(400)) + "\n"


def fill(node: Any, path: str, g: torch.Generator, states: list[int]) -> Any:
    """The schema's values: tensors drawn from `g` (norm gains near 1, second moments positive, step counts 6),
    random-number states from seeded generators (each a valid state), everything else as it was saved."""
    if isinstance(node, list):
        return [fill(x, f"{path}.{i}", g, states) for i, x in enumerate(node)]
    if not isinstance(node, dict):
        return float(node["__float__"]) if isinstance(node, dict) else node
    if "__float__" in node:
        return float(node["__float__"])
    if "__intkeys__" in node:
        return {int(k): fill(v, f"{path}.{k}", g, states) for k, v in node["__intkeys__"].items()}
    if "__tensor__" not in node:
        return {k: fill(v, f"{path}.{k}", g, states) for k, v in node.items()}
    shape, dtype = node["__tensor__"], getattr(torch, node["dtype"])
    if dtype == torch.uint8:  # a CPU generator's state
        states.append(len(states))
        return torch.Generator().manual_seed(100 + states[-1]).get_state()
    if path.endswith(".step"):
        return torch.full(shape, 6.0, dtype=dtype)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if path.endswith("exp_avg_sq"):
        return x.abs() * 1e-4
    gain = any(path.endswith(f"{n}.weight") for n in ("ln_1", "ln_2", "ln_f", "q_norm", "k_norm"))
    return 1.0 + 0.1 * x if gain else 0.1 * x


def make_old_run(root: Path) -> Path:
    """root/run (best.pt, ckpt.pt, config.json, meta.json, metrics.jsonl) and root/data, as the old code left them."""
    from prepare import PrepareConfig, prepare

    (root / "story.txt").write_text(story(), encoding="utf-8")
    prepare(PrepareConfig(tokenizer="char", input=str(root / "story.txt"), out_dir=str(root / "data")))
    run = root / "run"
    run.mkdir()
    ckpt = fill(json.loads((FIXTURE / "schema.json").read_text()), "", torch.Generator().manual_seed(1234), [])
    for name in ("ckpt.pt", "best.pt"):
        torch.save(ckpt, run / name)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(FIXTURE / name, run / name)
    (run / "meta.json").write_text(json.dumps(ckpt["meta"], indent=2) + "\n")
    return run
