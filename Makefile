# Two commands do all setup:  `make serve` (install + serve the built-in tiny model over HTTP and gRPC)
# and `make test` (install + lint + the whole test suite). Lint is ruff, pyright and the import-linter contracts,
# all configured in pyproject.toml. TORCH pins the CPU build; GPU users pass their own.
#
# The GPU check, for a lent GPU box (one H100, offline, 15 minutes; torch, transformers, safetensors,
# sentencepiece and numpy installed, no Ray): `make gpu-wheels` here downloads the other wheels the in-process
# (W = 0) path needs into gpu-wheels/ (CPython 3.12, under 64 MiB); then, through the device tool, carrying
# gpu-wheels, `make gpu-check` there installs the missing ones beside the repo, runs pytest tests/gpu (bf16 parity
# with transformers, attention backend, quantized-expert kernels) and a W = 0 `mixserve bench engine` on CUDA, in at most 8 minutes, and
# writes gpu-check.json into $OUT (else gpu-check-results/). Without CUDA it skips both and exits 0. Device tool:
# run(command="make gpu-check", carry=["gpu-wheels"], timeout_s=510). Options (GPU_CHECK_ARGS, e.g. --rehearse to
# try it on a CPU, --bench-args "..."): deploy/gpu-check/gpu_check.py.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
GPU_PYTHON ?= python3
GPU_WHEELS ?= gpu-wheels
GPU_CHECK_ARGS ?=

.PHONY: install serve test lint bench clean gpu-wheels gpu-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/mixserve serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright --project pyproject.toml  # this project's settings, whatever config a parent folder holds
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

gpu-wheels:
	python3 deploy/gpu-check/download_wheels.py --dest $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) deploy/gpu-check/gpu_check.py --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info gpu-check-site gpu-check-results
