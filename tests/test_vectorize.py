"""vectorize: a class raster's patches as polygons, whole across strips, with their ground areas."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import shapely
from affine import Affine
from click.testing import CliRunner
from geosat2map_cli.main import cli

from geosat2map.classify import classify_map
from geosat2map.errors import InputError, OutputError
from geosat2map.metrics import MAP_CLASSES
from geosat2map.vectorize import vectorize_classes

from .test_classify import write_map

UTM = Affine(2, 0, 500000, 0, -2, 4600000)


def lakes_map(height: int = 300, width: int = 200) -> np.ndarray:
    """Park ground with a 100 x 40 lake (cut by every strip edge of 32 rows) holding a 2 x 1 speck of
    land across a strip's edge, a ring-shaped lake around a park island, a 2 x 1 speck of water,
    a building, and a road one pixel wide from row 30 to 89 (2 of its pixels above the strip edge
    at row 32)."""
    rgb = np.empty((3, height, width), np.uint8)
    rgb[:] = np.array(MAP_CLASSES["park"], np.uint8)[:, None, None]

    def paint(rows: slice, cols: slice, name: str) -> None:
        rgb[:, rows, cols] = np.array(MAP_CLASSES[name], np.uint8)[:, None, None]

    paint(slice(10, 110), slice(20, 60), "water")  # rows 10-109
    paint(slice(150, 250), slice(100, 180), "water")
    paint(slice(180, 220), slice(130, 150), "park")  # the island: 40 x 20 pixels
    paint(slice(280, 282), slice(5, 6), "water")  # the speck
    paint(slice(40, 60), slice(150, 170), "building")
    paint(slice(63, 65), slice(30, 31), "land")  # the speck in the lake, rows 63 and 64
    paint(slice(30, 90), slice(190, 191), "road")
    return rgb


@pytest.fixture
def classes(tmp_path):
    src = write_map(tmp_path / "map.tif", lakes_map(), "EPSG:32633", UTM)
    classify_map(src, tmp_path / "classes.tif")
    return tmp_path / "classes.tif"


def read(path) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    meta, _, wkb, fields = pyogrio.raw.read(path)
    by_name = dict(zip(meta["fields"], fields))
    return list(by_name["class"]), shapely.from_wkb(wkb), np.asarray(by_name["area_m2"]), meta


@pytest.mark.parametrize("strip_rows", [32, 1024])
def test_each_patch_is_one_polygon_whole_across_strips_with_holes_and_ground_area(classes, tmp_path, strip_rows):
    out = tmp_path / f"features-{strip_rows}.gpkg"
    by_class = vectorize_classes(classes, out, strip_rows=strip_rows)
    names, geoms, areas, meta = read(out)
    assert pyogrio.read_info(out)["crs"] == "EPSG:32633" and meta["geometry_type"] == "Polygon"
    water = sorted((g for n, g in zip(names, geoms) if n == "water"), key=lambda g: g.area)
    assert len(water) == 2  # the speck (2 pixels) merged into the park, the lake cut by strips made whole
    lake, ring = water
    # ... and the speck of land in it merged into it, as gdal_sieve merges: no hole left
    assert lake.equals(shapely.box(500000 + 20 * 2, 4600000 - 110 * 2, 500000 + 60 * 2, 4600000 - 10 * 2))
    assert len(ring.interiors) == 1 and ring.area == (100 * 80 - 40 * 20) * 4
    assert names.count("building") == 1 and "park" in names and "land" not in names
    # On the ellipsoid: UTM's plane shrinks the ground by its scale factor (0.9996 on the central
    # meridian, more away from it), so the ground area is a little larger than the plane's.
    lake_area = next(a for g, a in zip(geoms, areas) if g.equals(lake))
    assert 1.0 < lake_area / lake.area < 1.002
    assert by_class["water"].count == 2 and by_class["water"].area_m2 == pytest.approx(
        sum(a for n, a in zip(names, areas) if n == "water"))
    # The road (60 pixels) is no speck, though a strip of 32 rows holds only 2 of its pixels.
    assert by_class["road"].count == 1 and by_class["road"].area_m2 == pytest.approx(60 * 4, rel=2e-3)


def test_min_pixels_and_classes_choose_the_features(classes, tmp_path):
    vectorize_classes(classes, tmp_path / "all.geojson", classes=("water",), min_pixels=1)
    names, geoms, _, _ = read(tmp_path / "all.geojson")
    assert names == ["water"] * 3 and min(g.area for g in geoms) == 2 * 4
    assert max(len(g.interiors) for g in geoms) == 1  # unsieved: the speck of land is a hole in the lake
    vectorize_classes(classes, tmp_path / "big.fgb", classes=("water", "building"), min_pixels=1000)
    names, _, _, _ = read(tmp_path / "big.fgb")
    assert sorted(names) == ["water", "water"]  # the building (400 pixels) is under 1000


def test_bad_input_is_one_line_and_nothing_is_written(classes, tmp_path):
    mapped = write_map(tmp_path / "rgb.tif", lakes_map(), "EPSG:32633", UTM)
    with pytest.raises(InputError, match="not a class raster"):
        vectorize_classes(mapped, tmp_path / "x.gpkg")
    with pytest.raises(InputError, match="unknown class lake"):
        vectorize_classes(classes, tmp_path / "x.gpkg", classes=("water", "lake"))
    with pytest.raises(OutputError, match="name it .gpkg"):
        vectorize_classes(classes, tmp_path / "x.shp")
    (tmp_path / "kept.gpkg").write_text("mine")
    with pytest.raises(OutputError, match="exists"):
        vectorize_classes(classes, tmp_path / "kept.gpkg")
    assert (tmp_path / "kept.gpkg").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.qml", "classes.tif", "kept.gpkg", "map.tif",
                                                         "rgb.tif"]


def test_cli_prints_counts_and_areas(classes, tmp_path):
    out = tmp_path / "f.gpkg"
    result = CliRunner().invoke(cli, ["vectorize", str(classes), str(out), "--classes", "water", "--json"])
    assert result.exit_code == 0, result.output
    water = json.loads(result.stdout)["water"]
    assert water["features"] == 2 and water["area_m2"] == pytest.approx((100 * 40 + 100 * 80 - 800) * 4, rel=2e-3)
    result = CliRunner().invoke(cli, ["vectorize", str(classes), str(out)])
    assert result.exit_code == 1 and "exists" in result.stderr and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["vectorize", str(classes), str(out), "--overwrite"])
    # park ground and island, 2 lakes, a building, a road
    assert result.exit_code == 0 and result.stdout.startswith(f"wrote {out}: 6 polygons")
    assert "water" in result.stdout and " ha" in result.stdout


def test_a_raster_without_a_crs_gets_features_without_areas(tmp_path):
    import warnings

    src = write_map(tmp_path / "map.tif", lakes_map(), None, Affine.identity())
    classify_map(src, tmp_path / "classes.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CRS is no news: nothing to warn about
        by_class = vectorize_classes(tmp_path / "classes.tif", tmp_path / "f.gpkg", classes=("water",))
    assert by_class["water"].count == 2 and by_class["water"].area_m2 is None
    _, geoms, areas, _ = read(tmp_path / "f.gpkg")
    assert pyogrio.read_info(tmp_path / "f.gpkg")["crs"] is None and np.isnan(areas.astype(float)).all()  # null
    assert sorted(g.area for g in geoms) == [40 * 100, 100 * 80 - 40 * 20]  # in pixels


def test_simplify_smooths_outlines_and_keeps_neighbours_edge_to_edge(tmp_path):
    """A round lake and a diagonal road in park ground: every pixel is a feature, so the features
    tile the raster, and must still do after simplification (no slivers, no overlaps)."""
    rgb = lakes_map()
    yy, xx = np.mgrid[:300, :200]
    rgb[:, (yy - 150) ** 2 + (xx - 60) ** 2 < 45 ** 2] = np.array(MAP_CLASSES["water"], np.uint8)[:, None]
    rgb[:, np.abs(yy - xx - 40) < 3] = np.array(MAP_CLASSES["road"], np.uint8)[:, None]
    src = write_map(tmp_path / "map.tif", rgb, "EPSG:32633", UTM)
    classify_map(src, tmp_path / "classes.tif")
    every = ("building", "road", "water", "park")
    by_tolerance = {}
    for tolerance in (0, 1.5):
        out = tmp_path / f"f{tolerance}.gpkg"
        by_class = vectorize_classes(tmp_path / "classes.tif", out, classes=every, simplify=tolerance,
                                     strip_rows=64)
        _, geoms, _, _ = read(out)
        raster = 300 * 200 * 4
        assert shapely.union_all(geoms).area == pytest.approx(raster)  # no gaps ...
        assert sum(g.area for g in geoms) == pytest.approx(raster)  # ... and no overlaps
        assert shapely.is_valid(geoms).all()
        # Simplified, each shared edge has the same vertices on both sides (GEOS's valid coverage);
        # traced, an outline has none where its neighbour turns (no gap or overlap either way).
        assert shapely.coverage_is_valid(geoms) == (tolerance > 0)
        by_tolerance[tolerance] = (int(shapely.get_num_coordinates(geoms).sum()), by_class)
    (exact, exact_classes), (smooth, smooth_classes) = by_tolerance[0], by_tolerance[1.5]
    assert smooth < exact / 2  # the staircases taken out
    assert smooth_classes["water"].count == exact_classes["water"].count
    assert smooth_classes["water"].area_m2 == pytest.approx(exact_classes["water"].area_m2, rel=0.02)
    with pytest.raises(InputError, match="0 or more pixels"):
        vectorize_classes(tmp_path / "classes.tif", tmp_path / "x.gpkg", simplify=-1)
