# bookgpt: `make demo` trains and samples a small War and Peace model on the CPU; `make test` runs the suite.
PY ?= python3
# Offline? Point BOOK at a local copy of the Gutenberg file: make demo BOOK=../shared/data/pg2600.txt
BOOK ?=
PREPARE_INPUT = $(if $(BOOK),--input=$(BOOK),)

.PHONY: install dev test test-fast demo speedrun gpu-check colab clean

RUN ?= out/wp_bpe_cpu

# Install only what is missing. pip is asked offline first (--no-index): a machine that already has everything
# (a GPU box's own CUDA torch in the supported range included) is left as it is and never reaches the network;
# otherwise pip adds what is missing and keeps what satisfies the requirements.
PIP_MISSING = $(PY) -m pip install -q --no-index $(1) >/dev/null 2>&1 || $(PY) -m pip install $(1) \
  || { echo "error: pip could not install what is missing ($(1)); offline? bring wheels: docs/training.md, 'A GPU machine without internet'" >&2; exit 2; }

install:
	@$(call PIP_MISSING,-r requirements.txt)

dev: install
	@$(call PIP_MISSING,-r requirements-dev.txt -r requirements-app.txt)

# the book and GPT-2's BPE files: ../shared, $$BOOKGPT_BOOK/$$BOOKGPT_GPT2_DIR, or fetched once into data/raw/testdata
test: dev
	$(PY) tests/testdata.py
	$(PY) -m pytest -q tests

# the inner loop: everything but the tests that start processes (about 1 minute on 2 cores)
test-fast: dev
	$(PY) tests/testdata.py
	$(PY) -m pytest -q -m "not slow" tests

# prepare the book (prepare.py's defaults: a 2048-token BPE learned from it), train the 2-core CPU preset (~10 min),
# evaluate it (the sampling temperature chosen on val prompts), and write three samples at that temperature
# (a second make demo stops rather than overwrite the trained run: make clean first to retrain).
# A quick try (compiling would take longer than 20 steps): make demo TRAIN_FLAGS="--max_iters=20 --compile=false" EVAL_FLAGS="--num_prompts=4 --baselines=false"
TRAIN_FLAGS ?=
EVAL_FLAGS ?=
demo: install
	$(PY) prepare.py $(PREPARE_INPUT) \
	  || { echo "offline? point at a local copy of the book: make demo BOOK=path/to/pg2600.txt" >&2; exit 2; }
	$(PY) train.py config/wp_bpe_cpu.toml --out_dir=$(RUN) $(TRAIN_FLAGS)
	$(PY) evaluate.py --out_dir=$(RUN) --num_prompts=64 --temperature=0.6,0.65,0.7,0.75,0.8,0.9 $(EVAL_FLAGS)
	$(PY) sample.py --out_dir=$(RUN) --num_samples=3 --max_new_tokens=400 \
	  --prompt="Prince Andrew looked at Pierre and"

# minutes of training steps to 1.60 bpb on val (config/speedrun_cpu.toml), confirmed on test; --overwrite=true reruns it
speedrun: install
	$(PY) prepare.py $(PREPARE_INPUT) \
	  || { echo "offline? point at a local copy of the book: make speedrun BOOK=path/to/pg2600.txt" >&2; exit 2; }
	$(PY) bench.py config/speedrun_cpu.toml --speedrun=true --sample_tokens=0 --out=out/speedrun_cpu.json

# on a GPU machine: prepare, bench, train bf16/fp16 with a SIGTERM resume, DDP, sample, evaluate, app;
# writes out/gpu_check/report.md and report.json, exit status 1 if a check failed. Installs nothing (it names
# what is missing); CHECKS=bench, train or use runs one part (each under 5 minutes), the report merges them.
# No GPU? python gpu_check.py --device=cpu --tiny
CHECKS ?=
gpu-check:
	$(PY) gpu_check.py $(PREPARE_INPUT)$(if $(CHECKS), --checks=$(CHECKS),)

# the committed code as one zip for Colab: upload it in notebooks/bookgpt_colab.ipynb's first cell
colab:
	mkdir -p dist && git archive --format=zip -o dist/bookgpt.zip HEAD
	@echo "wrote dist/bookgpt.zip (HEAD): open notebooks/bookgpt_colab.ipynb in Colab and upload it in the first cell"

clean:
	rm -rf $(RUN)
