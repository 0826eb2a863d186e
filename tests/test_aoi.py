"""translate --aoi: only the ground inside polygons, the rest of their bounding box nodata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from pyproj import Transformer

from geosat2map import translate
from geosat2map.aoi import AreaOfInterest
from geosat2map.errors import InputError, Interrupted
from geosat2map.reader import open_scene

from .conftest import stop_after, synthetic_image, write_scene

#: write_scene's origin: 1 m pixels from (500000, 4500000) down and to the right, EPSG:32633.
LEFT, TOP, CRS = 500000.0, 4500000.0, "EPSG:32633"
#: An L: the box from 50 to 550 m east and 25 to 475 m south of the origin without its lower
#: right 300 x 300 m, so the last tile (x 294-550, y 219-475 of the box) lies wholly outside.
L_SHAPE = shapely.Polygon([(LEFT + x, TOP - y) for x, y in
                           [(50, 25), (550, 25), (550, 175), (250, 175), (250, 475), (50, 475)]])


def write_polygons(path: Path, geoms: list, crs: str = CRS) -> Path:
    """``geoms`` as a vector file (pyogrio's raw writer: no geopandas needed)."""
    pyogrio.raw.write(path, geometry=np.array(shapely.to_wkb(geoms), dtype=object), field_data=[], fields=[],
                      crs=crs, geometry_type="Polygon" if all(g.geom_type == "Polygon" for g in geoms) else "Unknown",
                      encoding="UTF-8")
    return path


def _read(path: Path) -> tuple:
    with rasterio.open(path) as ds:
        return ds.read(), ds.dataset_mask(), ds.transform, ds.crs


@pytest.mark.parametrize("on_device", [False, True])
def test_inside_the_polygons_the_map_of_their_box_outside_nodata(tiny_weights, tmp_path, monkeypatch, on_device):
    """Also on the GPU path (run here on the CPU), which cuts and blends whole tile rows itself."""
    if on_device:
        import geosat2map.pipeline as pipeline
        from geosat2map.engine import InferenceEngine

        monkeypatch.setattr(pipeline, "_blend_on_device", lambda engine, grid: isinstance(engine, InferenceEngine))
    scene = write_scene(tmp_path / "scene.tif", width=600, height=500)
    aoi = write_polygons(tmp_path / "aoi.gpkg", [L_SHAPE])
    out, boxed = tmp_path / "aoi.tif", tmp_path / "box.tif"
    result = translate(scene, out, weights=tiny_weights, backend="torch", aoi=str(aoi))
    whole = translate(scene, boxed, weights=tiny_weights, backend="torch", bounds=L_SHAPE.bounds)
    pixels, mask, transform, crs = _read(out)
    box_pixels, _, box_transform, _ = _read(boxed)
    assert transform == box_transform and crs == CRS and pixels.shape == (3, 450, 500)
    # Valid exactly where a pixel's centre lies inside the polygon (GDAL's rasterisation rule).
    cols, rows = np.meshgrid(np.arange(500) + 0.5, np.arange(450) + 0.5)
    xs, ys = transform @ (cols, rows)
    expected = shapely.contains_xy(L_SHAPE, xs, ys)
    assert (mask > 0).sum() == 500 * 150 + 200 * 300
    np.testing.assert_array_equal(mask > 0, expected)
    # There, the very pixels of the box's map; the tile wholly outside is not computed.
    np.testing.assert_array_equal(pixels[:, expected], box_pixels[:, expected])
    assert result.tiles_computed == result.tiles - 1 and whole.tiles_computed == whole.tiles
    with rasterio.open(out) as ds, rasterio.open(boxed) as box:
        assert ds.tags()["GEOSAT2MAP_AOI"] == "aoi.gpkg" and "GEOSAT2MAP_AOI" not in box.tags()


def test_polygons_in_another_crs_are_carried_into_the_scenes(tiny_weights_gsd, tmp_path):
    """Longitude/latitude polygons (GeoJSON) on a UTM scene resampled to 2 m: the map covers them,
    at most a source pixel more on each side, and is valid on about their share of its box."""
    scene = write_scene(tmp_path / "scene.tif", width=600, height=500)
    to_lonlat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    lonlat = shapely.transform(shapely.segmentize(L_SHAPE, 10), lambda xy: np.column_stack(to_lonlat.transform(*xy.T)))
    aoi = write_polygons(tmp_path / "aoi.geojson", [lonlat], crs="EPSG:4326")
    out = tmp_path / "map.tif"
    result = translate(scene, out, weights=tiny_weights_gsd, backend="torch", aoi=str(aoi))
    assert result.gsd_m == pytest.approx(2.0, rel=0.01)
    with rasterio.open(out) as ds:
        got, share = ds.bounds, (ds.dataset_mask() > 0).mean()
    left, bottom, right, top = L_SHAPE.bounds
    assert got.left <= left < got.left + 1 and got.bottom <= bottom < got.bottom + 1
    assert got.right - 1 < right <= got.right and got.top - 1 < top <= got.top
    assert share == pytest.approx(L_SHAPE.area / shapely.box(*L_SHAPE.bounds).area, abs=0.01)


def test_a_resumed_run_needs_the_same_area(tiny_weights, tmp_path):
    scene = write_scene(tmp_path / "scene.tif", width=600, height=1200)
    full = shapely.box(LEFT, TOP - 1200, LEFT + 600, TOP)
    holed = write_polygons(tmp_path / "holed.gpkg", [full.difference(shapely.box(LEFT + 100, TOP - 900, LEFT + 400,
                                                                                 TOP - 600))])
    other = write_polygons(tmp_path / "other.gpkg", [full.difference(shapely.box(LEFT + 100, TOP - 900, LEFT + 300,
                                                                                 TOP - 600))])
    whole, out = tmp_path / "whole.tif", tmp_path / "map.tif"
    translate(scene, whole, weights=tiny_weights, aoi=str(holed))
    with pytest.raises(Interrupted):
        translate(scene, out, weights=tiny_weights, aoi=str(holed), progress=stop_after(10))
    with pytest.raises(InputError, match="aoi="):  # the same box (crop), another polygon
        translate(scene, out, weights=tiny_weights, aoi=str(other), resume=True)
    translate(scene, out, weights=tiny_weights, aoi=str(holed), resume=True)
    for a, b in zip(_read(whole), _read(out)):
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
    mask = _read(out)[1]
    assert not mask[600:900, 100:400].any() and mask[:600].all() and mask[900:].all()  # the hole is nodata


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_an_area_needs_a_georeferenced_scene(tiny_weights, tmp_path):
    plain = write_scene(tmp_path / "plain.tif", crs=None)
    aoi = write_polygons(tmp_path / "aoi.gpkg", [L_SHAPE])
    with pytest.raises(InputError, match="no georeferencing: an area of interest cannot be placed on it"):
        translate(plain, tmp_path / "map.tif", weights=tiny_weights, allow_ungeoreferenced=True, aoi=str(aoi))


@pytest.mark.parametrize("make, options, message", [
    (lambda d: write_polygons(d / "far.gpkg", [shapely.box(0, 0, 10, 10)]), {}, "do not overlap"),
    (lambda d: write_polygons(d / "a.gpkg", [L_SHAPE]), {"bounds": (LEFT, TOP - 10, LEFT + 10, TOP)}, "not both"),
    (lambda d: d / "missing.gpkg", {}, "vector file not found"),
    (lambda d: d / "scene.tif", {}, "cannot read vectors"),
])
def test_an_unusable_area_is_one_line_and_writes_nothing(make, options, message, tiny_weights, tmp_path):
    scene = write_scene(tmp_path / "scene.tif")
    out = tmp_path / "map.tif"
    with pytest.raises(InputError, match=message):
        translate(scene, out, weights=tiny_weights, aoi=str(make(tmp_path)), **options)
    assert not out.exists()


def test_lines_are_no_area(tiny_weights, tmp_path):
    scene = write_scene(tmp_path / "scene.tif")
    roads = tmp_path / "roads.gpkg"
    line = shapely.LineString([(LEFT, TOP - 10), (LEFT + 300, TOP - 200)])
    pyogrio.raw.write(roads, geometry=np.array([shapely.to_wkb(line)], dtype=object), field_data=[], fields=[],
                      crs=CRS, geometry_type="LineString", encoding="UTF-8")
    with pytest.raises(InputError, match="no polygons"):
        translate(scene, tmp_path / "map.tif", weights=tiny_weights, aoi=str(roads))


@pytest.mark.parametrize("shape", ["diagonal", "ring"])
def test_a_plan_counts_the_tiles_the_run_computes(tiny_weights_gsd, tmp_path, shape):
    """translate's plan (--dry-run) counts the tiles with a pixel inside the area, as the run then
    computes them, without reading the scene: a thin diagonal band and a ring on a 1 m scene
    mapped at 2 m (the run's count is of tiles with a valid pixel: the scene has no nodata)."""
    from geosat2map.pipeline import plan_translation

    scene = write_scene(tmp_path / "scene.tif", width=1800, height=1600)
    box = shapely.box(LEFT, TOP - 1600, LEFT + 1800, TOP)
    polygon = (shapely.LineString([(LEFT, TOP), (LEFT + 1800, TOP - 1600)]).buffer(3) if shape == "diagonal"
               else box.buffer(-100).difference(box.buffer(-150)))
    aoi = write_polygons(tmp_path / "aoi.gpkg", [polygon])
    plan = plan_translation(scene, tiny_weights_gsd, aoi=str(aoi))
    result = translate(scene, tmp_path / "map.tif", weights=tiny_weights_gsd, backend="torch", aoi=str(aoi))
    assert (plan.width, plan.height, plan.grid_tiles) == (result.width, result.height, result.tiles)
    assert plan.tiles == result.tiles_computed < result.tiles


def test_cli_aoi(tiny_weights, tmp_path):
    from .conftest import run

    scene = write_scene(tmp_path / "scene.tif")
    aoi = write_polygons(tmp_path / "aoi.gpkg", [L_SHAPE])
    out = tmp_path / "map.tif"
    result = run("translate", scene, out, "--weights", tiny_weights, "--quiet", "--aoi", aoi)
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        assert ds.bounds == L_SHAPE.bounds and (ds.dataset_mask() == 0).any()
    assert run("info", out).stdout.splitlines()[2].endswith("; only inside the polygons of aoi.gpkg")
    planned = run("translate", scene, tmp_path / "plan.tif", "--weights", tiny_weights, "--aoi", aoi, "--dry-run")
    assert planned.stdout.strip().endswith(" 8 tiles of 256 overlapping by 64 (1 more outside the area of interest)")
    result = run("translate", scene, tmp_path / "b.tif", "--weights", tiny_weights, "--aoi", aoi, "--bounds",
                 LEFT, TOP - 10, LEFT + 10, TOP)
    assert result.exit_code == 1 and result.output.strip() == \
        "geosat2map: error: give bounds or an area of interest, not both"
    assert not (tmp_path / "b.tif").exists()


def test_several_scenes_one_area(tiny_weights, tmp_path):
    """The area is read once for all scenes; a scene it does not reach fails alone."""
    from geosat2map.pipeline import translate_many

    near = write_scene(tmp_path / "near.tif")
    far = write_scene(tmp_path / "far.tif")
    with rasterio.open(far, "r+") as ds:  # 100 km east
        ds.transform = rasterio.transform.from_origin(600000, 4500000, 1, 1)
    aoi = write_polygons(tmp_path / "aoi.gpkg", [L_SHAPE])
    (tmp_path / "maps").mkdir()
    outcomes = dict(translate_many([near, far], tmp_path / "maps", weights=tiny_weights, aoi=str(aoi)))
    assert isinstance(outcomes[far], InputError) and "do not overlap" in str(outcomes[far])
    assert outcomes[near].width == 500 and sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["near.tif"]


def test_a_stretched_scene_takes_its_colours_from_inside_the_polygons(tmp_path):
    """A uint16 scene's 2-98 % stretch: bright ground in the L's box but outside the L (a quarry,
    a cloud) would set the top of the range and darken the whole map."""
    data = synthetic_image(500, 600, count=3).astype(np.float64) * 40 + 500
    data[:, 175:475, 250:550] = 60000  # the box's lower right, outside the L
    path = write_scene(tmp_path / "scene.tif", dtype="uint16", data=data)
    area = AreaOfInterest.read(str(write_polygons(tmp_path / "aoi.gpkg", [L_SHAPE])))
    with open_scene(path, resolution="native", aoi=area) as scene:
        lo, hi = scene.stretch
    stored = data.astype(np.uint16)
    inside = np.concatenate([stored[:, 25:175, 50:550].reshape(3, -1),
                             stored[:, 175:475, 50:250].reshape(3, -1)], axis=1)
    np.testing.assert_allclose(hi, np.percentile(inside, 98, axis=1), rtol=1e-6)
    np.testing.assert_allclose(lo, np.percentile(inside, 2, axis=1), rtol=1e-6)
    assert (hi < 60000).all()
