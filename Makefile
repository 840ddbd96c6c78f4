# Two entry points, each bootstrapping its own virtual environment (.venv) from pyproject.toml.
#   make run   - the default federated MEKD run on Fashion-MNIST (extra settings: make run ARGS="alpha=0.1")
#   make test  - lint (ruff check + format check), the import contracts (lint-imports, pyproject's
#                [tool.importlinter]), then the test suite (with the documentation's strict build)
#   make docs  - the documentation site (MkDocs, docs/) built into site/;  make docs-serve: on 127.0.0.1:8000
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mekd-stamp
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: run test test-fast test-slow bench bench-gpu data venv clean docs docs-serve

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The offline default data set comes from Debian, and deploy-local needs openssl and ssh-keygen
# (TLS certificates, SuperNode keys), and the documentation's browser test needs Debian's chromium and
# chromedriver; install what is missing when we may (root, apt present).
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or pass ARGS=\"download=true\""; fi; \
	fi
	@if ! command -v openssl >/dev/null || ! command -v ssh-keygen >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl openssh-client; \
	  else echo "openssl or ssh-keygen missing (mekd-fl deploy-local needs them): sudo apt-get install openssl openssh-client"; fi; \
	fi
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else echo "chromium or chromedriver missing (the docs' browser test needs them): sudo apt-get install chromium chromium-driver"; fi; \
	fi

run: $(STAMP) data
	$(VENV)/bin/mekd-fl run $(ARGS)

test: $(STAMP) data
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -q

test-slow: $(STAMP) data
	$(PY) -m pytest -q -m slow

bench: $(STAMP) data
	$(PY) experiments/bench_step.py

# The GPU figures in one command (8 minutes on one GPU; refuses in one line without CUDA): docs/gpus.md
bench-gpu: $(STAMP) data
	$(PY) experiments/bench_gpu.py $(ARGS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
	@echo "Documentation built: open file://$(CURDIR)/site/index.html"

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict -a 127.0.0.1:8000

clean:
	rm -rf $(VENV) .pytest_cache site
