# cpjump1 — two commands for a fresh machine: `make demo` and `make test`.
# Every set-up step lives here (and in mk/*.mk, one file per stage environment).

SHELL := /bin/bash
.DEFAULT_GOAL := help
PY311 ?= $(shell PYENV_VERSION=3.11 command -v python3.11 2>/dev/null || command -v python3.11 || command -v python3)
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/uv/bin/uv)
VENV := .venv
RUN := $(UV) run --frozen --no-sync
export UV_COMPILE_BYTECODE := 1
export UV_LINK_MODE := copy

# Environments the whole test suite needs; mk/*.mk files append theirs.
TEST_ENVS := env
DEMO_ENVS := env

include $(sort $(wildcard mk/*.mk))

.PHONY: help env test demo lint clean-envs

help:
	@echo "make demo   # set up and run a synthetic plate through the whole pipeline"
	@echo "make test   # set up and run the whole test suite"

$(UV):
	$(PY311) -m venv $(CURDIR)/.tools/uv
	$(CURDIR)/.tools/uv/bin/pip install --quiet uv==$(UV_VERSION)

# Orchestration / profiling / benchmark environment (Python 3.11, from uv.lock).
$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --all-extras --python $(PY311)
	@touch $@

env: $(VENV)/.synced

test: $(TEST_ENVS)
	$(RUN) pytest

demo: $(DEMO_ENVS)
	$(RUN) python -m cpjump1.demo

clean-envs:
	rm -rf $(VENV) .venvs .tools
