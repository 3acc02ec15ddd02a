# difflm developer targets. `make test` and `make quickstart` work on a fresh machine (they create .venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; on a GPU machine install the CUDA build of torch first and skip the pin.
TORCH ?= torch==2.13.0
QUICK := model.n_layer=4 model.n_head=4 model.n_embd=128 model.dropout=0.1 data.block_size=128 \
	train.batch_size=32 train.max_steps=1000 train.eval_every=250 train.eval_batches=10 train.save_every=250 \
	train.precision=bf16 train.output_dir=runs/quickstart

.PHONY: install test test-slow quickstart bench lint

$(BIN)/difflm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[all]"
	touch $(BIN)/difflm

install: $(BIN)/difflm

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

quickstart: install
	$(BIN)/difflm train shakespeare_char $(QUICK)
	$(BIN)/difflm eval runs/quickstart --max-batches 20
	$(BIN)/difflm sample runs/quickstart --prompt "ROMEO:" --gen-length 96 --steps 48 --animate runs/quickstart/sample.gif

bench: install
	$(BIN)/python benchmarks/train_step.py --small
	$(BIN)/python benchmarks/sampling.py --quick

lint: install
	$(BIN)/ruff check src tests benchmarks
