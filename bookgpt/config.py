"""One typed configuration mechanism for every bookgpt script.

Precedence, lowest to highest:  dataclass defaults  <-  TOML files  <-  --key=value.

    cfg = parse_config(TrainConfig, sys.argv[1:])

Positional arguments ending in .toml are config files (flat `key = value` tables,
read with tomllib: data, never code). `--key=value` and `--key value` override them.
Types come from the dataclass annotations; an unknown key names the closest valid
keys, a bad value names the key and the type it wants. Errors a user can cause are
raised as UserError, which `cli()` turns into one line on stderr and exit status 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import tempfile
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence, TypeVar, get_type_hints

T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


def pip_hint(packages: str) -> str:
    """How to install `packages` (space-separated), online and on a machine without internet (wheels carried in)."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (f"pip install {packages} (offline: `pip download {packages} --only-binary=:all: --python-version {python} "
            f"-d wheels/` on a machine with internet, then here `pip install --no-index --find-links=wheels/ {packages}`)")


def opt(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with a help string (shown by --help) and, for a string, the values it may take."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def bad_choice(cfg: Any) -> str:
    """What is wrong with the first key whose value is not one of its field's choices; '' when none is."""
    for f in dataclasses.fields(cfg):
        allowed = f.metadata.get("choices")
        if allowed and getattr(cfg, f.name) not in allowed:
            return f"bad value for '{f.name}': {getattr(cfg, f.name)!r}; use one of {', '.join(allowed)}"
    return ""


# ----------------------------------------------------------------------------- values

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _item_type(tp: Any) -> Any:
    """The item type of a list option, `tuple[float, ...]`; None for a single value."""
    return tp.__args__[0] if getattr(tp, "__origin__", None) is tuple else None


def _type_name(tp: Any) -> str:
    item = _item_type(tp)
    return f"comma-separated {_type_name(item)}" if item else getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or raise UserError. A list
    option (`tuple[float, ...]`) takes a TOML/JSON list, one value, or a comma-separated string: parsed here
    and nowhere else."""
    item = _item_type(tp)
    if item is not None:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return ()  # none given: the script decides (evaluate.py's --temperature=auto, the run's own)
        parts = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        return tuple(coerce(key, v, item) for v in (parts if isinstance(parts, (list, tuple)) else [parts]))
    bad = UserError(f"bad value for '{key}': {value!r} is not a valid {_type_name(tp)}")
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if tp is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise bad
        try:
            return tp(text) if tp is not int else int(text, 10)
        except ValueError:
            if tp is int:  # allow 1e4 or 2000.0 for integers when they are whole
                try:
                    f = float(text)
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
            raise bad from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _fields(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key(key: str, valid: Sequence[str], where: str) -> UserError:
    """The error for a key that is not valid here, naming the closest valid ones."""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(sorted(valid))}"
    return UserError(f"unknown config key '{key}'{where}; {hint}")


def load_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file (data, never code) or raise a UserError naming it."""
    p = Path(path)
    if not p.is_file():
        near = difflib.get_close_matches(str(p), [str(q) for q in p.parent.glob("*.toml")], n=1, cutoff=0.6) \
            if p.parent.is_dir() else []
        raise UserError(f"{what} not found: {p}" + (f"; did you mean {near[0]}?" if near else ""))
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {what} {p}: {e}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat config file: TOML, or the config.json a run saved (JSON: data too). Tables are
    rejected so every key stays visible."""
    if str(path).endswith(".json"):
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"cannot parse config file {p}: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {p} is not a JSON object of key: value pairs")
    else:
        data = load_toml(path)
    for k, v in data.items():
        if isinstance(v, dict):
            raise UserError(f"config file {path}: table [{k}] is not supported, write flat 'key = value' lines")
    return data


def apply_overrides(cfg: T, values: dict[str, Any], where: str = "") -> T:
    """Return a copy of dataclass `cfg` with `values` applied, type-checked."""
    types = _fields(type(cfg))
    out = {}
    for k, v in values.items():
        if k not in types:
            raise unknown_key(k, list(types), where)
        out[k] = coerce(k, v, types[k])
    return dataclasses.replace(cfg, **out)


def split_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split argv into config files and {key: raw value} overrides (both --k=v and --k v)."""
    files: list[str] = []
    overrides: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            body = a[2:]
            if "=" in body:
                k, v = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                k, v = body, args[i + 1]
                i += 1
            else:
                k, v = body, "true"  # a bare --flag means true
            overrides[k.replace("-", "_")] = v
        elif a.endswith((".toml", ".json")):
            files.append(a)
        else:
            raise UserError(f"unexpected argument '{a}': pass config files (.toml, or a run's config.json) and "
                            f"--key=value options")
        i += 1
    return files, overrides


def format_help(cls: type, prog: str, doc: str = "", values: Any = None) -> str:
    lines = [f"usage: python {prog} [config/X.toml ...] [--key=value ...]", ""]
    if doc:
        lines += [doc.strip(), ""]
    types = _fields(cls)
    def shown(v: Any) -> str:  # a list option as it is typed on the command line
        return to_flag(v) if isinstance(v, tuple) else repr(v)
    keys = [(f"--{f.name}={shown(getattr(values, f.name)) if values is not None else shown(f.default)}", f)
            for f in dataclasses.fields(cls)]
    width = min(max(len(k) for k, _ in keys), 36)
    for key, f in keys:
        lines.append(f"  {key:<{width}} ({_type_name(types[f.name])}) {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_config(cls: type[T], argv: Sequence[str], prog: str = "", doc: str = "") -> T:
    """Defaults <- each TOML file in order <- --key=value overrides. `--help` prints every key with the
    value these files and flags give it, and exits 0."""
    wants_help = any(a in ("-h", "--help") for a in argv)
    files, overrides = split_argv([a for a in argv if a not in ("-h", "--help")])
    cfg = cls()
    for f in files:
        cfg = apply_overrides(cfg, read_toml(f), where=f" in {f}")
    cfg = apply_overrides(cfg, overrides, where=" on the command line")
    if wants_help:
        print(format_help(cls, prog or Path(sys.argv[0]).name, doc, cfg))
        raise SystemExit(0)
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_flag(value: Any) -> str:
    """A value as --key=value writes it, read back to the same value (a list option comma-separated)."""
    if isinstance(value, (tuple, list)):
        return ",".join(to_flag(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)


def to_flags(values: dict[str, Any]) -> list[str]:
    """--key=value for each key, one flag per key, so a printed command reads as what runs."""
    return [f"--{k}={to_flag(v)}" for k, v in values.items()]


# ----------------------------------------------------------------------------- files

@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temp file beside `path` for writing; on success fsync and rename it over `path`.
    Readers (and a crash at any moment) see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# ----------------------------------------------------------------------------- entry point

def cli(main: Callable[[list[str]], Any]) -> None:
    """Run `main(argv)`; a UserError becomes one 'error: ...' line on stderr and exit status 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # `python train.py --help | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        raise SystemExit(0) from None


# ----------------------------------------------------------------------------- the model's keys

@dataclasses.dataclass
class GPTConfig:
    """The model's keys: the one place they are defined, given defaults and checked. training.py's TrainConfig
    takes them from here, so they are train.py's command-line keys too. The defaults are the recommended CPU
    recipe's model (config/wp_bpe_cpu.toml: 6 x 256, rotary, RMSNorm, QK-norm) without its three levers that
    depend on the depth (value_embeds, unet_skips, zero_init), which TrainConfig turns on: GPTConfig(n_layer=2)
    stays a valid model."""
    block_size: int = opt(256, "context length in tokens")
    vocab_size: int = opt(0, "vocabulary size (0 = the data's, from data_dir/meta.json)")
    n_layer: int = opt(6, "transformer blocks")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(256, "embedding width")
    dropout: float = opt(0.2, "dropout probability (attention, residual, embedding); none in eval mode")
    bias: bool = opt(False, "biases in Linear layers and norms (GPT-2 had them)")
    pos_emb: str = opt("rope", "rope (rotary) or learned (absolute positions, GPT-2's)", ("learned", "rope"))
    norm: str = opt("rmsnorm", "rmsnorm or layernorm", ("layernorm", "rmsnorm"))
    qk_norm: bool = opt(True, "normalise queries and keys per head before attention")
    mlp: str = opt("relu2", "relu2 (squared ReLU), gelu or swiglu", ("gelu", "relu2", "swiglu"))
    mlp_ratio: float = opt(4.0, "MLP hidden width / n_embd (swiglu uses 2/3 of it: the same parameters)")
    tie_weights: bool = opt(True, "tie the output head to the token embedding")
    logit_softcap: float = opt(0.0, "cap * tanh(logits / cap) when > 0")
    rope_base: float = opt(10000.0, "base of the rotary frequencies (pos_emb=rope)")
    value_embeds: int = opt(0, "token tables added to the attention values of the first and the last this many "
                               "blocks, block i and block n_layer - k + i sharing table i (0 = off)")
    unet_skips: bool = opt(False, "U-net skips: each block of the second half also reads the output of its mirror "
                                  "in the first half, times a learned weight")
    zero_init: bool = opt(False, "projections into the residual stream start at zero: every block starts as the identity")
    attn_gate: bool = opt(False, "per-head attention output gates: each head's output times a sigmoid of a learned "
                                 "projection of the block's input (about 0.5 at the start)")
    mtp_weight: float = opt(0.0, "multi-token prediction: one more block on top of the last also predicts the token after "
                                 "next, its cross-entropy added to the loss times this weight (training only; 0 = off)")
    loop_blocks: int = opt(0, "layer looping: the middle this many blocks run twice in a row (6 blocks, 2: blocks 0 1 2 3 "
                              "2 3 4 5), more depth for the same parameters (0 = off)")
    drop_path: float = opt(0.0, "stochastic depth: the chance that a training step skips a block's attention or MLP "
                                "branch for a sequence, from 0 at the first block rising linearly to this at the last")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first key whose value cannot make a model (of a TrainConfig: any key's choice)."""
        if message := bad_choice(self):
            raise ValueError(message)
        for key in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) <= 0:
                raise ValueError(f"'{key}' must be positive, got {getattr(self, key)}")
        if self.vocab_size < 0:
            raise ValueError(f"'vocab_size' must be 0 (the data's) or more, got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.mtp_weight < 0:
            raise ValueError(f"mtp_weight must be 0 (off) or more, got {self.mtp_weight}")
        for key in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 <= self.value_embeds <= self.n_layer // 2:
            raise ValueError(f"value_embeds must be 0..n_layer // 2 = {self.n_layer // 2} (a table for a block of "
                             f"each half), got {self.value_embeds}")
        if not 0 <= self.loop_blocks <= self.n_layer:
            raise ValueError(f"loop_blocks must be 0..n_layer = {self.n_layer}, got {self.loop_blocks}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, n_embd / n_head = {self.n_embd // self.n_head}")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Pick the model's keys out of a larger (training) config dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
