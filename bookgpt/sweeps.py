"""What a sweep is and what it found: the Run and Sweep it describes, read and checked from its TOML file
(load_sweep) before anything runs, run names from the swept values; then one results row per run read from
its files (metrics.jsonl, sweep_run.json), written as results.csv, results.md (best first) and val_bpb.png.
sweep.py runs the sweep; docs/sweeps.md is the manual of both.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product
from pathlib import Path
from typing import Any

from bookgpt.common import read_metrics
from bookgpt.config import UserError, apply_overrides, atomic_write_bytes, load_toml, read_toml, to_flag, unknown_key
from bookgpt.training import TrainConfig, validate

RESERVED = ("base", "fixed", "grid", "variants")
SET_BY_SWEEP = ("out_dir", "init_from")  # every run gets its own out_dir; resume is decided per run
# short names for run directories; a key not listed uses its own name, "" shows the value alone
ABBREV = {"learning_rate": "lr", "min_lr": "minlr", "n_layer": "layer", "n_head": "head", "n_embd": "embd",
          "block_size": "ctx", "batch_size": "bs", "gradient_accumulation_steps": "accum", "dropout": "drop",
          "weight_decay": "wd", "max_iters": "iters", "warmup_iters": "warmup", "data_dir": ""}


@dataclass
class Run:
    name: str
    swept: dict[str, Any]  # swept key -> value as the sweep file gives it (variant name under "variant")
    overrides: dict[str, Any]  # everything sweep.py passes to train.py as --key=value, typed
    cfg: TrainConfig  # the full config the run trains with (validated)
    variant: str = ""  # its variant's name, or a name made of the variant's values

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)


@dataclass
class Sweep:
    name: str
    path: Path
    base: list[str]
    fixed: dict[str, Any]
    cli: dict[str, Any]  # train.py keys from the command line, for every run
    keys: list[str]  # swept keys, in column order
    grid_keys: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    dir: Path = Path()


# ----------------------------------------------------------------------------- the sweep file

def check_keys(values: dict[str, Any], where: str) -> None:
    """Type-check `values` against TrainConfig; errors name the place in the sweep file (or the command line)."""
    try:
        apply_overrides(TrainConfig(), values, where=f" in {where}")
    except UserError as e:
        raise UserError(str(e) if str(e).startswith("unknown") else f"{where}: {e}") from None
    for k in SET_BY_SWEEP:
        if k in values:
            raise UserError(f"{where}: '{k}' is set by sweep.py (each run gets its own out_dir under the "
                            f"sweep's folder and is resumed when interrupted); remove it")


def run_name(parts: dict[str, Any]) -> str:
    """A readable directory name from swept values: lr0.003_layer4, mlp-swiglu, war_and_peace_char."""
    words = []
    for k, v in parts.items():
        if k == "variant":
            words.append(str(v))
            continue
        abbr, text = ABBREV.get(k, k), _format_value(v)
        sep = "-" if abbr and (isinstance(v, (str, bool)) or abbr[-1].isdigit()) else ""
        words.append(f"{abbr}{sep}{text}")
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", "_".join(words)).strip("-.") or "run"


def read_shared(path: Path, data: dict[str, Any]) -> tuple[list[str], TrainConfig, dict[str, Any]]:
    """What every run shares, once the top-level keys are checked: base (its config files, and the config they
    give) and [fixed]."""
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in data:
        if k in train_keys:
            raise UserError(f"{path}: '{k}' is a train.py key; put it under [fixed] (or [grid]) in the sweep file")
        if k not in RESERVED:
            raise unknown_key(k, RESERVED, f" in sweep file {path} (its top-level keys are {', '.join(RESERVED)})")
    base = data.get("base", [])
    base = [base] if isinstance(base, str) else base
    if not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        raise UserError(f"{path}: base must be a config file name or a list of them, e.g. base = [\"config/x.toml\"]")
    cfg = TrainConfig()
    for b in base:
        cfg = apply_overrides(cfg, read_toml(b), where=f" in {b}")
    fixed = data.get("fixed", {})
    if not isinstance(fixed, dict):
        raise UserError(f"{path}: fixed must be a table: [fixed] followed by key = value lines")
    check_keys(fixed, f"[fixed] of {path}")
    return base, cfg, fixed


def read_grid(path: Path, data: dict[str, Any]) -> dict[str, list[Any]]:
    """[grid]: each key a list of distinct values, each a valid value of the key."""
    if "grid" not in data and "variants" not in data:
        raise UserError(f"{path} has no [grid] and no [[variants]]: nothing to sweep")
    grid = data.get("grid", {})
    if not isinstance(grid, dict):
        raise UserError(f"{path}: grid must be a table: [grid] followed by key = [values] lines")
    if "grid" in data and not grid:
        raise UserError(f"{path}: [grid] is empty; give it key = [value, ...] lines or remove it")
    for k, values in grid.items():
        if not isinstance(values, list):
            raise UserError(f"{path}: [grid] {k} must be a list of values, e.g. {k} = [{values!r}]")
        if not values:
            raise UserError(f"{path}: [grid] {k} is an empty list; give it at least one value")
        if len({json.dumps(v) for v in values}) < len(values):
            raise UserError(f"{path}: [grid] {k} repeats a value: {values}")
        for v in values:
            check_keys({k: v}, f"[grid] of {path}")
    return grid


def read_variants(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """[[variants]]: tables of train.py keys, every one named or none ([{}] without any: the grid alone)."""
    variants = data.get("variants", [{}])
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
        raise UserError(f"{path}: variants must be [[variants]] tables, one per run")
    named = [("name" in v) for v in variants]
    if any(named) and not all(named):
        raise UserError(f"{path}: give every [[variants]] table a name, or none of them")
    for i, v in enumerate(variants, 1):
        if "name" in v and (not isinstance(v["name"], str) or not v["name"].strip()):
            raise UserError(f"{path}: [[variants]] number {i} has a bad name {v['name']!r}; use a short string")
        check_keys({k: x for k, x in v.items() if k != "name"}, f"[[variants]] number {i} of {path}")
    return variants


def swept_keys(path: Path, grid: dict[str, Any], variants: list[dict[str, Any]], fixed: dict[str, Any],
               cli_overrides: dict[str, Any]) -> list[str]:
    """The swept keys, variants' first; a key may be swept in one place only, so no run depends on which wins."""
    variant_keys = list(dict.fromkeys(k for v in variants for k in v if k != "name"))
    for k in variant_keys:
        if k in grid:
            raise UserError(f"{path}: '{k}' is in both [grid] and [[variants]]; sweep it in one of them")
    for k in [*variant_keys, *grid]:
        if k in fixed:
            raise UserError(f"{path}: '{k}' is both in [fixed] and swept; remove it from [fixed]")
        if k in cli_overrides:
            raise UserError(f"--{k} on the command line would override a swept key of {path}")
    return (["variant"] if "name" in variants[0] else []) + variant_keys + list(grid)


def make_run(sweep: Sweep, cfg0: TrainConfig, variant: dict[str, Any], point: dict[str, Any], label: str) -> Run:
    """The run of one variant at one grid point, its full config validated."""
    own = {k: v for k, v in variant.items() if k != "name"}
    overrides = {**sweep.fixed, **own, **point, **sweep.cli, "out_dir": str(sweep.dir / label)}
    try:
        cfg = apply_overrides(cfg0, overrides, where=f" in {sweep.path}")
        if cfg.wandb_log:  # a sweep's runs share a wandb group; each is named after its folder
            cfg = dataclasses.replace(cfg, wandb_group=cfg.wandb_group or sweep.name,
                                      wandb_run_name=cfg.wandb_run_name or f"{sweep.name}/{label}")
            overrides |= {"wandb_group": cfg.wandb_group, "wandb_run_name": cfg.wandb_run_name}
        validate(cfg)
    except UserError as e:
        raise UserError(f"{sweep.path}: run {label}: {e}") from None
    swept = ({"variant": variant["name"]} if "name" in variant else {}) | own | point
    return Run(name=label, swept=swept, overrides={k: getattr(cfg, k) for k in overrides}, cfg=cfg,
               variant=variant.get("name") or run_name(own) if variant else "")


def load_sweep(path: str | Path, cli_overrides: dict[str, Any], out_root: str | Path) -> Sweep:
    """Parse and validate a sweep file into its runs; every error a user can cause is a UserError,
    raised before anything runs."""
    path = Path(path)
    data = load_toml(path, "sweep file")
    base, cfg0, fixed = read_shared(path, data)
    grid, variants = read_grid(path, data), read_variants(path, data)
    sweep = Sweep(name=path.stem, path=path, base=base, fixed=fixed, cli=cli_overrides, grid_keys=list(grid),
                  keys=swept_keys(path, grid, variants, fixed, cli_overrides), dir=Path(out_root) / path.stem)
    seen: dict[str, int] = {}
    for variant in variants:
        for point in (dict(zip(grid, p)) for p in product(*grid.values())):
            label = run_name(({"variant": variant["name"]} if "name" in variant else variant) | point)
            if label in seen:
                raise UserError(f"{path}: runs {seen[label] + 1} and {len(sweep.runs) + 1} would both be named "
                                f"'{label}'; make the variants differ or give them different names")
            seen[label] = len(sweep.runs)
            sweep.runs.append(make_run(sweep, cfg0, variant, point, label))
    return sweep


# ----------------------------------------------------------------------------- results

def finished_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The summary of a run that ended by itself (max_iters, max_minutes, early stop): not by a signal."""
    last = next((r for r in reversed(records) if r.get("kind") == "summary"), None)
    return last if last is not None and last.get("reason") != "signal" else None


def read_record(out_dir: Path) -> dict[str, Any]:
    """sweep_run.json: what sweep.py saw of this run's attempts (status, error, wall time)."""
    try:
        return json.loads((out_dir / "sweep_run.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and "/" in v:
        return Path(v).name or v  # a path (data_dir): its last part
    return str(v)


COLUMNS = ["best_val_bpb", "best_ema_val_bpb", "best_val_loss", "best_iter", "iters", "params", "tokens_per_s", "wall_s",
           "status", "reason", "error", "out_dir"]
STATUS_ORDER = {"finished": 0, "interrupted": 1, "timeout": 1, "failed": 2, "pending": 3}


def result_row(run: Run, sweep: Sweep) -> dict[str, Any]:
    """One results row from the run's files: its summary when finished, its eval lines otherwise."""
    records = read_metrics(run.out_dir / "metrics.jsonl")[0]
    rec = read_record(run.out_dir)
    row = {"run": run.name} | {k: run.swept["variant"] if k == "variant" else getattr(run.cfg, k) for k in sweep.keys}
    summary = finished_summary(records)
    evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get("val_loss"), (int, float))]
    if summary:
        seconds = summary.get("train_seconds") or 0.0
        copied = ("best_val_bpb", "best_ema_val_bpb", "best_val_loss", "best_iter", "params", "reason")
        row.update({k: summary.get(k) for k in copied}, iters=summary.get("iter"), status="finished", error="",
                   tokens_per_s=summary.get("tokens_seen", 0) / seconds if seconds else None)
    else:
        if evals:  # an unfinished run: the best it reached so far
            best = min(evals, key=lambda r: r["val_loss"])
            last = evals[-1]
            row.update(best_val_bpb=best.get("val_bpb"), best_val_loss=best["val_loss"], best_iter=best["iter"],
                       iters=max(r.get("iter", 0) for r in records),
                       tokens_per_s=last["tokens_seen"] / last["time_s"] if last.get("time_s") else None)
        status = rec.get("status") or ("interrupted" if (run.out_dir / "ckpt.pt").is_file() else "pending")
        row.update(status=status if status != "finished" else "interrupted", error=rec.get("error", ""))
    row.update(wall_s=rec.get("wall_s"), out_dir=str(run.out_dir))
    return {**{k: None for k in ["run", *sweep.keys, *COLUMNS]}, **row}


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (STATUS_ORDER.get(r["status"], 3),
                                       r["best_val_bpb"] if isinstance(r["best_val_bpb"], (int, float)) else math.inf))


def _fmt_csv(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return "" if v is None else v


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt_csv(v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def _duration(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return ""
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def describe(row: dict[str, Any]) -> str:
    """A results row as the one line sweep.py prints after a run."""
    head = f"{row['status']} in {_duration(row['wall_s'])}"
    if row["status"] != "finished":
        return f"{head}: {row['error']}"
    tps = f", {row['tokens_per_s']:,.0f} tok/s" if row["tokens_per_s"] else ""
    return (f"{head} ({row['reason']}): best val {row['best_val_bpb']:.4f} bpb (loss {row['best_val_loss']:.4f}) "
            f"at step {row['best_iter']} of {row['iters']}{tps}")


def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return _format_value(v).replace("|", "\\|")


def write_markdown(path: Path, rows: list[dict[str, Any]], sweep: Sweep) -> None:
    done = sum(r["status"] == "finished" for r in rows)
    lines = [f"# Sweep `{sweep.name}`", "",
             f"`{shlex.join(['python', 'sweep.py', str(sweep.path), *(f'--{k}={v}' for k, v in sweep.cli.items())])}`: "
             f"{done} of {len(rows)} runs finished "
             f"(updated {datetime.now().isoformat(sep=' ', timespec='seconds')}).",
             f"Base: {', '.join(f'`{b}`' for b in sweep.base) or 'train.py defaults'}; fixed: "
             + (", ".join(f"`{k}={to_flag(v)}`" for k, v in sweep.fixed.items()) or "nothing")
             + (f" (the command line overrides {', '.join(sweep.cli)})" if sweep.cli else "") + ".",
             "Sorted by best validation bits per byte (lower is better); tok/s counts training steps only.", ""]
    averaged = any(r["best_ema_val_bpb"] is not None for r in rows)  # runs with ema_decay: their average's best
    head = ["#", "run", *sweep.keys, "val bpb", *(["average's val bpb"] if averaged else []), "val loss", "best step",
            "steps", "params", "tok/s", "wall", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        status = r["status"] if r["status"] == "finished" else f"{r['status']}: {r['error']}".rstrip(": ")
        cells = [str(i), f"`{r['run']}`", *(_format_value(r[k]).replace("|", "\\|") for k in sweep.keys),
                 _cell(r["best_val_bpb"]), *([_cell(r["best_ema_val_bpb"])] if averaged else []),
                 _cell(r["best_val_loss"]), _cell(r["best_iter"]), _cell(r["iters"]),
                 f"{r['params'] / 1e6:.2f}M" if r["params"] else "",
                 f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "", _duration(r["wall_s"]),
                 status.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def plot_dimensions(rows: list[dict[str, Any]], sweep: Sweep) -> tuple[list[dict[str, Any]], list[str]]:
    """The finished rows (with their variant) and the axes to plot them on: the variant (its keys
    move together, so it is one axis) and each grid key, where they take more than one value."""
    done = [r for r in rows if r["status"] == "finished" and isinstance(r["best_val_bpb"], (int, float))]
    variant_of = {run.name: run.variant for run in sweep.runs}
    done = [{**r, "variant": variant_of[r["run"]]} for r in done]
    return done, [k for k in ["variant", *sweep.grid_keys] if len({_format_value(r[k]) for r in done}) > 1]


def write_plot(path: Path, rows: list[dict[str, Any]], sweep: Sweep) -> bool:
    """val bpb against each swept dimension; runs that share the other dimensions' values are joined by a line."""
    done, keys = plot_dimensions(rows, sweep)
    if not keys:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r[key] for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        order = list(dict.fromkeys(values))
        x_of = (lambda v: v) if numeric else (lambda v: order.index(v))
        others = [k for k in keys if k != key]
        series: dict[tuple, list[dict[str, Any]]] = {}
        for r in done:
            series.setdefault(tuple(r[k] for k in others), []).append(r)
        for group, members in series.items():
            members.sort(key=lambda r: x_of(r[key]))
            label = ", ".join(f"{k}={_format_value(v)}" for k, v in zip(others, group)) or None
            ax.plot([x_of(r[key]) for r in members], [r["best_val_bpb"] for r in members], "o-", label=label)
        if numeric and min(values) > 0 and max(values) / min(values) >= 4:  # rates are swept geometrically
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(order)), [_format_value(v) for v in order], rotation=20)
        ax.set(xlabel=key, ylabel="best val bits per byte")
        ax.grid(alpha=0.3)
        if others and len(series) <= 10:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_results(sweep: Sweep) -> list[dict[str, Any]]:
    """results.csv, results.md and val_bpb.png, each written atomically, from the runs' own files."""
    rows = sort_rows([result_row(r, sweep) for r in sweep.runs])
    write_csv(sweep.dir / "results.csv", rows)
    write_markdown(sweep.dir / "results.md", rows, sweep)
    write_plot(sweep.dir / "val_bpb.png", rows, sweep)
    return rows
