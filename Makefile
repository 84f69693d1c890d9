# Every target makes its own virtual environment on a fresh machine.
# GPU users: `make install TORCH=torch` (or any pip spec) to get a CUDA build instead of the local CPU wheel.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
RECIPES := $(basename $(notdir $(wildcard recipes/*.toml)))

.PHONY: install run test lint bench clean $(addprefix recipe-,$(RECIPES))

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# A time budget, not a step count, keeps `make run` under 5 minutes on any 2-core machine: 4 minutes of training
# (the schedule's horizon is estimated from the measured step time), plus tokenizer, cache and the final eval.
run: install
	$(BIN)/pretrain run --objective clm --max-time 4m

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pretrain objectives models benchmarks tests

bench: install
	$(BIN)/pretrain bench

$(addprefix recipe-,$(RECIPES)): recipe-%: install
	$(BIN)/pretrain run --recipe $*

clean:
	rm -rf $(VENV) runs data/cache report
