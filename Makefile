PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

# torch, the range the project is tested on: a CUDA build where an NVIDIA driver is found, the CPU build (about
# 1 GB instead of 5) on Linux without one; macOS wheels are CPU builds anyway. Override, e.g.:
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_VERSION ?= 2.13.0
NVIDIA_DRIVER := $(shell test -e /proc/driver/nvidia/version && echo yes || (command -v nvidia-smi >/dev/null 2>&1 && echo yes))
ifeq ($(shell uname -s)$(NVIDIA_DRIVER),Linux)
TORCH ?= torch==$(TORCH_VERSION)+cpu --extra-index-url https://download.pytorch.org/whl/cpu
else
TORCH ?= torch==$(TORCH_VERSION)
endif

.PHONY: install bench-install test bench fixtures

install:
	python3 -m venv .venv
	.venv/bin/pip install $(TORCH)
	.venv/bin/pip install -r requirements.txt
	@.venv/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# bench.py's peers (HF transformers + PEFT), in their own venv with the same torch choice as install
bench-install:
	python3 -m venv .bench-venv
	.bench-venv/bin/pip install $(TORCH)
	.bench-venv/bin/pip install -r requirements-bench.txt

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

# docs/flags.md, generated from train.py's SETTINGS (tests/test_settings.py checks that it is current), and the
# test counts of docs/reliability.md, recounted from pytest's collection (tests/test_reliability.py checks them)
.PHONY: docs
docs:
	$(PYTHON) -c "import train; open('docs/flags.md', 'w').write(train.SETTINGS.flags_doc())"
	PYTHONPATH=. $(PYTHON) tests/test_reliability.py
