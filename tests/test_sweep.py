"""sweep.py: grid/variant expansion and run names, every bad-sweep-file error (before any run starts),
skip and resume of runs on disk, and tiny sweeps end to end on the CPU."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sweep as S
from bookgpt import sweeps as R
from bookgpt.config import UserError
from conftest import ROOT, tiny_train_args


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def tiny_fixed(data_dir: Path) -> dict[str, object]:
    """conftest's seconds-long tiny run, as typed TOML values (out_dir is the sweep's to set)."""
    out = {}
    for arg in tiny_train_args(data_dir, Path("unused")):
        k, v = arg[2:].split("=", 1)
        for tp in (int, float):
            try:
                v = tp(v)
                break
            except ValueError:
                pass
        out[k] = v
    del out["out_dir"]
    return out


def write_sweep(path: Path, base: list[Path] | None = None, fixed: dict | None = None, grid: dict | None = None,
                variants: list[dict] | None = None, extra: str = "") -> Path:
    lines = [f"base = {toml_value([str(b) for b in base or []])}", extra]
    if fixed is not None:
        lines += ["[fixed]", *(f"{k} = {toml_value(v)}" for k, v in fixed.items())]
    if grid is not None:
        lines += ["[grid]", *(f"{k} = {toml_value(v)}" for k, v in grid.items())]
    for v in variants or []:
        lines += ["[[variants]]", *(f"{k} = {toml_value(x)}" for k, x in v.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def base_toml(tmp_path: Path) -> Path:
    p = tmp_path / "base.toml"
    p.write_text('n_layer = 3\nn_head = 2\nn_embd = 32\nvalue_embeds = 0\nunet_skips = false\nzero_init = false\n'
                 'learning_rate = 5e-4\nmax_iters = 100\n', encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- expansion and names

def test_grid_is_the_full_product_in_order_with_readable_names(tmp_path: Path, base_toml: Path) -> None:
    f = write_sweep(tmp_path / "lr_layers.toml", [base_toml], fixed={"max_iters": 7},
                    grid={"learning_rate": [1e-3, 3e-3], "n_layer": [2, 4]})
    sw = R.load_sweep(f, {}, tmp_path / "out")
    assert [r.name for r in sw.runs] == ["lr0.001_layer2", "lr0.001_layer4", "lr0.003_layer2", "lr0.003_layer4"]
    assert sw.keys == ["learning_rate", "n_layer"]
    r = sw.runs[2]
    assert (r.cfg.learning_rate, r.cfg.n_layer, r.cfg.max_iters, r.cfg.n_embd) == (3e-3, 2, 7, 32)  # grid, fixed, base
    assert r.out_dir == tmp_path / "out" / "lr_layers" / "lr0.003_layer2"
    assert r.overrides == {"max_iters": 7, "learning_rate": 3e-3, "n_layer": 2, "out_dir": str(r.out_dir)}


def test_variants_combine_with_the_grid(tmp_path: Path, base_toml: Path) -> None:
    f = write_sweep(tmp_path / "s.toml", [base_toml], grid={"learning_rate": [1e-3, 2e-3]},
                    variants=[{"name": "small", "n_layer": 2, "n_embd": 16}, {"name": "big", "n_layer": 6}])
    sw = R.load_sweep(f, {"max_iters": "9"}, tmp_path / "out")
    assert [r.name for r in sw.runs] == ["small_lr0.001", "small_lr0.002", "big_lr0.001", "big_lr0.002"]
    assert sw.keys == ["variant", "n_layer", "n_embd", "learning_rate"]
    big = sw.runs[3]
    assert (big.cfg.n_layer, big.cfg.n_embd, big.cfg.learning_rate, big.cfg.max_iters) == (6, 32, 2e-3, 9)
    assert big.swept == {"variant": "big", "n_layer": 6, "learning_rate": 2e-3}


def test_runs_share_a_wandb_group_when_logging(tmp_path: Path) -> None:
    f = write_sweep(tmp_path / "wb.toml", fixed={"wandb_log": True}, grid={"seed": [1, 2]})
    runs = R.load_sweep(f, {}, tmp_path).runs
    assert [(r.cfg.wandb_group, r.cfg.wandb_run_name) for r in runs] == [("wb", "wb/seed1"), ("wb", "wb/seed2")]
    assert "--wandb_group=wb" in S.command(runs[0], S.SweepOptions(), [], resume=False)
    quiet = R.load_sweep(write_sweep(tmp_path / "q.toml", grid={"seed": [1]}), {}, tmp_path).runs[0]
    assert quiet.cfg.wandb_group == "" and "wandb_group" not in quiet.overrides


def test_a_list_option_reaches_train_py_comma_separated_and_resumes(tmp_path: Path) -> None:
    from bookgpt.config import config_dict, parse_config
    from bookgpt.training import TrainConfig
    f = write_sweep(tmp_path / "d.toml", fixed={"distill_from": "out/a,out/b", "distill_weight": 0.5},
                    grid={"seed": [1]})
    run = R.load_sweep(f, {}, tmp_path).runs[0]
    cmd = S.command(run, S.SweepOptions(), [], resume=False)
    assert "--distill_from=out/a,out/b" in cmd
    assert parse_config(TrainConfig, cmd[2:]).distill_from == ("out/a", "out/b")  # train.py reads it back
    # config.json (JSON) holds the tuple as a list: the same config, so the run resumes rather than refusing
    run.out_dir.mkdir(parents=True)
    (run.out_dir / "config.json").write_text(json.dumps(config_dict(run.cfg)), encoding="utf-8")
    assert S.config_changes(run) == []


def test_plot_axes_are_the_variant_and_the_grid_keys(tmp_path: Path, base_toml: Path) -> None:
    f = write_sweep(tmp_path / "s.toml", [base_toml], grid={"learning_rate": [1e-3, 2e-3], "seed": [1]},
                    variants=[{"n_layer": 2, "n_embd": 16}, {"n_layer": 6}])
    sw = R.load_sweep(f, {}, tmp_path)
    assert [r.variant for r in sw.runs] == ["layer2_embd16", "layer2_embd16", "layer6", "layer6"]
    rows = [{"run": r.name, "status": "finished", "best_val_bpb": 2.0 + i, **r.swept} for i, r in enumerate(sw.runs)]
    rows[3]["status"] = "failed"
    done, axes = R.plot_dimensions(rows, sw)
    assert len(done) == 3 and axes == ["variant", "learning_rate"]  # seed has one value: no axis
    assert R.write_plot(tmp_path / "p.png", rows, sw) and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_unnamed_variants_are_named_by_their_values(tmp_path: Path) -> None:
    f = write_sweep(tmp_path / "t.toml", variants=[{"data_dir": "data/war_and_peace_char", "block_size": 256},
                                                    {"data_dir": "data/war_and_peace_bpe4096", "mlp": "swiglu"}])
    sw = R.load_sweep(f, {}, tmp_path)
    assert [r.name for r in sw.runs] == ["war_and_peace_char_ctx256", "war_and_peace_bpe4096_mlp-swiglu"]
    assert R.run_name({"learning_rate": 3e-4, "bias": False, "n_head": 8, "seed": 2}) == "lr0.0003_bias-false_head8_seed2"


def test_shipped_sweeps_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)  # their base paths are relative to the repository
    lr = R.load_sweep(ROOT / "config/sweeps/lr_size.toml", {}, tmp_path)
    assert len(lr.runs) == 6 and lr.runs[0].name == "small_muon_lr0.01" and lr.runs[0].cfg.max_minutes == 5.0
    tok = R.load_sweep(ROOT / "config/sweeps/tokenizers.toml", {}, tmp_path)
    assert [r.cfg.data_dir for r in tok.runs] == ["data/war_and_peace_char", "data/war_and_peace_byte",
                                                  "data/war_and_peace_bpe1024", "data/war_and_peace_bpe4096"]
    for path in sorted((ROOT / "config/sweeps").glob("*.toml")):  # every shipped sweep: each run's config is valid
        runs = R.load_sweep(path, {}, tmp_path).runs
        assert runs, path
        for r in runs:  # and its data is where prepare.py writes it by default
            assert "--out_dir" not in S.prepare_hint(r.cfg.data_dir), (path, r.cfg.data_dir)


# ----------------------------------------------------------------------------- bad sweep files

BAD = [
    ("[grid]\nlearnin_rate = [1e-3]", "unknown config key 'learnin_rate' in [grid]", "did you mean learning_rate"),
    ("[grid]\nlearning_rate = []", "[grid] learning_rate is an empty list", ""),
    ("[grid]\n", "[grid] is empty", ""),
    ("[grid]\nn_layer = [2, \"four\"]", "bad value for 'n_layer': 'four' is not a valid int", "[grid] of"),
    ("[grid]\nlearning_rate = 1e-3", "must be a list of values", ""),
    ("[grid]\nlearning_rate = [1e-3, 1e-3]", "repeats a value", ""),
    ("[fixed]\nmax_iters = 5", "nothing to sweep", ""),
    ("max_iters = 5\n[grid]\nseed = [1, 2]", "'max_iters' is a train.py key; put it under [fixed]", ""),
    ("grids = 1\n[grid]\nseed = [1]", "unknown config key 'grids'", "did you mean grid"),
    ("[fixed]\nout_dir = \"x\"\n[grid]\nseed = [1]", "'out_dir' is set by sweep.py", ""),
    ("[fixed]\nseed = 3\n[grid]\nseed = [1]", "'seed' is both in [fixed] and swept", ""),
    ("[grid]\nn_head = [2, 5]", "run head5: n_embd=256 must be divisible by n_head=5", ""),
    ("[grid]\nseed = [1]\n[[variants]]\nseed = 4", "'seed' is in both [grid] and [[variants]]", ""),
    ("[[variants]]\nname = \"a\"\nseed = 1\n[[variants]]\nseed = 2", "give every [[variants]] table a name", ""),
    ("[[variants]]\nseed = 1\n[[variants]]\nseed = 1", "would both be named 'seed1'", ""),
    ("[grid\nseed = [1]", "cannot parse sweep file", ""),
    ("base = [\"nope.toml\"]\n[grid]\nseed = [1]", "config file not found: nope.toml", ""),
]


@pytest.mark.parametrize("text,message,hint", BAD)
def test_bad_sweep_files_fail_before_anything_runs(text: str, message: str, hint: str, tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        S.main([str(f), f"--out_root={tmp_path / 'out'}"])
    assert message in str(e.value) and hint in str(e.value)
    assert not (tmp_path / "out").exists()


def test_command_line_errors(tmp_path: Path, base_toml: Path, tiny_char_data: Path) -> None:
    # real data, so the data check passes and each error below is the one that fires (as on a clean clone)
    f = write_sweep(tmp_path / "s.toml", [base_toml], fixed={"data_dir": str(tiny_char_data)}, grid={"seed": [1, 2]})
    for argv, message in [([str(f), "--dryrun"], "did you mean dry_run"), ([], "give one sweep file"),
                          ([str(f), "--seed=3"], "--seed on the command line would override a swept key"),
                          ([str(f), "--n_layer=x"], "bad value for 'n_layer'"),
                          ([str(f), "--nproc_per_node=2"], "must be divisible by --nproc_per_node=2")]:
        with pytest.raises(UserError) as e:
            S.main(argv + [f"--out_root={tmp_path / 'out'}"])
        assert message in str(e.value), argv


@pytest.mark.slow
def test_cli_prints_one_error_line_and_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[grid]\nn_layer = [2, \"four\"]\n", encoding="utf-8")
    p = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(f), f"--out_root={tmp_path / 'out'}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: [grid] of {f}: bad value for 'n_layer': 'four' is not a valid int"]


def test_missing_data_dir_names_the_prepare_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    f = write_sweep(tmp_path / "tok.toml", variants=[{"name": "bpe", "data_dir": str(data / "war_and_peace_bpe1024")},
                                                      {"name": "byte", "data_dir": "data/war_and_peace_byte"}])
    with pytest.raises(UserError) as e:
        S.main([str(f), f"--out_root={tmp_path / 'out'}"])
    assert (f"no prepared data in {data / 'war_and_peace_bpe1024'} (runs bpe): run python prepare.py --vocab_size=1024 "
            f"--out_dir={data / 'war_and_peace_bpe1024'}") in str(e.value)
    assert S.prepare_hint("data/war_and_peace_byte") == "python prepare.py --tokenizer=byte"
    assert S.prepare_hint("data/war_and_peace_bpe2048") == "python prepare.py"  # the presets' data: the defaults
    assert S.prepare_hint("data/war_and_peace_bpe512") == "python prepare.py --vocab_size=512"
    assert S.prepare_hint("data/war_and_peace_bpe") == "python prepare.py --out_dir=data/war_and_peace_bpe"
    assert S.prepare_hint("mybook") == "python prepare.py --tokenizer=KIND --input=YOUR_BOOK --out_dir=mybook"
    assert S.main([str(f), "--dry_run", f"--out_root={tmp_path / 'out'}"]) == 0  # a dry run only warns
    assert "warning: no prepared data in" in capsys.readouterr().out


def test_dry_run_lists_runs_and_commands_and_runs_nothing(tmp_path: Path, base_toml: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    f = write_sweep(tmp_path / "s.toml", [base_toml], grid={"learning_rate": [1e-3, 2e-3]})
    assert S.main([str(f), "--dry_run", "--max_minutes=0.5", "--nproc_per_node=1", f"--out_root={tmp_path / 'o'}"]) == 0
    out = capsys.readouterr().out
    assert "2 runs in" in out and "[1/2] lr0.001: start" in out and "[2/2] lr0.002: start" in out
    assert "torch.distributed.run --standalone --nproc_per_node=1" in out
    assert f"{base_toml} --learning_rate=0.002 --max_minutes=0.5 --out_dir={tmp_path / 'o' / 's' / 'lr0.002'}" in out
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- state on disk

def _metrics(d: Path, *records: dict, tail: str = "") -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


def test_run_state_finished_interrupted_new(tmp_path: Path) -> None:
    ev = {"kind": "eval", "iter": 10, "val_loss": 2.0, "val_bpb": 2.9}
    assert S.run_state(tmp_path / "none") == "new"
    _metrics(tmp_path / "a", ev, {"kind": "summary", "iter": 10, "reason": "max_minutes"}, tail='{"kind": "tr')
    assert S.run_state(tmp_path / "a") == "finished"  # a line cut by a kill is skipped
    _metrics(tmp_path / "b", ev, {"kind": "summary", "iter": 10, "reason": "signal"})
    assert S.run_state(tmp_path / "b") == "new"  # stopped by a signal before any checkpoint: start again
    (tmp_path / "b" / "ckpt.pt").write_bytes(b"")
    assert S.run_state(tmp_path / "b") == "interrupted"
    _metrics(tmp_path / "c", ev)
    (tmp_path / "c" / "ckpt.pt").write_bytes(b"")
    assert S.run_state(tmp_path / "c") == "interrupted"


def test_error_line_finds_the_reason(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("step 3\r 10%|#\rTraceback (most recent call last):\n  File x\nRuntimeError: boom\n[done]\n")
    assert S.error_line(log) == "RuntimeError: boom"
    log.write_text("loading\nerror: data/x/meta.json is corrupt\n")
    assert S.error_line(log) == "data/x/meta.json is corrupt"
    log.write_text("\n$ python train.py\nerror: an old attempt\n\n$ python train.py\nKilled\n")
    assert S.error_line(log) == "Killed"  # the last attempt's reason, not an earlier one's


# ----------------------------------------------------------------------------- end to end (tiny, CPU)

def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_run_sweep_end_to_end_then_skip_and_resume(tiny_char_data: Path, tmp_path: Path) -> None:
    f = write_sweep(tmp_path / "tiny.toml", fixed=tiny_fixed(tiny_char_data), grid={"learning_rate": [1e-3, 1e-2]})
    out = tmp_path / "out"
    assert S.main([str(f), f"--out_root={out}"]) == 0
    rows = _rows(out / "tiny" / "results.csv")
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert {r["run"] for r in rows} == {"lr0.001", "lr0.01"}
    assert float(rows[0]["best_val_bpb"]) <= float(rows[1]["best_val_bpb"])  # best first
    for r in rows:  # the numbers are the runs' own
        summary = [json.loads(l) for l in (out / "tiny" / r["run"] / "metrics.jsonl").read_text().splitlines()][-1]
        assert summary["kind"] == "summary" and int(r["best_iter"]) == summary["best_iter"]
        assert float(r["best_val_bpb"]) == pytest.approx(summary["best_val_bpb"], rel=1e-5)
        assert float(r["learning_rate"]) in (1e-3, 1e-2) and int(r["iters"]) == 20 and float(r["tokens_per_s"]) > 0
    md = (out / "tiny" / "results.md").read_text()
    assert "| 1 | `" + rows[0]["run"] + "` |" in md and "| 2 | `" + rows[1]["run"] + "` |" in md
    assert (out / "tiny" / "val_bpb.png").read_bytes()[:4] == b"\x89PNG"

    # again: both finished, nothing runs
    assert S.main([str(f), f"--out_root={out}"]) == 0
    records = {r: json.loads((out / "tiny" / r / "sweep_run.json").read_text()) for r in ("lr0.001", "lr0.01")}
    assert [rec["attempts"] for rec in records.values()] == [1, 1]

    # interrupt one (its last summary gone, ckpt.pt kept): the next sweep resumes only that one
    metrics = out / "tiny" / "lr0.01" / "metrics.jsonl"
    metrics.write_text("".join(l + "\n" for l in metrics.read_text().splitlines()[:-1]))
    assert S.run_state(out / "tiny" / "lr0.01") == "interrupted"
    assert S.main([str(f), f"--out_root={out}"]) == 0
    rec = json.loads((out / "tiny" / "lr0.01" / "sweep_run.json").read_text())
    assert rec["attempts"] == 2 and rec["resumed"] and rec["command"].endswith("--init_from=resume")
    assert json.loads((out / "tiny" / "lr0.001" / "sweep_run.json").read_text())["attempts"] == 1
    assert [r["status"] for r in _rows(out / "tiny" / "results.csv")] == ["finished", "finished"]

    # a changed config is not silently mixed with the old results
    with pytest.raises(UserError, match="trained with another config.*max_iters: 20 there vs 30 now"):
        S.main([str(f), f"--out_root={out}", "--max_iters=30"])
    # a key added to train.py after a run was trained is its default there, which kept the old behaviour
    saved = out / "tiny" / "lr0.001" / "config.json"
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "value_embeds"}))
    assert S.main([str(f), f"--out_root={out}", "--dry_run=true"]) == 0
    with pytest.raises(UserError, match="trained with another config.*value_embeds: 0 there vs 1 now"):
        S.main([str(f), f"--out_root={out}", "--value_embeds=1"])


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tiny_char_data: Path, tmp_path: Path) -> None:
    # the first run's context is longer than the tiny val split: train.py refuses it at start
    fixed = {k: v for k, v in tiny_fixed(tiny_char_data).items() if k != "block_size"}
    f = write_sweep(tmp_path / "fail.toml", fixed=fixed,
                    variants=[{"name": "huge", "block_size": 30_000}, {"name": "ok", "block_size": 32}])
    out = tmp_path / "out"
    assert S.main([str(f), f"--out_root={out}"]) == 1
    rows = _rows(out / "fail" / "results.csv")
    assert [(r["run"], r["status"]) for r in rows] == [("ok", "finished"), ("huge", "failed")]
    assert "not more than block_size=30000" in rows[1]["error"] and rows[1]["best_val_bpb"] == ""
    rec = json.loads((out / "fail" / "huge" / "sweep_run.json").read_text())
    assert rec["status"] == "failed" and rec["returncode"] == 2
    assert "failed: " in (out / "fail" / "results.md").read_text()


@pytest.mark.slow
def test_train_and_sweep_never_read_the_test_split(tiny_char_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Only evaluate.py reads test: with test.bin gone from disk after prepare.py, training and a sweep
    run as before, and evaluate.py asks for the test split in one line (or scores val when told to)."""
    import shutil

    import evaluate as E

    data = tmp_path / "data"
    shutil.copytree(tiny_char_data, data)
    (data / "test.bin").unlink()
    f = write_sweep(tmp_path / "notest.toml", fixed={**tiny_fixed(data), "max_iters": 6, "eval_interval": 3,
                                                     "ema_decay": 0.9}, grid={"seed": [1, 2]})
    out = tmp_path / "out"
    assert S.main([str(f), f"--out_root={out}"]) == 0
    rows = _rows(out / "notest" / "results.csv")
    assert [r["status"] for r in rows] == ["finished", "finished"] and all(float(r["best_ema_val_bpb"]) > 0 for r in rows)
    assert "| val bpb | average's val bpb |" in (out / "notest" / "results.md").read_text()  # the weight average's best
    run = out / "notest" / _rows(out / "notest" / "results.csv")[0]["run"]
    with pytest.raises(UserError, match=rf"^no test split in {data}: {data / 'test.bin'} is missing; prepare.py "
                                        r"writes one by default \(data prepared without one: prepare it again, or "
                                        r"evaluate --split=val\)$"):
        E.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false"])
    ev = E.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--split=val"])
    assert list(ev["splits"]) == ["val"] and ev["data"]["split"] == "val"
    ema = E.main([f"--out_dir={run}", "--num_prompts=0", "--baselines=false", "--split=val", "--ckpt=ema"])
    assert ema["run"]["checkpoint"] == "ema.pt" and ema["likelihood"]["bpb"] != ev["likelihood"]["bpb"]
    # each checkpoint's evaluation has its own files: the best's eval.json is still the best's
    assert json.loads((run / "eval.json").read_text())["run"]["checkpoint"] == "best.pt"
    assert json.loads((run / "eval_ema.json").read_text())["run"]["checkpoint"] == "ema.pt" and (run / "report_ema.md").is_file()


def test_the_shipped_lr_sweep_sweeps_the_rate_its_optimizer_uses(tmp_path: Path) -> None:
    """The CPU preset trains its hidden matrices with Muon: AdamW's learning_rate barely matters there."""
    sw = R.load_sweep(ROOT / "config/sweeps/lr_size.toml", {}, tmp_path)
    assert {r.cfg.optimizer for r in sw.runs} == {"muon"} and "muon_lr" in sw.keys and "learning_rate" not in sw.keys
    assert sorted({r.cfg.muon_lr for r in sw.runs}) == [0.01, 0.02, 0.04]
