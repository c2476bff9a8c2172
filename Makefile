# bookgpt: `make demo` trains and samples a small War and Peace model on the CPU; `make test` runs the suite.
PY ?= python3
# Offline? Point BOOK at a local copy of the Gutenberg file: make demo BOOK=../shared/data/pg2600.txt
BOOK ?=
PREPARE_INPUT = $(if $(BOOK),--input=$(BOOK),)

.PHONY: install dev test test-fast demo speedrun gpu-check colab clean

RUN ?= out/wp_bpe_cpu

install:
	$(PY) -c "import torch, numpy, tiktoken, rustbpe, requests, tqdm, matplotlib" 2>/dev/null \
	  || $(PY) -m pip install -r requirements.txt

dev: install
	$(PY) -c "import pytest, hypothesis, playwright, nbclient, ipykernel, gradio" 2>/dev/null \
	  || $(PY) -m pip install -r requirements-dev.txt -r requirements-app.txt

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
# (a second make demo stops rather than overwrite the trained run: make clean first to retrain)
demo: install
	$(PY) prepare.py $(PREPARE_INPUT) \
	  || { echo "offline? point at a local copy of the book: make demo BOOK=path/to/pg2600.txt" >&2; exit 2; }
	$(PY) train.py config/wp_bpe_cpu.toml --out_dir=$(RUN)
	$(PY) evaluate.py --out_dir=$(RUN) --num_prompts=64 --temperature=0.6,0.65,0.7,0.75,0.8,0.9
	$(PY) sample.py --out_dir=$(RUN) --num_samples=3 --max_new_tokens=400 \
	  --prompt="Prince Andrew looked at Pierre and"

# minutes of training steps to 1.60 bpb on val (config/speedrun_cpu.toml), confirmed on test; --overwrite=true reruns it
speedrun: install
	$(PY) prepare.py $(PREPARE_INPUT) \
	  || { echo "offline? point at a local copy of the book: make speedrun BOOK=path/to/pg2600.txt" >&2; exit 2; }
	$(PY) bench.py config/speedrun_cpu.toml --speedrun=true --sample_tokens=0 --out=out/speedrun_cpu.json

# on a GPU machine: prepare, bench, train bf16/fp16 with a SIGTERM resume, DDP, sample, evaluate, app;
# writes out/gpu_check/report.md and report.json, exit status 1 if a check failed. Sized for under 8 minutes
# on one H100/A100/4090 (not yet timed on one); no GPU? python gpu_check.py --device=cpu --tiny
gpu-check: install
	$(PY) gpu_check.py $(PREPARE_INPUT)

# the committed code as one zip for Colab: upload it in notebooks/bookgpt_colab.ipynb's first cell
colab:
	mkdir -p dist && git archive --format=zip -o dist/bookgpt.zip HEAD
	@echo "wrote dist/bookgpt.zip (HEAD): open notebooks/bookgpt_colab.ipynb in Colab and upload it in the first cell"

clean:
	rm -rf $(RUN)
