"""translate's output in real QGIS (headless): valid, georeferenced, unstretched, transparent outside.

Needs Debian's QGIS (``make test-qgis`` installs it); skips with the reason where it is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geosat2map import translate

from .conftest import write_scene

SYSTEM_PYTHON = Path("/usr/bin/python3")
QGIS_PROCESS = Path("/usr/bin/qgis_process.bin")
CHECK = Path(__file__).with_name("qgis_check.py")


def _system_environment() -> dict[str, str]:
    """The environment without an activated virtualenv: QGIS's embedded Python finds its home by
    the first python3 on PATH, and the venv's (another Python build) made qgis_process crash."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if not p.startswith(venv))
    return {**env, "QT_QPA_PLATFORM": "offscreen"}


ENV = _system_environment()


def _qgis_python() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import qgis.core"], capture_output=True, env=ENV)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _qgis_python(), reason="QGIS Python bindings not installed (make test-qgis)")


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_weights) -> tuple[Path, Path]:
    """A translate output with a nodata corner (top-left 250 x 200 pixels)."""
    folder = tmp_path_factory.mktemp("qgis")
    data = np.stack([np.full((500, 700), v, np.uint8) for v in (90, 140, 60)])
    data[:, :200, :250] = 0
    scene = write_scene(folder / "scene.tif", width=700, height=500, nodata=0, data=data)
    out = folder / "map.tif"
    translate(scene, out, weights=tiny_weights)
    return scene, out


def test_qgis_opens_the_output_as_a_georeferenced_unstretched_rgb_with_transparent_nodata(output, tmp_path):
    scene, out = output
    png = tmp_path / "render.png"
    with rasterio.open(scene) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs.to_string()
    nodata_point, valid_point = f"{left + 100},{top - 100}", f"{left + 600},{bottom + 100}"
    # Rendered at the raster's own size, so a rendered pixel is a raster pixel.
    proc = subprocess.run([str(SYSTEM_PYTHON), str(CHECK), str(out), str(png), "--size", "700", "--probe",
                           nodata_point, "--probe", valid_point], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["valid"]
    assert report["crs"] == crs
    assert np.allclose(report["extent"], [left, bottom, right, top])
    # Three Byte colour bands drawn as RGB with no contrast stretch; QGIS shows the GDAL mask
    # as a fourth, Alpha band, which the renderer uses for transparency.
    assert report["types"][:3] == ["Byte"] * 3 and report["interpretation"][:3] == ["Red", "Green", "Blue"]
    assert report["bands"] == 3 or report["interpretation"][3] == "Alpha"
    assert report["renderer"] == "multibandcolor" and report["renderer_bands"][:3] == [1, 2, 3]
    assert report["contrast"] == ["NoEnhancement"] * 3
    (nodata_rgba, valid_rgba) = report["probes"]
    assert nodata_rgba[3] == 0, "nodata must render transparent"
    assert valid_rgba[3] == 255
    with rasterio.open(out) as dst:
        row, col = dst.index(left + 600, bottom + 100)
        assert valid_rgba[:3] == dst.read(window=((row, row + 1), (col, col + 1))).ravel().tolist()
    assert report["png"] and png.stat().st_size > 0


@pytest.mark.skipif(not QGIS_PROCESS.exists(), reason="qgis_process.bin not installed (make test-qgis)")
def test_qgis_process_raster_statistics(output):
    _, out = output
    proc = subprocess.run([str(QGIS_PROCESS), "--json", "run", "native:rasterlayerstatistics", "--",
                           f"INPUT={out}", "BAND=1"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout)["results"]
    with rasterio.open(out) as dst:
        band = dst.read(1)
    # This algorithm honours a nodata value but not a GDAL mask band, so it counts the masked
    # pixels (stored as 0) too; it agrees with the file's raw band.
    assert stats["MIN"] == band.min() == 0 and stats["MAX"] == band.max()
    assert stats["MEAN"] == pytest.approx(float(band.mean()), abs=1e-6)

