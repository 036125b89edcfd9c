# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build on these machines; on a GPU cluster install your CUDA torch into the venv first
# (then this line finds it already satisfied).
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= artifacts/data/stdlib

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

demo: setup
	$(BIN)/python -m data.prepare --out $(DATA_DIR) --vocab-size 4096
	$(BIN)/python -m train --config configs/demo.yaml --resume

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy model parallel data train launch benchmarks

test: lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pytest -q -m "bench or slow"
	$(BIN)/python -m benchmarks.attention
	$(BIN)/python -m benchmarks.encoder_hf
	$(BIN)/python -m benchmarks.context_parallel
	$(BIN)/python -m benchmarks.cp_overlap
	$(BIN)/python -m benchmarks.data
	$(BIN)/python -m benchmarks.passkey_paths
	$(BIN)/python -m benchmarks.cp_scale

clean:
	rm -rf $(VENV) artifacts runs .pytest_cache .mypy_cache .ruff_cache
