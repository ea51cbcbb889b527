PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: install test bench fixtures

install:
	python3 -m venv .venv
	.venv/bin/pip install -r requirements.txt

test:
	$(PYTHON) -m pytest -q tests

bench:
	$(PYTHON) bench.py

fixtures:
	$(PYTHON) tests/make_fixtures.py
