# bookgpt: `make demo` trains and samples a small War and Peace model on the CPU; `make test` runs the suite.
PY ?= python3
# Offline? Point BOOK at a local copy of the Gutenberg file: make demo BOOK=../shared/data/pg2600.txt
BOOK ?=
PREPARE_INPUT = $(if $(BOOK),--input=$(BOOK),)

.PHONY: install dev test demo clean

install:
	$(PY) -c "import torch, numpy, tiktoken, rustbpe, requests, tqdm, matplotlib" 2>/dev/null \
	  || $(PY) -m pip install -r requirements.txt

dev: install
	$(PY) -c "import pytest, hypothesis" 2>/dev/null || $(PY) -m pip install -r requirements-dev.txt

test: dev
	$(PY) -m pytest -q tests

clean:
	rm -rf out/demo
