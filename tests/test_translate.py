"""translate: georeferencing, masks, scaling, batching and seams."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window

import geosat2map.device_rows
import geosat2map.grid
import geosat2map.pipeline
from geosat2map.engine import InferenceEngine
from geosat2map.errors import InputError, OutputError
from geosat2map.grid import TileGrid, seam_ratio
from geosat2map.model import FlipAveraged, UNetGenerator, init_weights
from geosat2map.reader import ground_pixel_size, open_scene
from geosat2map import translate
from geosat2map.weights import ModelSpec, describe_weights, save_generator

from .conftest import (SAMPLE_SCENE, engines_as_if_on_a_gpu, random_generator, synthetic_image, torchrun_translate,
                       write_scene)


def test_output_keeps_crs_transform_and_footprint(scene, tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    result = translate(scene, out, weights=tiny_weights)
    with rasterio.open(scene) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs
        assert dst.transform == src.transform
        assert dst.bounds == src.bounds
        assert (dst.width, dst.height) == (src.width, src.height)
        assert dst.count == 3 and dst.dtypes == ("uint8",) * 3
        assert [c.name for c in dst.colorinterp] == ["red", "green", "blue"]  # PHOTOMETRIC=RGB
        assert dst.profile["tiled"] and dst.compression.name == "zstd"
        assert dst.overviews(1) == [2, 4]
        assert dst.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
        tags = dst.tags()  # how the map was made, where gdalinfo and QGIS's layer information show it
    assert result.tiles == result.tiles_computed == len(TileGrid(600, 500))
    assert tags["TIFFTAG_SOFTWARE"] == f"geosat2map {geosat2map.__version__}" and tags["TIFFTAG_DATETIME"][:4] >= "2026"
    assert tags["GEOSAT2MAP_SOURCE"] == "scene.tif" and tags["GEOSAT2MAP_RESOLUTION"] == "1 m/pixel"
    assert tags["GEOSAT2MAP_MODEL_SHA256"] == describe_weights(tiny_weights).model_sha256
    assert tags["GEOSAT2MAP_TILING"] == f"256-pixel tiles overlapping by 64, {result.backend}"


def test_resamples_to_the_model_gsd_over_the_same_footprint(scene, tiny_weights_gsd, tmp_path):
    out = tmp_path / "map.tif"
    translate(scene, out, weights=tiny_weights_gsd)
    with rasterio.open(scene) as src, rasterio.open(out) as dst:
        assert dst.bounds == pytest.approx(src.bounds, abs=1e-6)
        assert dst.res == pytest.approx((2.0, 2.0), rel=0.01)
        assert (dst.width, dst.height) == (300, 250)


def test_geographic_scene_is_resampled_by_ground_distance(tiny_weights_gsd, tmp_path):
    """The Las Vegas sample's square pixels in degrees are 0.24 x 0.30 m on the ground at 36 degrees
    north: both axes were scaled alike, so the model saw the ground squeezed to 0.81 of its width
    (Paris, at 49 degrees, 0.66). Each axis is scaled to the model's metres: square on the ground."""
    out = tmp_path / "map.tif"
    translate(SAMPLE_SCENE, out, weights=tiny_weights_gsd)
    with rasterio.open(SAMPLE_SCENE) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs and dst.crs.is_geographic
        assert dst.bounds == pytest.approx(src.bounds, abs=1e-9)
        assert ground_pixel_size(dst.crs, dst.transform, dst.width, dst.height) == pytest.approx((2.0, 2.0), rel=0.02)
        assert dst.res[0] > 1.2 * dst.res[1]  # so in degrees, wider than tall


def test_a_scene_with_oblong_pixels_gets_square_ones(tiny_weights, tiny_weights_gsd, tmp_path):
    """A grid of 1 x 1.5 m pixels (a scanned or resampled product) mapped at the model's 2 m: 2 m
    along each axis, the footprint kept; at native resolution its own pixels, and a note why not."""
    src = write_scene(tmp_path / "oblong.tif", width=600, height=400)
    with rasterio.open(src, "r+") as ds:
        ds.transform = rasterio.Affine(1.0, 0, ds.transform.c, 0, -1.5, ds.transform.f)
    assert not translate(src, tmp_path / "map.tif", weights=tiny_weights_gsd).notes
    kept = translate(src, tmp_path / "native.tif", weights=tiny_weights_gsd, resolution="native")
    assert kept.notes == ["the scene's pixels are 1 x 1.5 m on the ground: at its own pixels the model sees the "
                          "ground stretched one way; a resolution in metres (or model) resamples it to square ones"]
    with rasterio.open(src) as scene, rasterio.open(tmp_path / "map.tif") as dst, \
            rasterio.open(tmp_path / "native.tif") as native:
        assert (dst.width, dst.height) == (300, 300) and dst.res == pytest.approx((2.0, 2.0))
        assert dst.bounds == pytest.approx(scene.bounds)
        assert native.res == pytest.approx((1.0, 1.5)) and native.shape == scene.shape
    # A model that records no resolution keeps every scene's pixels: "model" would not square them.
    unscaled = translate(src, tmp_path / "unscaled.tif", weights=tiny_weights)
    assert unscaled.notes == ["the model records no ground sampling distance: native resolution used",
                              "the scene's pixels are 1 x 1.5 m on the ground: at its own pixels the model sees "
                              "the ground stretched one way; a resolution in metres resamples it to square ones"]


def test_web_mercator_scene_is_resampled_by_ground_distance_not_by_its_metres(tiny_weights_gsd, tmp_path):
    """Imagery saved from XYZ basemaps comes in EPSG:3857, whose "metres" are 1/cos(latitude) of the
    ground's: taken at face value, a scene at 37 degrees north would be mapped 1.26 times too fine."""
    src = write_scene(tmp_path / "mercator.tif", crs="EPSG:3857")  # 1 m pixels in the CRS, y = 4 500 km
    latitude = math.degrees(2 * math.atan(math.exp(4_500_000 / 6_378_137)) - math.pi / 2)  # 37.4
    out = tmp_path / "map.tif"
    translate(src, out, weights=tiny_weights_gsd)
    with rasterio.open(out) as dst:
        assert dst.res == pytest.approx((2.0 / math.cos(math.radians(latitude)),) * 2, rel=0.01)
        assert ground_pixel_size(dst.crs, dst.transform, dst.width, dst.height) == pytest.approx((2.0, 2.0), rel=0.01)


@pytest.mark.parametrize("unit, metres", [('"metre",1', 1.0), ('"US survey foot",0.304800609601219', 0.3048)])
def test_local_site_grid_is_resampled_by_its_own_units(unit, metres, tiny_weights_gsd, tmp_path):
    """A CRS tied to no place on Earth (a drone survey's site grid): pixels measured in its units."""
    wkt = f'LOCAL_CS["site grid",LOCAL_DATUM["site",0],UNIT[{unit}],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
    src = write_scene(tmp_path / "site.tif", crs=wkt)  # 600 x 500 pixels of 1 unit
    out = tmp_path / "map.tif"
    translate(src, out, weights=tiny_weights_gsd)
    with rasterio.open(out) as dst, rasterio.open(src) as scene:
        assert (dst.width, dst.height) == (round(600 * metres / 2), round(500 * metres / 2))
        assert dst.crs == scene.crs


def test_nodata_footprint_becomes_the_output_mask_and_empty_tiles_are_skipped(tiny_weights, tmp_path):
    data = synthetic_image(700, 900)
    data[:, :, 600:] = 0  # a third of the scene outside the footprint
    data[:, 200:260, 100:160] = 0
    src_path = write_scene(tmp_path / "nd.tif", width=900, height=700, nodata=0, data=data)
    out = tmp_path / "map.tif"
    result = translate(src_path, out, weights=tiny_weights)
    with rasterio.open(src_path) as src, rasterio.open(out) as dst:
        src_mask = src.dataset_mask() > 0
        dst_mask = dst.dataset_mask() > 0
        assert dst.mask_flag_enums[0][0].name == "per_dataset"
        assert (src_mask == dst_mask).all()
        assert (dst.read()[:, ~dst_mask] == 0).all()
    assert result.tiles_computed < result.tiles


def test_alpha_band_becomes_the_output_mask(tiny_weights, tmp_path):
    rgb = synthetic_image(400, 500)
    alpha = np.full((1, 400, 500), 255.0)
    alpha[:, :, :120] = 0
    path = write_scene(tmp_path / "rgba.tif", width=500, height=400, count=4, data=np.concatenate([rgb, alpha]),
                       photometric="RGB", alpha="YES")
    out = tmp_path / "map.tif"
    translate(path, out, weights=tiny_weights)
    with rasterio.open(out) as dst:
        mask = dst.dataset_mask() > 0
    assert not mask[:, :120].any() and mask[:, 120:].all()


def test_a_tile_does_not_depend_on_its_batch_mates():
    engine = InferenceEngine(random_generator(), torch.device("cpu"))
    tiles = np.stack([synthetic_image(256, 256, seed=s) for s in range(16)]).astype(np.float32)
    together = engine(tiles)
    alone = np.concatenate([engine(tiles[i : i + 1]) for i in range(16)])
    assert np.allclose(together, alone, atol=1e-3)


def test_flip_averaging_is_the_mean_of_both_passes_and_mirror_symmetric():
    g = random_generator()
    x = torch.from_numpy(np.stack([synthetic_image(256, 256, seed=s) for s in range(2)]).astype(np.float32) / 127.5 - 1)
    with torch.inference_mode():
        both = FlipAveraged(g)(x)
        assert torch.allclose(both, (g(x) + g(x.flip(-1)).flip(-1)) / 2, atol=1e-5)
        assert torch.allclose(FlipAveraged(g)(x.flip(-1)), both.flip(-1), atol=1e-5)
        assert not torch.allclose(g(x.flip(-1)), g(x).flip(-1), atol=1e-2)  # the generator alone is not


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_translate_tta_maps_a_mirrored_scene_to_the_mirrored_map(tiny_weights, tmp_path, backend):
    """Tiles at 0, 192 and 384 of 640 pixels: the grid and its blending weights are mirror-symmetric
    too, so with --tta the whole map is (to rounding), and without it it is not."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    image = synthetic_image(300, 640)
    maps = {}
    for name, data in (("scene", image), ("mirrored", image[:, :, ::-1])):
        src = write_scene(tmp_path / f"{name}.tif", width=640, height=300, data=data)
        for tta in (False, True):
            result = translate(src, tmp_path / f"{name}-{tta}.tif", weights=tiny_weights, tta=tta, backend=backend,
                               precision="fp32")
            assert result.tta == ("flip" if tta else None) and result.backend == backend
            with rasterio.open(result.dst) as dst:
                maps[name, tta] = dst.read().astype(int)
    # (The random test generator paints nearly flat grey: its differences are a few levels.)
    assert np.abs(maps["mirrored", True] - maps["scene", True][:, :, ::-1]).max() <= 1
    assert np.abs(maps["mirrored", False] - maps["scene", False][:, :, ::-1]).mean() > 0.3
    assert np.abs(maps["scene", True] - maps["scene", False]).mean() > 0.15


def test_translate_tta_median_is_mirror_symmetric_recorded_and_on_every_engine(tiny_weights, tmp_path):
    """--tta-median: the map of a mirrored scene is the mirrored map (the views are symmetric, and
    so are the grid's tiles at 0, 192 and 384 of 640), not the flip average's map; the map says
    how it was made; ONNX Runtime (fp32 and int8) takes the median of its own views, within
    rounding of PyTorch's map in fp32 and near it in int8."""
    image = synthetic_image(300, 640)
    maps = {}
    for name, data in (("scene", image), ("mirrored", image[:, :, ::-1])):
        src = write_scene(tmp_path / f"{name}.tif", width=640, height=300, data=data)
        for tta in ("flip", "median"):
            result = translate(src, tmp_path / f"{name}-{tta}.tif", weights=tiny_weights, tta=tta, precision="fp32",
                               backend="torch")
            assert result.tta == tta and result.backend == "torch"
            with rasterio.open(result.dst) as dst:
                maps[name, tta] = dst.read().astype(int)
                tags = dst.tags()
    assert np.abs(maps["mirrored", "median"] - maps["scene", "median"][:, :, ::-1]).max() <= 1
    assert np.abs(maps["scene", "median"] - maps["scene", "flip"]).mean() > 0.1
    assert tags["GEOSAT2MAP_TILING"].endswith(", median of 18 views (--tta-median)")
    assert '"tta": "median"' in tags["GEOSAT2MAP_OPTIONS"]
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    for precision, most in (("fp32", 1), ("int8", 8)):
        result = translate(src, tmp_path / f"median-{precision}.tif", weights=tiny_weights, tta="median",
                           backend="onnxruntime", precision=precision)
        assert result.tta == "median" and result.backend == f"onnxruntime{'-int8' * (precision == 'int8')}"
        with rasterio.open(result.dst) as dst:
            assert np.abs(dst.read().astype(int) - maps["mirrored", "median"]).max() <= most
            assert dst.tags()["GEOSAT2MAP_TILING"].endswith(", median of 18 views (--tta-median)")


def test_batch_size_does_not_change_the_output(scene, tiny_weights, tmp_path):
    translate(scene, tmp_path / "b1.tif", weights=tiny_weights, batch_size=1)
    translate(scene, tmp_path / "b16.tif", weights=tiny_weights, batch_size=16)
    with rasterio.open(tmp_path / "b1.tif") as a, rasterio.open(tmp_path / "b16.tif") as b:
        assert np.abs(a.read().astype(int) - b.read().astype(int)).max() <= 1


def test_uint16_is_scaled_once_for_the_whole_scene(tmp_path):
    data = synthetic_image(600, 800, count=1) * 40 + 500
    data[:, :, :400] *= 0.25  # a dark half: per-window stretching would brighten it
    path = write_scene(tmp_path / "pan.tif", width=800, height=600, count=1, dtype="uint16", data=data)
    scene = open_scene(path, resolution="native")
    try:
        assert scene.bands == [1, 1, 1]
        dark, _ = scene.read(Window(0, 0, 256, 256))
        overlap_a, _ = scene.read(Window(300, 0, 256, 256))
        overlap_b, _ = scene.read(Window(350, 0, 256, 256))
    finally:
        scene.close()
    assert dark.max() < 128  # the dark half stays dark
    assert np.array_equal(overlap_a[:, :, 50:], overlap_b[:, :, :206])  # same pixel, same value, any window
    # The stretch is reported, once per band read, with the values it maps to 0 and 255.
    lo, hi = scene.stretch
    assert scene.notes == [f"uint16 input stretched to 0-255 per band, its darkest 2 % and brightest 2 % clipped "
                           f"(band 1: {lo[0]:.6g}-{hi[0]:.6g})"]


def test_single_band_uint16_translates_to_rgb(tiny_weights, tmp_path):
    path = write_scene(tmp_path / "pan.tif", count=1, dtype="uint16", nodata=0)
    out = tmp_path / "map.tif"
    translate(path, out, weights=tiny_weights)
    with rasterio.open(out) as dst:
        assert dst.count == 3


def test_a_paletted_scene_is_translated_in_its_colours(tiny_weights, tmp_path):
    """A one-band paletted scene is read through its colour table, as QGIS shows it, not as grey
    indices: the same map as its RGB expansion gives, and shrunk, nearly the same pixels."""
    rgb = synthetic_image(300, 300)
    index = (rgb[0] // 43 * 36 + rgb[1] // 43 * 6 + rgb[2] // 43).astype(np.uint8)  # a 6 x 6 x 6 colour cube
    table = {i: (i // 36 * 43 + 21, i // 6 % 6 * 43 + 21, i % 6 * 43 + 21, 255) for i in range(216)}
    paletted = write_scene(tmp_path / "paletted.tif", width=300, height=300, count=1, data=index[None],
                           photometric="palette")
    with rasterio.open(paletted, "r+") as dst:
        dst.write_colormap(1, table)
    colours = np.array([table[i][:3] for i in range(216)] + [(0, 0, 0)] * 40, np.uint8).T[:, index]
    expanded = write_scene(tmp_path / "expanded.tif", width=300, height=300, data=colours)
    maps = {}
    for name, src in (("paletted", paletted), ("expanded", expanded)):
        out = tmp_path / f"{name}_map.tif"
        translate(src, out, weights=tiny_weights)
        with rasterio.open(out) as dst:
            maps[name] = dst.read()
    assert np.array_equal(maps["paletted"], maps["expanded"])
    pixels = {}
    for name, src in (("paletted", paletted), ("expanded", expanded)):
        with open_scene(src, model_gsd_m=2.0) as scene:  # shrunk: GDAL averages
            pixels[name], _ = scene.read(Window(0, 0, 150, 150))
            if name == "paletted":
                assert scene.notes == ["paletted: read in its colour table's colours (GDAL's expand=rgb)"]
    # GDAL snaps a paletted average to the table's nearest colour: close to the RGB average, where
    # grey indices would be far from it.
    assert np.abs(pixels["paletted"] - pixels["expanded"]).mean() < 8


def test_float_nan_and_inf_are_masked(tiny_weights, tmp_path):
    data = synthetic_image(300, 300) / 255.0
    data[:, 10:20, 10:20] = np.nan
    data[:, 50:60, 50:60] = np.inf
    path = write_scene(tmp_path / "f.tif", width=300, height=300, dtype="float32", data=data)
    out = tmp_path / "map.tif"
    translate(path, out, weights=tiny_weights)
    with rasterio.open(out) as dst:
        mask = dst.dataset_mask() > 0
    assert not mask[10:20, 10:20].any() and not mask[50:60, 50:60].any()
    assert mask[100:, 100:].all()


def test_src_nodata_marks_a_collar_the_file_does_not(tiny_weights, tmp_path):
    """A black collar without nodata metadata: with src_nodata=0 the map is the one of the same
    scene whose file says nodata 0 (pixels and mask); without, the collar is mapped as ground."""
    data = synthetic_image(400, 500)
    data[:, :40] = 0
    data[:, :, :30] = 0
    data[:, 200, 200] = (0, 0, 7)  # black in two bands only: ground
    unmarked = write_scene(tmp_path / "unmarked.tif", width=500, height=400, data=data)
    marked = write_scene(tmp_path / "marked.tif", width=500, height=400, data=data, nodata=0)
    result = translate(unmarked, tmp_path / "a.tif", weights=tiny_weights, src_nodata=0)
    translate(marked, tmp_path / "b.tif", weights=tiny_weights)
    translate(unmarked, tmp_path / "c.tif", weights=tiny_weights)
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b, \
            rasterio.open(tmp_path / "c.tif") as c:
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.dataset_mask(), b.dataset_mask())
        assert (a.dataset_mask() == 0).sum() == 40 * 500 + 360 * 30 and a.dataset_mask()[200, 200] == 255
        assert (c.dataset_mask() == 255).all()
        assert a.tags()["GEOSAT2MAP_SRC_NODATA"] == "0" and "GEOSAT2MAP_SRC_NODATA" not in c.tags()
    assert any("--src-nodata" in note for note in result.notes)


@pytest.mark.parametrize("make, value, message", [
    (lambda p: write_scene(p, width=300, height=300), 300, "outside the range of .* uint8 values"),
    (lambda p: write_scene(p, width=300, height=300), float("nan"), "outside the range"),
])
def test_src_nodata_that_cannot_apply_is_refused(make, value, message, tmp_path):
    path = make(tmp_path / "scene.tif")
    with pytest.raises(InputError, match=message):
        open_scene(path, resolution="native", src_nodata=value)


def _paletted_scene(path: Path) -> Path:
    write_scene(path, width=300, height=300, count=1, data=np.ones((1, 300, 300), np.uint8))
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (0, 0, 0, 255), 1: (200, 30, 30, 255)})
    return path


@pytest.mark.parametrize("mark", ["file", "src_nodata", "see-through colour"])
def test_a_paletted_scenes_nodata_index_is_masked(mark, tiny_weights, tmp_path):
    """A paletted scene's nodata index (marked in the file, given as --src-nodata, or a colour the
    table makes see-through, as QGIS shows it) is nodata in the map, as a nodata value is in an RGB
    scene; GDAL's expansion to three colour bands painted it black and marked nothing."""
    index = np.ones((300, 300), np.uint8)
    index[:, 150:] = 2
    index[:60] = 7
    table = {1: (200, 30, 30, 255), 2: (30, 200, 30, 255), 7: (10, 20, 30, 0 if mark == "see-through colour" else 255)}
    path = write_scene(tmp_path / "paletted.tif", width=300, height=300, count=1, data=index[None],
                       photometric="palette", nodata=7 if mark == "file" else None)
    if mark == "see-through colour":  # a TIFF's table has no alpha; a VRT's (or a PNG's) has
        rasterio.shutil.copy(path, tmp_path / "paletted.vrt", driver="VRT")
        path = tmp_path / "paletted.vrt"
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, table)
    out = tmp_path / "map.tif"
    result = translate(path, out, weights=tiny_weights, resolution="native",
                       src_nodata=7 if mark == "src_nodata" else None)
    assert "paletted: read in its colour table's colours (GDAL's expand=rgba)" in result.notes
    with rasterio.open(out) as dst:
        valid = dst.dataset_mask() > 0
    assert not valid[:60].any() and valid[60:].all()


def test_complex_values_are_refused(tmp_path):
    """A radar scene (complex samples) would be read as its real parts, a meaningless picture."""
    path = write_scene(tmp_path / "slc.tif", dtype="complex64", data=synthetic_image(300, 300) * (1 + 1j))
    with pytest.raises(InputError, match="holds complex values"):
        open_scene(path, resolution="native")


def test_bands_option_picks_bands_in_order(tmp_path):
    data = np.stack([np.full((300, 300), v, np.float32) for v in (10, 20, 30, 40)])
    path = write_scene(tmp_path / "four.tif", width=300, height=300, count=4, data=data)
    scene = open_scene(path, bands=[4, 3, 2], resolution="native")
    try:
        pixels, _ = scene.read(Window(0, 0, 8, 8))
    finally:
        scene.close()
    assert pixels[:, 0, 0].tolist() == [40, 30, 20]


def test_guessing_red_green_blue_among_more_bands_is_said(tmp_path):
    path = write_scene(tmp_path / "four.tif", width=300, height=300, count=4, photometric="minisblack")  # as NAIP
    notes = {}
    for bands in (None, [3, 2, 1]):
        scene = open_scene(path, bands=bands, resolution="native")
        notes[str(bands)] = scene.notes
        scene.close()
    assert notes == {"None": ["bands 1, 2, 3 of 4 read as red, green, blue (the file does not say which are): "
                              "pass --bands to choose others"], "[3, 2, 1]": []}
    rgb = write_scene(tmp_path / "rgba.tif", width=300, height=300, count=4)  # GDAL's default: RGB and alpha
    with open_scene(rgb, resolution="native") as scene:
        assert scene.notes == []


def test_scene_smaller_than_a_tile(tiny_weights, tmp_path):
    path = write_scene(tmp_path / "small.tif", width=37, height=9)
    out = tmp_path / "map.tif"
    translate(path, out, weights=tiny_weights)
    with rasterio.open(out) as dst:
        assert (dst.width, dst.height) == (37, 9)


def test_cog_output_is_a_cloud_optimized_geotiff(tiny_weights, tmp_path):
    from rio_cogeo.cogeo import cog_validate

    data = synthetic_image(900, 1100)
    data[:, :200, :300] = 0  # nodata: the mask band and its overviews are part of the layout
    path = write_scene(tmp_path / "big.tif", width=1100, height=900, nodata=0, data=data)
    out = tmp_path / "map.tif"
    translate(path, out, weights=tiny_weights, cog=True)
    assert cog_validate(out) == (True, [], [])  # rio-cogeo: IFDs first, overviews before the full resolution
    with rasterio.open(out) as dst:
        assert dst.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert dst.overviews(1)
        assert dst.dataset_mask()[:200, :300].max() == 0
        assert dst.crs.to_epsg() == 32633
        assert dst.tags()["GEOSAT2MAP_SOURCE"] == "big.tif"  # the tags survive the COG copy


def test_every_compression_keeps_the_map_its_mask_and_overviews(tiny_weights, tmp_path):
    """DEFLATE and LZW store the ZSTD map's exact pixels; JPEG (YCbCr) and WebP store them within
    lossy compression's error, at the quality asked; all keep the nodata mask and the overviews,
    as a COG too."""
    from rio_cogeo.cogeo import cog_validate

    data = synthetic_image(600, 700)
    data[:, :200, :300] = 0
    path = write_scene(tmp_path / "scene.tif", width=700, height=600, nodata=0, data=data)
    translate(path, tmp_path / "zstd.tif", weights=tiny_weights)
    with rasterio.open(tmp_path / "zstd.tif") as ref:
        pixels, mask, levels = ref.read().astype(int), ref.dataset_mask(), ref.overviews(1)
    assert mask[:200, :300].max() == 0 and mask.min() == 0 < mask.max() and levels
    for compress, quality, cog in [("deflate", None, False), ("lzw", None, False), ("jpeg", None, False),
                                   ("jpeg", 70, True), ("webp", 80, False)]:
        out = tmp_path / f"{compress}{quality}{cog}.tif"
        translate(path, out, weights=tiny_weights, compress=compress, quality=quality, cog=cog)
        with rasterio.open(out) as dst:
            assert dst.compression.name == compress and dst.overviews(1) == levels
            assert (dst.dataset_mask() == mask).all()
            diff = np.abs(dst.read().astype(int) - pixels)[:, mask > 0]
            if compress in ("deflate", "lzw"):
                assert diff.max() == 0
            else:
                assert diff.mean() < 3 and diff.max() > 0
            if compress == "jpeg":
                assert dst.photometric.name == "ycbcr"
                assert dst.tags(ns="IMAGE_STRUCTURE")["JPEG_QUALITY"] == str(quality or 90)
        if cog:
            assert cog_validate(out) == (True, [], [])
    # Only JPEG and WebP have a quality; nothing is written for a refused one.
    with pytest.raises(OutputError, match="quality is for lossy compression"):
        translate(path, tmp_path / "bad.tif", weights=tiny_weights, compress="deflate", quality=80)
    with pytest.raises(OutputError, match="unknown compression 'jp2'"):
        translate(path, tmp_path / "bad.tif", weights=tiny_weights, compress="jp2")
    assert not (tmp_path / "bad.tif").exists()


@pytest.fixture(scope="module")
def seam_model(tmp_path_factory):
    """A random generator with weights large enough that tiles disagree at their borders."""
    torch.manual_seed(0)
    g = UNetGenerator(ngf=8)
    init_weights(g, std=0.1)
    path = tmp_path_factory.mktemp("seam") / "seam.safetensors"
    save_generator(g.eval(), ModelSpec(ngf=8), path)
    return path


def _translate_sample(weights, out) -> tuple[np.ndarray, TileGrid]:
    translate(SAMPLE_SCENE, out, weights=weights, resolution="native")
    with rasterio.open(out) as dst:
        return dst.read(), TileGrid(dst.width, dst.height, 256, 64)


def test_no_seam_along_tile_borders_on_a_real_scene(seam_model, tmp_path, monkeypatch):
    image, grid = _translate_sample(seam_model, tmp_path / "blended.tif")
    assert seam_ratio(image, grid.xs, 256, axis=2) <= 1.0
    assert seam_ratio(image, grid.ys, 256, axis=1) <= 1.0

    # The same measurement catches the seams when blending is switched off (hard cuts mid-overlap).
    monkeypatch.setattr(geosat2map.grid, "ramp", lambda n: (np.arange(n) >= n // 2).astype(np.float64))
    image, grid = _translate_sample(seam_model, tmp_path / "cut.tif")
    assert seam_ratio(image, grid.xs, 256, axis=2) > 1.0
    assert seam_ratio(image, grid.ys, 256, axis=1) > 1.0


def test_torchrun_two_ranks_share_the_rows_and_write_the_single_process_file(tiny_weights, tmp_path):
    """2 CPU processes on gloo: rank 1 computes the odd tile rows, rank 0 the even ones and writes."""
    scene = write_scene(tmp_path / "scene.tif", width=700, height=900, nodata=0)
    single = translate(scene, tmp_path / "single.tif", weights=tiny_weights, backend="torch", batch_size=3)
    ranks = torchrun_translate(scene, tmp_path / "multi.tif", tiny_weights, batch_size=2)
    grid = TileGrid(700, 900)
    assert ranks[1]["computed"] == len(grid.xs) * len(grid.ys[1::2])  # only its own rows: none twice
    assert ranks[0]["computed"] == single.tiles_computed == len(grid)
    assert ranks[0]["backend"] == ranks[1]["backend"] == single.backend
    with rasterio.open(tmp_path / "single.tif") as a, rasterio.open(tmp_path / "multi.tif") as b:
        assert np.array_equal(a.read(), b.read())
        assert np.array_equal(a.dataset_mask(), b.dataset_mask())
        assert a.transform == b.transform and a.crs == b.crs
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name or p.name.endswith(".lock")]


def test_a_run_stopped_under_torchrun_says_to_resume_in_one_process(tiny_weights, tmp_path):
    """Its rows are kept as a one-process run keeps them, but torchrun refuses --resume: the
    message said "the same command with --resume continues", which then failed."""
    scene = write_scene(tmp_path / "scene.tif", width=700, height=1500)
    single = translate(scene, tmp_path / "single.tif", weights=tiny_weights, backend="torch")
    out = tmp_path / "multi.tif"
    script = tmp_path / "stopped.py"
    script.write_text(
        "import os\n"
        "from geosat2map import translate\n"
        "from geosat2map.errors import Interrupted\n"
        "seen = [0]\n"
        "def progress(advance, total):\n"
        "    seen[0] += advance\n"
        "    if seen[0] >= 20:\n"
        "        raise KeyboardInterrupt\n"
        "try:\n"
        f"    translate({str(scene)!r}, {str(out)!r}, weights={str(tiny_weights)!r}, batch_size=2,\n"
        "              progress=progress if os.environ['RANK'] == '0' else None)\n"
        "except Interrupted as exc:\n"
        f"    open({str(tmp_path / 'said.txt')!r}, 'w').write(str(exc))\n"
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # Not checked: rank 1, still sending rows, fails once rank 0 has stopped.
    subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False)
    said = (tmp_path / "said.txt").read_text()
    assert said.endswith("rows are kept; the same command with --resume in one process (not under torchrun) continues")
    resumed = translate(scene, out, weights=tiny_weights, resume=True)
    assert resumed.tiles_computed == single.tiles_computed
    with rasterio.open(tmp_path / "single.tif") as a, rasterio.open(out) as b:
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.dataset_mask(), b.dataset_mask())


def test_a_helper_rank_stopped_after_rank_0_is_gone_stops_with_its_own_interrupt(monkeypatch):
    """Ctrl-C under torchrun reaches every rank: rank 1 then told rank 0 it had failed, and rank 0,
    stopped already, had closed the connection, so gloo's "Connection closed by peer" replaced the
    interrupt with a traceback."""
    from geosat2map import sharded
    from geosat2map.distributed import DistContext

    def stopped(*_):
        raise KeyboardInterrupt

    def peer_gone(*_):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(sharded, "compute_row", stopped)
    monkeypatch.setattr(sharded.dist, "send", peer_gone)
    with pytest.raises(KeyboardInterrupt):
        sharded.send_rows(DistContext(rank=1, world_size=2), TileGrid(700, 900), None, None, 2)


def _write_rows(path, valid: np.ndarray) -> None:
    from geosat2map.writer import GeoTIFFWriter

    h, w = valid.shape
    with GeoTIFFWriter(path, w, h, "EPSG:32633", rasterio.transform.from_origin(0, 0, 1, 1)) as writer:
        for top in range(0, h, 100):  # bands of rows that do not line up with the 256-row blocks
            pixels = np.full((3, min(100, h - top), w), 7, np.uint8)
            writer.write_rows(top, pixels * valid[None, top : top + 100], valid[top : top + 100])
        writer.commit()


def test_a_scene_valid_everywhere_gets_no_mask_band(tmp_path):
    _write_rows(tmp_path / "all.tif", np.ones((700, 300), bool))
    with rasterio.open(tmp_path / "all.tif") as dst:
        assert dst.mask_flag_enums[0][0].name == "all_valid"
        assert dst.overviews(1) == [2, 4]


def test_the_mask_appears_with_the_first_invalid_pixel_and_covers_earlier_rows(tmp_path):
    valid = np.ones((700, 300), bool)
    valid[600:650, 10:20] = False  # in the third block row only
    _write_rows(tmp_path / "late.tif", valid)
    with rasterio.open(tmp_path / "late.tif") as dst:
        assert dst.mask_flag_enums[0][0].name == "per_dataset"
        assert np.array_equal(dst.dataset_mask() > 0, valid)  # rows written before the mask existed are valid
        assert (dst.read()[:, ~valid] == 0).all() and (dst.read()[:, valid] == 7).all()


def test_filling_the_next_two_block_rows_never_waits_for_the_write_in_flight(tmp_path, monkeypatch):
    """A tile row's finished rows reach two block rows past the one just handed to the writer
    thread; with only two buffers the main thread waited there for that whole write."""
    import threading

    from geosat2map.writer import GeoTIFFWriter

    release, started = threading.Event(), threading.Event()
    real_write = GeoTIFFWriter._write

    def held(self, window, pixels, valid):  # the first block row's write stalls until released
        if window.row_off == 0:
            started.set()
            assert release.wait(10)
        real_write(self, window, pixels, valid)

    monkeypatch.setattr(GeoTIFFWriter, "_write", held)
    w, h = 64, 1024
    with GeoTIFFWriter(tmp_path / "m.tif", w, h, "EPSG:32633", rasterio.transform.from_origin(0, 0, 1, 1)) as writer:
        writer.put(0, 0, np.full((3, 256, w), 1, np.uint8), None)
        writer.advance(256)  # block row 0 handed on
        assert started.wait(10)
        filled = threading.Thread(target=writer.put, args=(256, 0, np.full((3, 300, w), 2, np.uint8), None))
        filled.start()  # rows 256..555: block rows 1 and 2
        filled.join(5)
        stalled = filled.is_alive()
        release.set()
        filled.join()
        assert not stalled
        for top, end in ((556, 768), (768, h)):
            writer.advance(top)
            writer.put(top, 0, np.full((3, end - top, w), 3, np.uint8), None)
        writer.advance(h)
        writer.commit()
    with rasterio.open(tmp_path / "m.tif") as dst:
        band = dst.read(1)[:, 0]
    assert (band[:256] == 1).all() and (band[256:556] == 2).all() and (band[556:] == 3).all()


def test_gdal_block_cache_is_sized_to_the_source_blocks_reads_share(tiny_weights, tmp_path, monkeypatch):
    """rasterio takes GDAL_CACHEMAX in bytes (a small number is no cache at all). The cache must
    hold the source block row a tile row's read shares with the next (native, pixel-interleaved:
    GDAL decodes each block once for all bands), or every block of a resampled read's window
    (GDAL resamples band by band), else blocks are decoded several times."""
    import geosat2map.pipeline as pipeline

    path = write_scene(tmp_path / "wide.tif", width=3000, height=300, tiled=True, blockxsize=64, blockysize=64)
    seen = []
    stream = pipeline._stream
    monkeypatch.setattr(pipeline, "_stream", lambda *a: (seen.append(rasterio.env.getenv()["GDAL_CACHEMAX"]),
                                                          stream(*a))[1])
    translate(path, tmp_path / "map.tif", weights=tiny_weights, resolution="native")
    block_row = 64 * 3000 * 3
    with open_scene(path, resolution="native") as scene:
        assert scene.cache_bytes(256) == block_row
        assert seen == [pipeline.gdal_cache_bytes(scene, 256)] and seen[0] >= block_row
    with open_scene(path, resolution=2.0) as scene:  # 256 output rows read 512 source rows: 8 block rows + 1
        # (and a block column more where two readers' strips meet)
        assert scene.cache_bytes(256) == 9 * 64 * (3000 + (scene.readers - 1) * 64) * 3
    planar = write_scene(tmp_path / "planar.tif", width=3000, height=300, tiled=True, blockxsize=64,
                         blockysize=64, interleave="band")
    with open_scene(planar, resolution="native") as scene:  # band by band: the tile row's blocks + 1
        assert scene.cache_bytes(256) == 5 * block_row


@pytest.mark.parametrize("resolution", [1.7, 0.8])  # averaged down, interpolated up
def test_resampled_reads_do_not_depend_on_how_many_threads_read_their_strips(tiny_weights_gsd, tmp_path, monkeypatch,
                                                                               resolution):
    import geosat2map.reader as reader

    monkeypatch.setattr(reader, "STRIP", 64)
    data = np.maximum(synthetic_image(500, 900, 3), 1)
    data[:, 100:180, 300:700] = 0  # nodata across the strips' edges
    path = write_scene(tmp_path / "holes.tif", width=900, height=500, nodata=0, data=data)
    reads = []
    for readers in (1, 2, 3, 5):
        with open_scene(path, resolution=resolution) as scene:
            scene.readers = readers
            window = Window(0, 37, scene.width, 150)
            out = np.full((3, 150, scene.width), -1, np.float32)
            reads += [scene.read(window), scene.read(window, out=out)]  # a new array, the caller's buffer
            handles = list(scene._handles)
        assert len(handles) == readers - 1 and all(h.closed for h in handles)
    assert all(np.array_equal(r[0], reads[0][0]) and np.array_equal(r[1], reads[0][1]) for r in reads)
    assert not reads[0][1].all() and reads[0][1].any() and reads[0][0].min() >= 0
    # torchrun ranks on one machine share its cores.
    monkeypatch.setattr(reader.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert reader.reader_threads() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert reader.reader_threads() == 8
    # A whole translate: the same map read on one thread and on three.
    for name, cores in (("one", {0}), ("three", {0, 1, 2})):
        monkeypatch.setattr(reader.os, "sched_getaffinity", lambda pid, cores=cores: cores)
        translate(path, tmp_path / f"{name}.tif", weights=tiny_weights_gsd, resolution=resolution)
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "three.tif") as b:
        assert np.array_equal(a.read(), b.read()) and np.array_equal(a.read_masks(), b.read_masks())


@pytest.mark.parametrize("resolution", ["native", 2.0])
def test_validity_is_read_only_when_the_scene_can_have_invalid_pixels(tmp_path, resolution):
    plain = write_scene(tmp_path / "plain.tif")
    data = np.maximum(synthetic_image(500, 600, 3), 1)
    data[:, :40, :] = 0  # the top 40 rows are nodata
    holes = write_scene(tmp_path / "holes.tif", nodata=0, data=data)
    window = Window(0, 0, 100, 100)
    with open_scene(plain, resolution=resolution) as scene:
        assert scene.all_valid and scene.read(window)[1].all()
    with open_scene(holes, resolution=resolution) as scene:
        assert not scene.all_valid
        valid = scene.read(window)[1]
        edge = 40 if resolution == "native" else 20  # the nodata rows at this resolution
        assert not valid[: edge - 1].any() and valid[edge + 1 :].all()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_asynchronous_engine_gets_the_next_batch_before_the_last_is_blended(scene, tiny_weights, tmp_path,
                                                                               monkeypatch, asynchronous):
    """The order that lets a GPU compute one batch while the CPU blends the previous one (CPU
    engines blend each batch at once); the map is the same either way, and so it is with the
    GPU path's parallel compression."""
    events = []
    submit, add = InferenceEngine.submit, geosat2map.grid.RowBlender.add

    def logged_submit(self, tiles):
        events.append("submit")
        return submit(self, tiles)

    def logged_add(self, *args):
        if events[-1] != "add":
            events.append("add")
        return add(self, *args)

    monkeypatch.setattr(InferenceEngine, "submit", logged_submit)
    engines_as_if_on_a_gpu(monkeypatch, asynchronous)
    # The batch order of an asynchronous engine whose tiles are blended on the CPU (on a GPU, a
    # scene smaller than a tile; larger ones are blended on the device, tested below).
    monkeypatch.setattr(geosat2map.pipeline, "_blend_on_device", lambda engine, grid: False)
    monkeypatch.setattr(geosat2map.grid.RowBlender, "add", logged_add)
    out = tmp_path / f"map{asynchronous}.tif"
    translate(scene, out, weights=tiny_weights, batch_size=2, backend="torch")
    if asynchronous:
        assert events[:4] == ["submit", "submit", "add", "submit"]
        # Every batch is blended once; the last two back to back (nothing left to submit between them).
        assert events[-2:] == ["submit", "add"] and events.count("add") == events.count("submit") - 1
    else:
        assert events == ["submit", "add"] * (len(events) // 2)
    reference = tmp_path / "reference.tif"
    monkeypatch.undo()
    translate(scene, reference, weights=tiny_weights, batch_size=2, backend="torch")
    with rasterio.open(out) as a, rasterio.open(reference) as b:
        assert np.array_equal(a.read(), b.read())


@pytest.mark.parametrize("kind,resolution,tta", [("uint8", "native", False), ("nodata", "native", False),
                                                  ("nodata", 1.3, False), ("uint8", "native", True),
                                                  ("rotated", 2.5, False)])
def test_tiles_blended_on_the_device_give_the_cpu_blenders_map(tmp_path, tiny_weights, monkeypatch, kind,
                                                                resolution, tta):
    """The GPU path (tile rows cut, run and blended on the device, finished rows back as uint8)
    run on the CPU: the same map and mask as the CPU blender's, for 8-bit bands read as they are,
    scenes with nodata (masked pixels, skipped tiles), resampled (float) reads, flip averaging and
    a rotated scene read through GDAL's warper (its corners masked)."""
    data = synthetic_image(700, 900)
    if kind == "nodata":
        data[:, 300:700, 0:420] = 0  # whole tiles and parts of tiles
    src = write_scene(tmp_path / "s.tif", width=900, height=700, nodata=0 if kind == "nodata" else None, data=data)
    if kind == "rotated":
        with rasterio.open(src, "r+") as ds:
            ds.transform = ds.transform @ rasterio.Affine.rotation(25)
    reference, out = tmp_path / "cpu.tif", tmp_path / "device.tif"
    translate(src, reference, weights=tiny_weights, batch_size=3, backend="torch", resolution=resolution, tta=tta)
    rows = []
    stream_rows = geosat2map.device_rows.stream_rows

    def logged(scene, grid, first_row, blender, write_rows, row_done):
        rows.append(len(grid.ys))
        return stream_rows(scene, grid, first_row, blender, write_rows, row_done)

    monkeypatch.setattr(geosat2map.pipeline, "_blend_on_device",
                        lambda engine, grid: isinstance(engine, InferenceEngine))
    monkeypatch.setattr(geosat2map.device_rows, "stream_rows", logged)
    result = translate(src, out, weights=tiny_weights, batch_size=3, backend="torch", resolution=resolution,
                       tta=tta)
    assert rows and (result.tta == "flip") is tta  # the device path ran
    with rasterio.open(out) as a, rasterio.open(reference) as b:
        assert np.array_equal(a.read_masks(1), b.read_masks(1))
        diff = np.abs(a.read().astype(int) - b.read().astype(int))
        # The model's batches differ (whole rows against runs of 3 tiles), and with them the last
        # float bits of some convolutions: at most one level, rarely.
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        assert a.overviews(1) == b.overviews(1)
        if kind == "nodata":
            mask = a.read_masks(1)  # nodata: the lower left, 4/7 of the height and 7/15 of the width
            assert not mask[-mask.shape[0] // 2 :, : mask.shape[1] * 2 // 5].any() and mask[:, -10:].all()
            assert result.tiles_computed < result.tiles
        if kind == "rotated":
            mask = a.read_masks(1)
            assert mask[0, 0] == mask[-1, -1] == 0 and mask[mask.shape[0] // 2, mask.shape[1] // 2] == 255


@pytest.mark.parametrize("tile", [512, 768])
def test_tiles_taller_than_two_block_rows_are_written_on_both_blending_paths(tmp_path, tiny_weights, monkeypatch,
                                                                            tile):
    """--tile-size 512 stopped with a traceback ("rows 398..796 are not in the two block rows being
    filled") on a scene a few tiles tall: a tile row's finished rows, up to the tile size, can span
    three or four of the writer's 256-row blocks. Both blenders' maps are written whole and agree."""
    src = write_scene(tmp_path / "s.tif", width=900, height=1100, data=synthetic_image(1100, 900))
    maps = {}
    for path in ("cpu", "device"):
        if path == "device":
            monkeypatch.setattr(geosat2map.pipeline, "_blend_on_device",
                                lambda engine, grid: isinstance(engine, InferenceEngine))
        maps[path] = tmp_path / f"{path}.tif"
        result = translate(src, maps[path], weights=tiny_weights, batch_size=2, backend="torch", tile_size=tile)
        assert result.tiles == len(TileGrid(900, 1100, tile=tile)) > 2
    with rasterio.open(maps["cpu"]) as a, rasterio.open(maps["device"]) as b:
        assert (a.height, a.width) == (1100, 900) and a.dataset_mask().all()
        cpu = a.read().astype(int)
        assert np.abs(cpu - b.read().astype(int)).max() <= 1
    # No block row left as an unfilled buffer (zeros): each is near the map's mean colour.
    assert all(np.abs(cpu[:, top : top + 256].mean() - cpu.mean()) < 5 for top in range(0, 1100, 256))


def test_rectangles_spanning_three_block_rows_land_where_they_are_put(tmp_path):
    """A writer told of rectangles up to 512 rows keeps three block rows open: each rectangle's
    rows are written where it was put, none into a buffer of another block row."""
    from geosat2map.writer import GeoTIFFWriter

    w, h = 40, 1300
    tops = [0, 100, 612, 1124, h]  # 100 rows, then 512 starting mid-block: block rows 0-2 and 2-4
    with GeoTIFFWriter(tmp_path / "m.tif", w, h, "EPSG:32633", rasterio.transform.from_origin(0, 0, 1, 1),
                       put_rows=512) as writer:
        for value, (top, end) in enumerate(zip(tops, tops[1:]), start=1):
            writer.put(top, 0, np.full((3, end - top, w), value, np.uint8), None)
            writer.advance(end)
        writer.commit()
    with rasterio.open(tmp_path / "m.tif") as dst:
        band = dst.read(1)[:, 0]
    assert all((band[top:end] == value).all() for value, (top, end) in enumerate(zip(tops, tops[1:]), start=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_tiles_are_blended_on_the_device_and_match_the_cpu_map(tmp_path, tiny_weights, monkeypatch):
    """On a real GPU: the device path runs (bf16 autocast there, so values differ a little from
    the CPU's float32) and the mask is the CPU's exactly."""
    data = synthetic_image(700, 900)
    data[:, 300:700, 0:420] = 0
    src = write_scene(tmp_path / "s.tif", width=900, height=700, nodata=0, data=data)
    translate(src, tmp_path / "cpu.tif", weights=tiny_weights, device="cpu", backend="torch", precision="fp32")
    ran = []
    stream_rows = geosat2map.device_rows.stream_rows
    monkeypatch.setattr(geosat2map.device_rows, "stream_rows", lambda *a: (ran.append(1), stream_rows(*a))[1])
    result = translate(src, tmp_path / "gpu.tif", weights=tiny_weights, device="cuda", backend="torch")
    assert ran and result.device.startswith("cuda")
    with rasterio.open(tmp_path / "gpu.tif") as a, rasterio.open(tmp_path / "cpu.tif") as b:
        assert np.array_equal(a.read_masks(1), b.read_masks(1))
        diff = np.abs(a.read().astype(int) - b.read().astype(int))
        assert diff.mean() < 2 and np.percentile(diff, 99) <= 8
    # --tta-median: on the GPU the whole ViewMedian runs on the device, on the CPU an engine's views
    translate(src, tmp_path / "cpu-median.tif", weights=tiny_weights, device="cpu", backend="torch",
              precision="fp32", tta="median")
    result = translate(src, tmp_path / "gpu-median.tif", weights=tiny_weights, device="cuda", backend="torch",
                       tta="median")
    assert result.tta == "median" and result.backend.startswith("torch")
    with rasterio.open(tmp_path / "gpu-median.tif") as a, rasterio.open(tmp_path / "cpu-median.tif") as b:
        diff = np.abs(a.read().astype(int) - b.read().astype(int))
        assert diff.mean() < 2 and np.percentile(diff, 99) <= 8


def test_a_large_fine_scene_without_overviews_gets_a_hint_to_build_them(tmp_path):
    path = tmp_path / "big.tif"  # 8192 x 8192 at 0.5 m, tiled and never written: a few KB on disk
    with rasterio.open(path, "w", driver="GTiff", width=8192, height=8192, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 4500000, 0.5, 0.5),
                       tiled=True, compress="zstd", SPARSE_OK=True):
        pass
    with open_scene(path, resolution=2.12) as scene:
        assert any("gdaladdo" in note for note in scene.notes)
    with open_scene(path, resolution=1.0) as scene:  # shrunk only 2x: no hint
        assert not any("gdaladdo" in note for note in scene.notes)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.average)
    with open_scene(path, resolution=2.12) as scene:
        assert not any("gdaladdo" in note for note in scene.notes)


def test_gdal_cache_is_capped_for_a_very_wide_scene_shrunk_many_times(tmp_path):
    from geosat2map.pipeline import gdal_cache_bytes
    from geosat2map.reader import MAX_GDAL_CACHE

    path = tmp_path / "wide.tif"  # 120000 x 2048 at 0.1 m, never written: tiny on disk
    with rasterio.open(path, "w", driver="GTiff", width=120000, height=2048, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 4500000, 0.1, 0.1),
                       tiled=True, compress="zstd", SPARSE_OK=True):
        pass
    with open_scene(path, resolution=2.0) as scene:  # 20x: a tile row reads 5120 source rows
        assert scene.cache_bytes(256) > MAX_GDAL_CACHE
        assert gdal_cache_bytes(scene, 256) <= MAX_GDAL_CACHE


@pytest.mark.parametrize("kind,resolution", [("uint8", "native"), ("uint8", 1.7), ("nodata", 0.6), ("float", "native")])
def test_tile_rows_cut_from_one_read_equal_window_reads_and_read_each_row_once(tmp_path, kind, resolution):
    """The row band a tile row is cut from gives what reading each tile's window gives (native,
    enlarged and shrunk, masks and scaled input included), while GDAL is asked for every output
    row once. Shrinking averages fractional footprints, whose rounding GDAL decides per read: there
    a few pixels may differ by one level (the band gives every tile sharing a pixel the same value)."""
    from geosat2map.pipeline import _tiles

    data = synthetic_image(700, 900)
    if kind == "nodata":
        data[:, 300:420, 100:500] = 0
    path = write_scene(tmp_path / "s.tif", width=900, height=700, nodata=0 if kind == "nodata" else None,
                       dtype="float32" if kind == "float" else "uint8",
                       data=data / 255.0 if kind == "float" else data)
    with open_scene(path, resolution=resolution) as scene:
        grid = TileGrid(scene.width, scene.height)
        rows_read = []
        read = scene.read
        scene.read = lambda window, *a, **k: (rows_read.append(int(window.height)), read(window, *a, **k))[1]
        # The pixels are views of the row band, valid until the next tile row: copy them as they come.
        cut = [(r, c, None if p is None else p.astype(np.float32), v) for r, c, p, v in _tiles(scene, grid)]
        scene.read = read
        assert sum(rows_read) == scene.height  # overlapping rows are kept, not read again
        assert len(cut) == len(grid)
        for r, c, pixels, valid in cut:
            h, w = grid.tile_shape(r, c)
            expect, expect_valid = scene.read(Window(grid.xs[c], grid.ys[r], w, h))
            assert np.array_equal(valid, expect_valid)
            if pixels is None:
                assert not expect_valid.any()
            else:
                assert pixels.shape == (3, 256, 256)
                diff = np.abs(pixels[:, :h, :w] - expect)
                if scene.resampling == Resampling.average:
                    assert diff.max() <= 1 and (diff > 0).mean() < 0.002
                else:
                    assert not diff.any()


def test_batch_size_defaults_to_8_on_the_cpu_16_in_bf16_and_to_the_free_memory_on_a_gpu(scene, tiny_weights, tmp_path,
                                                                                       monkeypatch):
    import geosat2map.engine as engine

    assert [engine.batch_for_memory(f, 10) for f in (5, 40, 100, 10**9)] == [1, 4, 8, engine.GPU_BATCH_MAX]
    result = translate(scene, tmp_path / "map.tif", weights=tiny_weights, precision="fp32")
    assert result.batch_size == engine.CPU_BATCH == 8
    result = translate(scene, tmp_path / "bf16.tif", weights=tiny_weights, precision="bf16")
    assert result.batch_size == engine.CPU_BATCH_BF16 == 16 and result.backend == "torch-bf16"
    assert translate(scene, tmp_path / "b3.tif", weights=tiny_weights, batch_size=3).batch_size == 3

    # On CUDA: the peak memory of a 4-tile trial batch, here 50 MB a tile, against half the free memory.
    allocated = {"now": 10**9, "peak": 0}

    class TrialEngine:
        def __init__(self, model, device, bf16):
            pass

        def __call__(self, tiles):
            allocated["peak"] = allocated["now"] + len(tiles) * 50 * 10**6

    monkeypatch.setattr(engine, "InferenceEngine", TrialEngine)
    cuda = torch.cuda
    for name, fake in {"synchronize": lambda device: None, "reset_peak_memory_stats": lambda device: None,
                       "memory_allocated": lambda device: allocated["now"],
                       "max_memory_allocated": lambda device: allocated["peak"]}.items():
        monkeypatch.setattr(cuda, name, fake)
    gpu = torch.device("cuda")
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: (3 * 10**9, 8 * 10**9))
    assert engine.auto_batch_size(None, gpu) == 16  # 1.5 GB / 50 MB = 30 tiles
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: (120 * 10**9, 140 * 10**9))
    assert engine.auto_batch_size(None, gpu) == engine.GPU_BATCH_MAX


def test_glibc_is_told_to_keep_or_give_back_freed_memory_and_others_are_left_alone(monkeypatch):
    import platform

    from geosat2map.allocator import release_freed_memory, retain_freed_memory

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert retain_freed_memory() is glibc  # mallopt accepted both thresholds
    assert release_freed_memory() is glibc
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert retain_freed_memory() is False and release_freed_memory() is False


def test_water_by_ndwi_counts_where_the_water_colour_falls(tmp_path):
    from geosat2map.evaluate import water_by_ndwi

    scene = np.zeros((4, 20, 20), np.uint8)
    scene[1, :, :10], scene[3, :, :10] = 100, 10  # left: water (NDWI 0.82)
    scene[1, :, 10:], scene[3, :, 10:] = 50, 150  # right: land (NDWI -0.5)
    painted = np.full((3, 20, 20), 240, np.uint8)
    painted[:, :, 2:11] = np.array([150, 180, 220], np.uint8)[:, None, None]  # 8 water columns, 1 land
    transform = rasterio.transform.from_origin(500000, 4500000, 5, 5)
    for path, data in ((tmp_path / "scene.tif", scene), (tmp_path / "map.tif", painted)):
        with rasterio.open(path, "w", driver="GTiff", width=20, height=20, count=len(data), dtype="uint8",
                           crs="EPSG:32633", transform=transform) as dst:
            dst.write(data)
    w = water_by_ndwi(tmp_path / "scene.tif", tmp_path / "map.tif")
    assert w["water"] == w["land"] == 0.5
    assert w["precision"] == pytest.approx(8 / 9) and w["land_as_water"] == pytest.approx(0.1)
    assert w["water_found"] == pytest.approx(0.8)


@pytest.mark.parametrize("options, phrase", [
    (dict(resolution="fine"), "resolution is 'model', 'native' or metres per pixel"),
    (dict(bounds=(0.0, 0.0, 1.0)), "bounds are four numbers"),
    (dict(batch_size=10**9), "use a smaller --batch-size"),
])
def test_the_python_api_refuses_bad_options_with_its_own_error(scene, tiny_weights, tmp_path, options, phrase):
    """Callers of the library get a Geosat2mapError (one line in the CLI), not a ValueError from
    float() or tuple unpacking, nor a MemoryError allocating a billion-tile batch."""
    from geosat2map.errors import Geosat2mapError

    out = tmp_path / "map.tif"
    with pytest.raises(Geosat2mapError, match=phrase):
        translate(scene, out, weights=tiny_weights, resolution=options.pop("resolution", "native"), **options)
    assert not out.exists()
