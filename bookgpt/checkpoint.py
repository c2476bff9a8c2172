"""Checkpoints: one schema, atomic saves, safe loads.

A checkpoint is a dict of tensors and plain values, saved with torch.save into a temp
file that is renamed over the old one (a crash leaves the previous good file), and
loaded with torch.load(weights_only=True), which refuses to run code from a pickle.

    {"format": "bookgpt", "version": 1,
     "model": state_dict of the *uncompiled, unwrapped* module (no `_orig_mod.` / `module.`),
     "optimizer": state_dict or None, "scaler": state_dict or None,
     "config": the training config (dict), "model_config": GPTConfig as a dict,
     "meta": the data directory's meta.json, "iter_num": int, "best_val_loss": float,
     "best_iter": int, "evals_since_best": int, "tokens_seen": int, "rng": {...},
     "ema": the weight average's state or None}
ema.pt holds the weight average at its best val loss, as "model", without optimizer or random state.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from bookgpt.config import GPTConfig, UserError, atomic_open

FORMAT, VERSION = "bookgpt", 1
FILES = {"best": "best.pt", "latest": "ckpt.pt", "ema": "ema.pt"}  # ema: the weight average (train.py --ema_decay)


def checkpoint_path(out_dir: str | Path, which: str = "best") -> Path:
    if which not in FILES:
        raise UserError(f"unknown checkpoint '{which}': use {', '.join(FILES)}")
    return Path(out_dir) / FILES[which]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and common.CompiledWithFallback (`.module`) and torch.compile
    (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


class _KeepWriteError:
    """torch.save turns a failed write (disk full) into an opaque RuntimeError ("unexpected pos");
    this file wrapper keeps the OSError behind it so the user can be told what happened."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | Path, model: torch.nn.Module, **fields: Any) -> None:
    """Save the unwrapped model's weights with `fields` (see the schema above), atomically."""
    plain = unwrap(model)
    state = {"format": FORMAT, "version": VERSION, "model": plain.state_dict(),
             "model_config": dataclasses.asdict(plain.config), **fields}
    try:
        with atomic_open(path) as f:
            sink = _KeepWriteError(f)
            try:
                torch.save(state, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
    except OSError as e:  # disk full, quota, read-only: atomic_open has removed its temp file
        raise UserError(f"cannot save {path}: {e.strerror or e}; the previous {Path(path).name} is unchanged "
                        f"(free some space, or choose another --out_dir, then --init_from=resume)") from None


def _refusal(e: Exception) -> str:
    """The reason inside torch's weights_only message, without its advice to load the file unsafely:
    the paragraph before "Check the documentation ...", e.g. "Unsupported operand 95"."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", str(e)) if p.strip()]
    paras = [p for p in paras if not p.startswith("Check the documentation")]
    return paras[-1].splitlines()[0] if len(paras) > 1 else "refused"


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; every way it can be wrong is a UserError."""
    path = Path(path)
    if not path.is_file():
        if path.name == FILES["ema"]:
            raise UserError(f"no weight average at {path}: only runs trained with --ema_decay have one; "
                            f"use --ckpt=best or --ckpt=latest")
        raise UserError(f"no checkpoint at {path}: train first (python train.py ...) or check --out_dir")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise around our one error line
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something: not a plain checkpoint
        raise UserError(f"{path} is not a bookgpt checkpoint and was not loaded (safe loading: {_refusal(e)})") from None
    except Exception as e:  # garbage makes the unpickler fail in many ways (KeyError, EOFError, BadZipFile, ...)
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}); "
                        f"use the other checkpoint (--ckpt=best/latest) or train again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a bookgpt checkpoint")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint version {ckpt.get('version')}, this code reads {VERSION}")
    return ckpt


def newest_run(root: str | Path = "out") -> Path:
    """The run folder under `root` whose checkpoint was written last: the run just trained (what
    sample.py, evaluate.py, app.py and a bare --init_from=resume use when no --out_dir is given)."""
    found = [p for name in FILES.values() for p in Path(root).rglob(name)] if Path(root).is_dir() else []
    if not found:
        raise UserError(f"no trained run under {root}/: train one first (python train.py) or pass --out_dir=RUN")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def load_run(out_dir: str | Path, which: str = "best") -> tuple[dict[str, Any], dict[str, Any]]:
    """A trained run's checkpoint, loaded onto the host (only the weights go to a device: model.GPT.from_checkpoint
    builds the model), and its info: config, meta, tokenizer, iter_num, best_val_loss, path, out_dir. An empty
    out_dir means the newest run under out/."""
    from bookgpt.tokenizer import (
        tokenizer_from_meta,  # here, so model-only users need not import tokenizer deps
    )

    out_dir = Path(out_dir) if str(out_dir) else newest_run()
    if not out_dir.is_dir():
        raise UserError(f"run directory not found: {out_dir} (pass --out_dir=out/RUN of a trained run)")
    path = checkpoint_path(out_dir, which)
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    info = {k: ckpt.get(k) for k in ("config", "iter_num", "best_val_loss", "best_iter", "tokens_seen")}
    info.update(meta=meta, path=str(path), out_dir=str(out_dir), tokenizer=tokenizer_from_meta(meta, out_dir))
    return ckpt, info


# ----------------------------------------------------------------------------- compatibility

def data_difference(saved: dict[str, Any], meta: dict[str, Any]) -> str:
    """'' when `meta` (a prepared folder's meta.json) describes the data a checkpoint was trained on,
    whose meta.json it saved: the same cleaned text, tokenizer, vocabulary and split points. Else
    what differs, in words. Held-out text must be the text the run held out, and a resumed or
    distilled run must read the tokens it learned. Keys an older checkpoint lacks are not compared,
    except the layout: folders from before it was recorded were all split at the tail."""
    kinds = saved.get("tokenizer", {}).get("kind"), meta.get("tokenizer", {}).get("kind")
    if saved.get("vocab_size") != meta.get("vocab_size"):
        return f"vocab {saved.get('vocab_size')} vs {meta.get('vocab_size')}"
    if kinds[0] != kinds[1]:
        return f"tokenizer {kinds[0]} vs {kinds[1]}"
    if "sha256_clean" in saved and saved["sha256_clean"] != meta.get("sha256_clean"):
        return "another text: its sha256 differs"
    if "fractions" in saved and saved["fractions"] != meta.get("fractions"):
        return f"split fractions {saved['fractions']} vs {meta.get('fractions')}"
    layouts = saved.get("layout", {"kind": "tail"}), meta.get("layout", {"kind": "tail"})  # older folders: tail
    if layouts[0] != layouts[1]:
        return f"split layout {layouts[0]['kind']} vs {layouts[1]['kind']}" + (
            " with other blocks" if layouts[0]["kind"] == layouts[1]["kind"] else "")
    return ""


def check_resumable(ckpt: dict[str, Any], model_cfg: GPTConfig, meta: dict[str, Any], path: Path,
                    optimizer: str = "adamw") -> None:
    """Refuse, in one line, to resume a checkpoint on other data, with another model or optimizer."""
    # the data first: another data_dir also changes vocab_size, and "pass the run's --data_dir" is the fix
    diff = data_difference(ckpt["meta"], meta)
    if diff:
        raise UserError(f"cannot resume from {path}: it was trained on other data than {meta.get('source', 'data_dir')} "
                        f"({diff}); pass the run's --data_dir")
    # a key an older checkpoint lacks was added later, its default the model the checkpoint had
    saved = {**{f.name: f.default for f in dataclasses.fields(GPTConfig)}, **ckpt["model_config"]}
    changed = [k for k, v in dataclasses.asdict(model_cfg).items() if saved.get(k) != v]
    if changed:
        pairs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(model_cfg, k)!r}" for k in changed)
        raise UserError(f"cannot resume from {path}: the model differs ({pairs}); use the run's config "
                        f"(out_dir/config.json) or a new out_dir")
    was = ckpt.get("config", {}).get("optimizer", "adamw")
    if was != optimizer:
        raise UserError(f"cannot resume from {path}: it was trained with optimizer={was}, not {optimizer}; "
                        f"pass --optimizer={was} or start a new out_dir")
