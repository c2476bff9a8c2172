"""A sweep's results: one row per run read from its files (metrics.jsonl, sweep_run.json),
written as results.csv, results.md (best first) and val_bpb.png; and the readers and formatters
sweep.py shares with them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shlex
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bookgpt.common import read_metrics
from bookgpt.config import atomic_write_bytes

if TYPE_CHECKING:
    from sweep import Run, Sweep

def finished_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The summary of a run that ended by itself (max_iters, max_minutes, early stop): not by a signal."""
    summaries = [r for r in records if r.get("kind") == "summary"]
    if summaries and summaries[-1].get("reason") != "signal":
        return summaries[-1]
    return None


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


def _format_arg(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)


COLUMNS = ["best_val_bpb", "best_ema_val_bpb", "best_val_loss", "best_iter", "iters", "params", "tokens_per_s", "wall_s",
           "status", "reason", "error", "out_dir"]
STATUS_ORDER = {"finished": 0, "interrupted": 1, "timeout": 1, "failed": 2, "pending": 3}


def result_row(run: Run, sweep: Sweep) -> dict[str, Any]:
    """One results row from the run's files: its summary when finished, its eval lines otherwise."""
    records = read_metrics(run.out_dir / "metrics.jsonl")[0]
    rec = read_record(run.out_dir)
    row: dict[str, Any] = {"run": run.name}
    for k in sweep.keys:
        row[k] = run.swept["variant"] if k == "variant" else getattr(run.cfg, k)
    summary = finished_summary(records)
    evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get("val_loss"), (int, float))]
    if summary:
        seconds = summary.get("train_seconds") or 0.0
        row.update(best_val_bpb=summary.get("best_val_bpb"), best_ema_val_bpb=summary.get("best_ema_val_bpb"),
                   best_val_loss=summary.get("best_val_loss"),
                   best_iter=summary.get("best_iter"), iters=summary.get("iter"), params=summary.get("params"),
                   tokens_per_s=summary.get("tokens_seen", 0) / seconds if seconds else None,
                   status="finished", reason=summary.get("reason"), error="")
    else:
        if evals:  # an unfinished run: the best it reached so far
            best = min(evals, key=lambda r: r["val_loss"])
            last = evals[-1]
            row.update(best_val_bpb=best.get("val_bpb"), best_val_loss=best["val_loss"], best_iter=best["iter"],
                       iters=max(r.get("iter", 0) for r in records),
                       tokens_per_s=last["tokens_seen"] / last["time_s"] if last.get("time_s") else None)
        status = rec.get("status") or ("interrupted" if (run.out_dir / "ckpt.pt").is_file() else "pending")
        row.update(status=status if status != "finished" else "interrupted", error=rec.get("error", ""))
    row["wall_s"] = rec.get("wall_s")
    row["out_dir"] = str(run.out_dir)
    return {**{k: None for k in ["run", *sweep.keys, *COLUMNS]}, **row}


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> tuple:
        bpb = r["best_val_bpb"]
        return STATUS_ORDER.get(r["status"], 3), bpb if isinstance(bpb, (int, float)) else math.inf
    return sorted(rows, key=key)


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


def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
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
             + (", ".join(f"`{k}={_format_arg(v)}`" for k, v in sweep.fixed.items()) or "nothing")
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
        ax.set_xlabel(key)
        ax.set_ylabel("best val bits per byte")
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
