"""config.py: defaults <- TOML files <- --key=value, with types and clear errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bookgpt.config import UserError, atomic_write_bytes, config_dict, parse_config, split_argv
from model import GPTConfig
from prepare import PrepareConfig
from bookgpt.tokenizer import default_data_dir
import train as train_mod
from train import TrainConfig, validate

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_defaults_then_files_in_order_then_overrides(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('n_layer = 3\nlearning_rate = 0.01\nout_dir = "out/a"\n')
    b.write_text("n_layer = 5\ncompile = true\n")
    cfg = parse_config(TrainConfig, [str(a), str(b), "--learning_rate=3e-4", "--n_embd", "64"])
    assert cfg.n_layer == 5               # b.toml beats a.toml
    assert cfg.learning_rate == 3e-4      # the command line beats both
    assert cfg.n_embd == 64               # "--key value" form
    assert cfg.out_dir == "out/a" and cfg.compile is True
    assert cfg.n_head == TrainConfig().n_head  # untouched: the default


def test_types_come_from_the_dataclass() -> None:
    cfg = parse_config(TrainConfig, ["--max_iters=1e3", "--dropout=0", "--bias=yes", "--wandb_log"])
    assert cfg.max_iters == 1000 and isinstance(cfg.max_iters, int)
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)
    assert cfg.bias is True and cfg.wandb_log is True


@pytest.mark.parametrize("argv, message", [
    (["--n_layers=3"], "unknown config key 'n_layers'.*did you mean n_layer"),
    (["--learning_rat=1"], "did you mean learning_rate"),
    (["--n_layer=three"], "bad value for 'n_layer': 'three' is not a valid int"),
    (["--max_iters=2.5"], "bad value for 'max_iters'"),
    (["--compile=maybe"], "bad value for 'compile'"),
    (["notes.txt"], "unexpected argument"),
    (["missing.toml"], "config file not found"),
])
def test_errors_name_the_key_and_the_fix(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_config(TrainConfig, argv)


def test_toml_type_mismatch_and_unknown_key_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('n_layer = "six"\n')
    with pytest.raises(UserError, match="'n_layer'.*not a valid int"):
        parse_config(TrainConfig, [str(bad)])
    bad.write_text("batch_sise = 4\n")
    with pytest.raises(UserError, match=f"batch_sise.*{bad.name}.*batch_size"):
        parse_config(TrainConfig, [str(bad)])
    bad.write_text("[model]\nn_layer = 2\n")
    with pytest.raises(UserError, match="flat"):
        parse_config(TrainConfig, [str(bad)])
    bad.write_text("n_layer = = 2\n")
    with pytest.raises(UserError, match="cannot parse"):
        parse_config(TrainConfig, [str(bad)])


def test_config_files_are_data_not_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.toml"
    evil.write_text(f'out_dir = "__import__(\'os\').system(\'touch {marker}\')"\n')
    cfg = parse_config(TrainConfig, [str(evil)])
    assert cfg.out_dir.startswith("__import__") and not marker.exists()


@pytest.mark.slow
def test_cli_prints_one_error_line_and_exits_2() -> None:
    r = subprocess.run([sys.executable, "train.py", "--n_layr=2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown config key 'n_layr' on the command line; did you mean n_layer, min_lr, muon_lr?"]


@pytest.mark.slow
def test_help_lists_every_key() -> None:
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for key in ("--n_layer", "--early_stop_patience", "--max_minutes", "--data_dir", "--wandb_log"):
        assert key in r.stdout


def test_presets_parse_and_build() -> None:
    for preset in sorted((ROOT / "config").glob("*.toml")):
        cfg = parse_config(TrainConfig, [str(preset)])
        validate(cfg)
        GPTConfig.from_dict({**config_dict(cfg), "vocab_size": 104})  # the model's own checks


def test_python_train_py_alone_trains_the_cpu_preset() -> None:
    """The defaults are config/wp_bpe_cpu.toml's recipe, its three architecture levers included."""
    assert config_dict(TrainConfig()) == config_dict(parse_config(TrainConfig, [str(ROOT / "config/wp_bpe_cpu.toml")]))


def test_make_demo_prepares_what_its_preset_trains_and_samples_where_the_scripts_look() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    prepare_args = re.search(r"prepare\.py (.*?)\$\(PREPARE_INPUT\)", recipe).group(1).split()
    prep = parse_config(PrepareConfig, prepare_args)
    preset = re.search(r"train\.py (config/\S+\.toml) --out_dir=\$\(RUN\)", recipe).group(1)
    cfg = parse_config(TrainConfig, [str(ROOT / preset)])
    assert (prep.tokenizer, prep.vocab_size) == ("bpe", 2048)
    # python prepare.py writes where the preset and python train.py read
    assert not prep.out_dir and default_data_dir(prep.tokenizer, prep.vocab_size) == cfg.data_dir == TrainConfig().data_dir
    run = re.search(r"^RUN \?= (\S+)$", makefile, re.M).group(1)
    assert run == cfg.out_dir == TrainConfig().out_dir  # make demo trains where python train.py would
    assert (cfg.max_iters, cfg.max_minutes) == (600, 0.0)  # a step budget: the same run on any machine


def test_split_argv_and_atomic_write(tmp_path: Path) -> None:
    files, over = split_argv(["a.toml", "--x=1", "--flag", "--y", "2"])
    assert files == ["a.toml"] and over == {"x": "1", "flag": "true", "y": "2"}
    target = tmp_path / "f.json"
    atomic_write_bytes(target, json.dumps({"a": 1}).encode())
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_hints_a_near_miss_preset_and_help_shows_the_files_values(capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=r"config file not found: config/wp_bpe_cpuu.toml; did you mean config/wp_bpe_cpu.toml\?"):
        parse_config(TrainConfig, ["config/wp_bpe_cpuu.toml"])
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["config/wp_char_cpu.toml", "--seed=7", "--help"], prog="train.py")
    out = capsys.readouterr().out
    assert "--n_layer=4 " in out and "--data_dir='data/war_and_peace_char'" in out and "--seed=7 " in out


def test_learning_rate_settings_that_contradict_each_other(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError, match=r"min_lr=0.01 is above learning_rate=0.001: the schedule would rise"):
        train_mod.validate(TrainConfig(learning_rate=1e-3, min_lr=1e-2))
    train_mod.validate(TrainConfig(max_iters=20))  # a short trial: allowed (train.py warns as it starts)


@pytest.mark.slow
def test_help_into_a_closed_pipe_is_quiet() -> None:
    """`python train.py --help | head -3`: the reader goes away; no BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "train.py", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before train.py has imported torch: every write finds the pipe closed
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and err == "", err


def test_a_runs_config_json_is_a_config_file(tmp_path: Path) -> None:
    """The errors say "use the run's config (out_dir/config.json)": it is accepted as TOML is."""
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(config_dict(TrainConfig(n_layer=3, learning_rate=5e-4))))
    cfg = parse_config(TrainConfig, [str(saved), "--seed=9"])
    assert (cfg.n_layer, cfg.learning_rate, cfg.seed) == (3, 5e-4, 9)
    saved.write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a JSON object of key: value pairs"):
        parse_config(TrainConfig, [str(saved)])


def test_make_install_asks_pip_offline_first_and_keeps_a_torch_in_range() -> None:
    """A GPU box's own CUDA torch stays: requirements.txt gives torch a lower bound, not a pin, and make asks pip
    with --no-index first, so a machine that has everything installs nothing and never reaches the network."""
    torch_lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("torch")]
    assert torch_lines == ["torch>=2.11"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # under `make test`: not a sub-make
    r = subprocess.run(["make", "--no-print-directory", "-n", "dev", "PY=python3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [l.split(" || ")[0] for l in lines] == [
        "python3 -m pip install -q --no-index -r requirements.txt >/dev/null 2>&1",
        "python3 -m pip install -q --no-index -r requirements-dev.txt -r requirements-app.txt >/dev/null 2>&1"]
