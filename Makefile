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

# the one-command check of a CUDA machine (bench.py --gpu-check; DEVICE=cpu: a dry run on the tiny config)
DEVICE ?= cuda
.PHONY: gpu-check
gpu-check:
	$(PYTHON) bench.py --gpu-check --device $(DEVICE) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT))
