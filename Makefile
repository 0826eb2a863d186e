# Set-up and checks. `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	mkdir -p out
	$(VENV)/bin/geosat2map translate sample_data/vegas_spacenet_rgb.tif out/demo_map.tif --overwrite
	$(VENV)/bin/geosat2map preview sample_data/vegas_spacenet_rgb.tif out/demo_map.tif out/demo_preview.png --overwrite
	@echo "demo: out/demo_map.tif (open it in QGIS) and out/demo_preview.png (input | output)"

bench: install
	$(PY) benchmarks/translate.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) out build *.egg-info
