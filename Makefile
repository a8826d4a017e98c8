# A fresh clone needs nothing else: `make demo` and `make test` create .venv and install everything first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
export MLFLOW_DISABLE_TELEMETRY ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test test-fast test-serve-loaded lint-imports lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	# the corruptions of jobs/robustness.py, without their opencv-python (we ship opencv-python-headless)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps imagecorruptions-imaug==1.1.5
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py $(ARGS)

# Two xdist workers: the tests that start Ray run one at a time in one of them, the rest beside them (tests/conftest.py).
test: lint-imports
	$(PY) -m pytest -q -n 2 --dist loadgroup $(ARGS)

test-fast: lint-imports
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# The Serve tests with two CPU-bound processes beside them: what a Serve change must pass (researchers serve beside
# their trainings; docs/testing.md).
test-serve-loaded: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tests/with_load.py --busy 2 -- $(PY) -m pytest -q -k serve $(ARGS)

# The layer contracts of pyproject.toml ([tool.importlinter]); PYTHONPATH=platform: this checkout's diffseg, whichever
# checkout the venv was installed from (as pytest's pythonpath does).
lint-imports: $(STAMP)
	PYTHONPATH=platform $(VENV)/bin/lint-imports

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs outputs mlflow.db mlruns .pytest_cache .import_linter_cache
