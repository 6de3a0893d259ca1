# make train: set up .venv and train on the built-in offline default; make test: set up and run the tests.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup train test lint

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: .venv/.installed

train: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
