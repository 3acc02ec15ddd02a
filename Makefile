# difflm developer targets. `make test` and `make quickstart` work on a fresh machine (they create .venv).
# Installs go through requirements.lock (the exact versions the suite passed with); `make lock`
# regenerates it from a clean venv, `make test-latest` tries the newest versions pyproject allows.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# The CPU wheel of torch; on a GPU machine install the CUDA build of torch first and skip the pin.
TORCH ?= torch==2.13.0
# Tiny Shakespeare on 2 CPU cores in a few minutes (fp32: bf16 only pays on CPUs with AVX512-BF16):
# an AR model first, then block diffusion (BD3, blocks of 4) started from its weights with Dream's
# shifted head, sampled left to right inside each block; then the same sampling on the zoo model.
QUICK_SHAPE := model.n_layer=4 model.n_head=4 model.n_embd=128 model.dropout=0.0 data.block_size=128 \
	train.batch_size=16 train.precision=fp32 train.eval_batches=5 train.overwrite=true
QUICK_AR := $(QUICK_SHAPE) train.max_steps=1000 train.warmup_steps=50 train.lr=2e-3 train.min_lr=2e-4 \
	train.eval_every=250 train.save_every=1000 train.output_dir=runs/quickstart_ar
QUICK := diffusion.block_length=4 diffusion.t_eps=0.3 diffusion.t_max=0.8 model.logits_shift=1 $(QUICK_SHAPE) \
	train.max_steps=300 train.warmup_steps=30 train.lr=1e-3 train.min_lr=1e-4 train.eval_every=100 \
	train.save_every=300 train.init_from=runs/quickstart_ar train.output_dir=runs/quickstart
QUICK_SAMPLE := --prompt "ROMEO:" --prompt "JULIET:" --gen-length 96 --temperature 0.3 --remasking left_to_right \
	--cache prefix --word-check shakespeare

.PHONY: install test test-slow test-latest lock quickstart bench lint

$(BIN)/difflm: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH)"
	$(BIN)/pip install -q -c $(LOCK) -e ".[all]"
	touch $(BIN)/difflm

install: $(BIN)/difflm

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

quickstart: install
	$(BIN)/difflm train shakespeare_char_ar $(QUICK_AR)
	$(BIN)/difflm train shakespeare_char $(QUICK)
	$(BIN)/difflm eval runs/quickstart --max-batches 20
	$(BIN)/difflm sample runs/quickstart $(QUICK_SAMPLE) --animate runs/quickstart/sample.gif
	$(BIN)/difflm sample zoo/shakespeare_char_bd3_4_from_ar $(QUICK_SAMPLE)

bench: install
	$(BIN)/python benchmarks/train_step.py --small
	$(BIN)/python benchmarks/sampling.py --quick

lint: install
	$(BIN)/ruff check src tests benchmarks

# Regenerate the lock: newest versions pyproject allows, in a clean venv (run `make test` after it).
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q "$(TORCH)"
	.venv-lock/bin/pip install -q -e ".[all]"
	.venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' > $(LOCK)
	rm -rf .venv-lock

# The suite on the newest versions pyproject allows (ignores the lock): drift shows here first.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q "$(TORCH)"
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[all]"
	.venv-latest/bin/pip list --format=freeze | grep -iE '^(torch|transformers|tokenizers|numpy|safetensors)=='
	.venv-latest/bin/python -m pytest
