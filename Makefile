# ft-ray: `make demo` runs the main job, `make test` the whole suite, `make bench` the benchmarks,
# `make docs` the documentation site (site/).
# Each target creates .venv when missing and installs the package with its dev extra into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS ?= 0
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: install test lint docs demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# ruff, then mypy over ft_ray/ (settings and strictness: [tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# warnings are errors; `make test` builds it too (tests/test_docs.py)
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m jobs.demo

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) results site .mypy_cache bench/results/*.json bench/results/*.md
