"""translate --bounds: only the source pixels that cover a box, as if the scene had been clipped to them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from geosat2map import translate
from geosat2map.errors import InputError

from .conftest import write_scene

#: write_scene's origin: 1 m pixels from (500000, 4500000) down and to the right.
LEFT, TOP = 500000.0, 4500000.0


def _clip(scene: Path, window: Window, dst: Path) -> Path:
    """The scene's ``window`` as a file of its own (what gdal_translate -srcwin would write)."""
    with rasterio.open(scene) as src:
        profile = src.profile | {"width": int(window.width), "height": int(window.height),
                                 "transform": src.window_transform(window)}
        with rasterio.open(dst, "w", **profile) as out:
            out.write(src.read(window=window))
    return dst


def _read(path: Path) -> tuple:
    with rasterio.open(path) as ds:
        return ds.read(), ds.dataset_mask(), ds.transform, ds.crs


@pytest.mark.parametrize("weights", ["tiny_weights", "tiny_weights_gsd"])  # native, and resampled 1 m -> 2 m
def test_bounds_translate_what_a_clipped_scene_would(weights, scene, tmp_path, request):
    weights = request.getfixturevalue(weights)
    # Pixel edges, except the right and bottom, which fall inside pixels and take them whole.
    bounds = (LEFT + 100, TOP - 430.5, LEFT + 520.2, TOP - 30)
    clipped = _clip(scene, Window(100, 30, 421, 401), tmp_path / "clipped.tif")
    by_bounds, by_clip = tmp_path / "bounds.tif", tmp_path / "clip.tif"
    translate(scene, by_bounds, weights=weights, backend="torch", bounds=bounds)
    translate(clipped, by_clip, weights=weights, backend="torch")
    a, b = _read(by_bounds), _read(by_clip)
    assert a[2] == b[2] and a[3] == b[3]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bounds_in_another_crs_are_covered(scene, tiny_weights, tmp_path):
    with rasterio.open(scene) as src:
        crs = src.crs
    lonlat = transform_bounds(crs, "EPSG:4326", LEFT + 100, TOP - 400, LEFT + 400, TOP - 100)
    out = tmp_path / "map.tif"
    translate(scene, out, weights=tiny_weights, backend="torch", bounds=lonlat, bounds_crs="EPSG:4326")
    asked = transform_bounds("EPSG:4326", crs, *lonlat, densify_pts=21)
    with rasterio.open(out) as ds:
        got = ds.bounds
    # All of the box, and at most a source pixel more on each side.
    assert got.left <= asked[0] < got.left + 1 and got.bottom <= asked[1] < got.bottom + 1
    assert got.right - 1 < asked[2] <= got.right and got.top - 1 < asked[3] <= got.top


def test_bounds_past_the_edge_are_cut_and_said(scene, tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    result = translate(scene, out, weights=tiny_weights, backend="torch",
                       bounds=(LEFT - 50, TOP - 200, LEFT + 300, TOP + 50))
    assert (result.width, result.height) == (300, 200)
    assert any("bounds reach past the scene" in note for note in result.notes)


@pytest.mark.parametrize("bounds, crs, message", [
    ((LEFT + 1000, TOP - 100, LEFT + 1100, TOP), None, "the bounds and .* do not overlap"),
    ((LEFT + 100, TOP - 100, LEFT, TOP), None, "left < right"),
    ((0, 0, 1, 1), "EPSG:99999", "unknown CRS"),
])
def test_bad_bounds_are_one_line(bounds, crs, message, scene, tiny_weights, tmp_path):
    out = tmp_path / "map.tif"
    with pytest.raises(InputError, match=message):
        translate(scene, out, weights=tiny_weights, bounds=bounds, bounds_crs=crs)
    assert not out.exists()


def test_bounds_need_georeferencing(tiny_weights, tmp_path):
    plain = write_scene(tmp_path / "plain.tif", crs=None)
    with pytest.raises(InputError, match="no georeferencing"):
        translate(plain, tmp_path / "map.tif", weights=tiny_weights, allow_ungeoreferenced=True, bounds=(0, 0, 10, 10))


def test_cli_bounds(scene, tiny_weights, tmp_path):
    from .conftest import run

    out = tmp_path / "map.tif"
    result = run("translate", scene, out, "--weights", tiny_weights, "--quiet", "--bounds", LEFT + 50, TOP - 250,
                 LEFT + 350, TOP - 50)
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        assert ds.shape == (200, 300) and ds.transform.c == LEFT + 50 and ds.transform.f == TOP - 50


def test_a_box_of_a_scene_too_wide_to_stream_whole(scene, tiny_weights, tmp_path):
    """A mosaic 50 million pixels wide (a VRT of 1 cm pixels, 500 km, holding the test scene 10 km
    east) is refused whole, its row buffers would not fit in memory, while a box of it is
    translated like the scene itself."""
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="0">{scene}'
        f'</SourceFilename><SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="600" ySize="500"/>'
        f'<DstRect xOff="1000000" yOff="0" xSize="600" ySize="500"/></SimpleSource></VRTRasterBand>'
        for b in (1, 2, 3))
    mosaic = tmp_path / "mosaic.vrt"
    mosaic.write_text(f'<VRTDataset rasterXSize="50000000" rasterYSize="500"><SRS>EPSG:32633</SRS>'
                      f'<GeoTransform>{LEFT}, 0.01, 0, {TOP}, 0, -0.01</GeoTransform>{bands}</VRTDataset>')
    with pytest.raises(InputError, match="pixels wide"):
        translate(mosaic, tmp_path / "whole.tif", weights=tiny_weights)
    box, alone = tmp_path / "box.tif", tmp_path / "alone.tif"
    translate(mosaic, box, weights=tiny_weights, backend="torch",
              bounds=(LEFT + 10_000, TOP - 5, LEFT + 10_006, TOP))
    translate(scene, alone, weights=tiny_weights, backend="torch")
    with rasterio.open(box) as a, rasterio.open(alone) as b:
        assert a.transform.c == pytest.approx(LEFT + 10_000) and a.shape == b.shape
        np.testing.assert_array_equal(a.read(), b.read())
