# Two commands for a newcomer: `make demo` (the main job: the linear probe, VQT, masked memory tokens and
# SynQT side by side on one task, one shared feature cache) and `make test`.
# Both create the virtual environment on first use. `make lint` runs ruff and mypy (CI runs it too).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
BACKBONE ?= $(SHARED)/weights/dinov2-small-imgfocus
DATA ?= $(SHARED)/data/vtab1k-mini/dtd10
DEMO_METHODS ?= linear,vqt,memory,synqt
# 84 px: DINOv2's 14-pixel patches make 6 x 6 of them (224 px: 16 x 16), so that the demo, install
# included, ends within 5 minutes on a 2-core CPU in float32 too
DEMO_IMAGE_SIZE ?= 84

# The demo needs the package alone; the tests and the linters its dev extra too.
$(VENV)/base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

# timm without its dependencies: they would pull a torchvision built for another torch (the timm tests
# put a stand-in for torchvision on the path, tests/torchvision_stub.py).
$(VENV)/installed: $(VENV)/base
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps timm==1.0.31
	touch $@

.PHONY: demo test lint install-check
demo: $(VENV)/base
	@test -e "$(BACKBONE)" -a -e "$(DATA)" || { echo "demo: $(BACKBONE) or $(DATA) not found; run 'make demo BACKBONE=<model> DATA=<task folder>'"; exit 2; }
	$(PY) -m querytune bench --suite $(DATA) --methods $(DEMO_METHODS) --backbone $(BACKBONE) --profile quick \
		--image-size $(DEMO_IMAGE_SIZE) --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(VENV)/installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile  # a process per core, one thread each (tiny models)

lint: $(VENV)/installed
	$(PY) -m ruff check querytune tests benchmarks
	$(PY) -m mypy

# Build the wheel and install it into a fresh venv, as users install it (CI runs it once).
install-check: $(VENV)/installed
	PY=$(PY) .ci/install-check
