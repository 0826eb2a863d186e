# Set-up and checks. `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0

.PHONY: install test test-qgis demo bench gpu-bundle clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# translate's output in real QGIS: installs Debian's QGIS where apt-get runs as root (else the
# QGIS tests skip and say why), then runs them.
QGIS_PACKAGES := qgis python3-qgis qgis-providers
test-qgis: install
	@if /usr/bin/python3 -c "import qgis.core" 2>/dev/null && [ -x /usr/bin/qgis_process.bin ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(QGIS_PACKAGES) >/dev/null) || echo "test-qgis: installing QGIS failed; its tests will skip"; \
	else echo "test-qgis: no apt-get as root here; the QGIS tests will skip"; fi
	$(PY) -m pytest -q -rs tests/test_qgis.py

demo: install
	mkdir -p out
	$(VENV)/bin/geosat2map translate sample_data/vegas_spacenet_rgb.tif out/demo_map.tif --overwrite
	$(VENV)/bin/geosat2map preview sample_data/vegas_spacenet_rgb.tif out/demo_map.tif out/demo_preview.png --overwrite
	$(VENV)/bin/geosat2map translate sample_data/naip_4band_5m.tif out/demo_naip_map.tif --overwrite
	$(VENV)/bin/geosat2map preview sample_data/naip_4band_5m.tif out/demo_naip_map.tif out/demo_naip_preview.png --overwrite
	$(VENV)/bin/geosat2map classify out/demo_naip_map.tif out/demo_naip_classes.tif --overwrite
	$(VENV)/bin/geosat2map vectorize out/demo_naip_classes.tif out/demo_naip_features.gpkg --overwrite
	@echo "demo: out/demo_map.tif and out/demo_naip_map.tif (open them in QGIS), out/demo_preview.png and out/demo_naip_preview.png (input | output), out/demo_naip_classes.tif (the NAIP map's classes, its QGIS style beside it), out/demo_naip_features.gpkg (their patches as polygons)"

bench: install
	$(PY) benchmarks/translate.py
	$(PY) benchmarks/train_step.py

# The wheels benchmarks/gpu_checks.sh needs on a Python 3.12 machine that has torch and nothing else
# of ours and no network (this workplace's GPU machines), unpacked and packed in one xz file.
GPU_WHEELS := rasterio==1.4.4 affine cligj click-plugins pyproj shapely
gpu-bundle:
	rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site312
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .gpu/wheels $(GPU_WHEELS)
	for w in .gpu/wheels/*.whl; do $(PYTHON) -m zipfile -e $$w .gpu/site312 || exit 1; done
	tar -C .gpu -cf - site312 | xz -9 -T0 > .gpu/site312.tar.xz
	rm -rf .gpu/wheels .gpu/site312

clean:
	rm -rf $(VENV) out build *.egg-info
