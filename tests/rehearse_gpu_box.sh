#!/usr/bin/env bash
# A rehearsal, on a CPU machine, of the GPU box a user really has: Python 3.12, a torch of the supported range
# already installed (not the newest), no rustbpe, and no network. It checks that nothing tries to install or
# download what is there, and that what is missing is said in one line:
#   1. make gpu-check: the one "no CUDA GPU" line, and no pip;
#   2. gpu_check.py --device=cpu --tiny with no prepared data: the one line naming rustbpe and its wheel;
#   3. the carried rustbpe wheel installed offline, then gpu_check.py --device=cpu --tiny: every check passes;
#   4. make demo on a few steps (install, prepare, train, evaluate, sample), offline;
#   5. the Colab notebook, top to bottom, in its tiny setting, offline.
#
#   bash tests/rehearse_gpu_box.sh                       # torch 2.11.0 in /tmp/gpu_box/venv (made online, once)
#   TORCH=2.13.0 VENV=/tmp/venv213 bash tests/rehearse_gpu_box.sh
#
# Online only to set up, as the box's image was: the venv (torch, numpy, tiktoken, matplotlib, requests, tqdm;
# nbclient and ipykernel for the notebook) and rustbpe's wheel in wheels/, which the user brings. Then every step
# runs in a network namespace of its own (unshare -n: loopback only, for torchrun), from a clean clone of HEAD.
# Needs root (unshare), pyenv's Python 3.12 (or PYTHON=...), make, git; about 10 minutes on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH=${TORCH:-2.11.0}
WORK=${WORK:-/tmp/gpu_box}
VENV=${VENV:-$WORK/venv}
PYTHON=${PYTHON:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12}
BOOK=${BOOK:-$ROOT/../shared/data/pg2600.txt}
say() { printf '\n== %s\n' "$*"; }
fail() { echo "REHEARSAL FAILED: $*" >&2; exit 1; }
offline() { unshare -n bash -c 'ip link set lo up && cd "$0" && PATH="$1/bin:$PATH" && shift && "$@"' "$WORK/repo" "$VENV" "$@"; }

say "setup (online): a venv with torch $TORCH and what a GPU image has, rustbpe's and scikit-learn's wheels to carry"
mkdir -p "$WORK"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==$TORCH" numpy tiktoken matplotlib requests tqdm nbclient nbformat ipykernel
"$VENV/bin/python" -m pip uninstall -q -y rustbpe scikit-learn 2>/dev/null || true  # the box has neither
"$VENV/bin/python" -m pip download -q rustbpe scikit-learn --only-binary=:all: -d "$WORK/wheels"
cp "$BOOK" "$WORK/pg2600.txt"
rm -rf "$WORK/repo" && git clone -q "$ROOT" "$WORK/repo"
"$VENV/bin/python" -c "import sys, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__)"

say "1. make gpu-check on a machine without a GPU: one line, no pip"
set +e
offline make --no-print-directory gpu-check PY=python BOOK="$WORK/pg2600.txt" > "$WORK/1.out" 2> "$WORK/1.err"
rc=$?
set -e
cat "$WORK/1.out" "$WORK/1.err"
[ "$rc" = 2 ] || fail "make gpu-check exited $rc, not 2"
grep -q "^error: no CUDA GPU here" "$WORK/1.err" || fail "no 'no CUDA GPU' line"
[ "$(grep -c '^error:' "$WORK/1.err")" = 1 ] || fail "more than one error line"
! grep -qi "pip\|Collecting\|Downloading" "$WORK/1.out" "$WORK/1.err" || fail "make gpu-check ran pip"

say "2. gpu_check.py --device=cpu --tiny without rustbpe and without prepared data: the one line that says so"
set +e
offline python gpu_check.py --device=cpu --tiny --input="$WORK/pg2600.txt" > "$WORK/2.out" 2> "$WORK/2.err"
rc=$?
set -e
cat "$WORK/2.err"
[ "$rc" = 2 ] && grep -q "^error: rustbpe is not installed" "$WORK/2.err" || fail "no one-line rustbpe error (exit $rc)"

say "3. the carried wheels, installed offline; then every check a CPU can make"
offline python -m pip install -q --no-index --find-links="$WORK/wheels" rustbpe scikit-learn
offline python gpu_check.py --device=cpu --tiny --input="$WORK/pg2600.txt" --steps=40 | tee "$WORK/3.out"
grep -q "^app .*passed" "$WORK/3.out" || fail "gpu_check.py --device=cpu --tiny did not pass"

say "4. make demo on a few steps, offline (install finds everything here)"
offline make --no-print-directory demo PY=python BOOK="$WORK/pg2600.txt" \
  TRAIN_FLAGS="--max_iters=20 --eval_interval=10 --eval_iters=4 --compile=false" \
  EVAL_FLAGS="--num_prompts=4 --gen_tokens=40 --temperature=0.9 --baselines=false" 2>&1 | tr '\r' '\n' \
  | grep -v "it/s\]\|s/it\]" | tee "$WORK/4.out"
grep -q "^---------- sample 3 of 3" "$WORK/4.out" || fail "make demo wrote no samples"
! grep -qi "Collecting\|Downloading\|downloading" "$WORK/4.out" || fail "make demo installed or downloaded"

say "5. the Colab notebook, tiny, offline"
offline env BOOKGPT_NOTEBOOK_TINY=1 BOOKGPT_BOOK="$WORK/pg2600.txt" BOOKGPT_NOTEBOOK_WORK="$WORK/notebook" python -c '
import nbformat
from nbclient import NotebookClient
nb = nbformat.read("notebooks/bookgpt_colab.ipynb", as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
assert "pip install" not in text and "Collecting" not in text, "the notebook installed something"
print("notebook ran top to bottom:", len(nb.cells), "cells")'

say "the GPU box rehearsal passed: torch $TORCH, $("$VENV/bin/python" --version), no network, in ${SECONDS} s"
