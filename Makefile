# The two quick-start commands: `make demo` and `make test`.
# Each sets up a virtualenv in .venv on first use (plain pip; torch from the
# versions the project is tested with), then runs.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

$(BIN)/lis: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/lis

demo: $(BIN)/lis
	WANDB_MODE=offline $(BIN)/lis demo

test: $(BIN)/lis
	WANDB_MODE=offline $(BIN)/python -m pytest -q

.PHONY: install demo test
