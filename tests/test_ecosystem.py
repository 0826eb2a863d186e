"""Ecosystem: ONNX export for the Deepness QGIS plugin, and the rasterio CLI plugin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
from click.testing import CliRunner

from geosat2map_cli.main import cli

from .conftest import write_scene


def test_onnx_export_has_deepness_metadata_and_agrees_with_torch(tiny_weights_gsd, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from geosat2map.onnx_export import onnx_matches_torch

    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(cli, ["export-onnx", str(tiny_weights_gsd), str(out)])
    assert result.exit_code == 0, result.output
    assert "Superresolution, 200.0 cm/px, tile 256, overlap 25 %" in result.stdout
    model = onnx.load(str(out))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["model_type"] == "Superresolution" and meta["resolution"] == 200.0
    assert (meta["tile_size"], meta["tiles_overlap"], meta["scale_factor"]) == (256, 25, 1)
    assert meta["standardization_mean"] == meta["standardization_std"] == [0.5, 0.5, 0.5]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 256, 256]  # batch 1: Deepness refuses other batch sizes for image outputs
    assert onnx_matches_torch(tiny_weights_gsd, out, tiles=3) < 1e-3
    again = CliRunner().invoke(cli, ["export-onnx", str(tiny_weights_gsd), str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    wide = CliRunner().invoke(cli, ["export-onnx", str(tiny_weights_gsd), str(tmp_path / "o.onnx"), "--overlap", "200"])
    assert wide.exit_code == 1 and "overlap must be between 0 and 128" in wide.stderr


def test_rio_plugin_runs_translate(tiny_weights, tmp_path):
    rio = Path(sys.executable).with_name("rio")
    if not rio.exists():
        rio = Path(shutil.which("rio") or "")
    if not rio.is_file():
        pytest.skip("rasterio's rio command is not installed beside this Python")
    scene = write_scene(tmp_path / "scene.tif", width=300, height=260)
    out = tmp_path / "map.tif"
    listed = subprocess.run([str(rio), "--help"], capture_output=True, text=True, check=True)
    assert "geosat2map" in listed.stdout  # found through the rasterio.rio_plugins entry point
    proc = subprocess.run([str(rio), "geosat2map", "translate", str(scene), str(out), "--weights", str(tiny_weights),
                           "--quiet"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(out) as dst, rasterio.open(scene) as src:
        assert dst.crs == src.crs and dst.bounds == src.bounds and dst.count == 3
