# bkd: one-command set-up. `make demo` runs the default search, `make test` the test suite and the docs build,
# `make docs` serves the docs site.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build (on these machines `torch==2.13.0` installs it from local disk);
# GPU machines (nvidia-smi present) get PyPI's default CUDA build. Override with TORCH_SPEC=...
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")

.PHONY: setup demo test docs bench fashion clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[orchestrator,text,test,docs]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m orchestrator.tune

test: setup
	$(PY) -m orchestrator.reference --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir results/site
	$(PY) -m pytest -q --durations=15

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: setup
	$(PY) bench/step_bench.py

fashion: setup
	$(PY) scripts/fashion_mnist_kd.py --root ../shared/data/fashion-mnist

clean:
	rm -rf results mlflow.db
