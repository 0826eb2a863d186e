"""Scenes placed on the Earth by something other than a north-up geotransform (a rotated, turned
or flipped one, ground control points, RPCs) are warped north-up by GDAL, as QGIS shows them:
every pixel lands where its georeferencing says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.enums import Resampling
from rasterio.windows import Window

from geosat2map import translate
from geosat2map.errors import InputError
from geosat2map.reader import open_scene
from geosat2map.weights import ModelSpec

from .conftest import oblique_rpcs, random_generator

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # writing them

SIZE = 200
#: The white square's rows and columns in the scene's own pixels, and its centre there.
MARK = (slice(40, 70), slice(110, 140))
MARK_CENTRE = (125.0, 55.0)  # column, row
#: 1 m pixels turned 30 degrees, the top-left corner at a UTM easting/northing.
ROTATED = Affine.translation(500000, 4500000) @ Affine.rotation(30) @ Affine.scale(1, -1)


def _image() -> np.ndarray:
    image = np.full((3, SIZE, SIZE), 60, np.uint8)
    image[:, MARK[0], MARK[1]] = 250
    return image


def _write(path: Path, **georef) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                       **{k: v for k, v in georef.items() if k in ("crs", "transform")}) as dst:
        dst.write(_image())
        if "gcps" in georef:
            dst.gcps = georef["gcps"]
        if "rpcs" in georef:
            dst.rpcs = georef["rpcs"]
    return path


def rotated(tmp_path: Path) -> Path:
    return _write(tmp_path / "rotated.tif", crs="EPSG:32633", transform=ROTATED)


#: A quarter turn: a transform with a and e zero, which is still "rectilinear" to affine.
TURNED = Affine.translation(500000, 4500000) @ Affine.rotation(90) @ Affine.scale(1, -1)


def turned(tmp_path: Path) -> Path:
    return _write(tmp_path / "turned.tif", crs="EPSG:32633", transform=TURNED)


def by_gcps(tmp_path: Path) -> Path:
    """The rotated scene's placement given as ground control points at its corners and centre."""
    pixels = [(0, 0), (0, SIZE), (SIZE, 0), (SIZE, SIZE), (SIZE / 2, SIZE / 2)]
    points = [GroundControlPoint(row, col, *(ROTATED @ (col, row))) for row, col in pixels]
    return _write(tmp_path / "gcps.tif", gcps=(points, "EPSG:32633"))


#: RPCs of an oblique view: longitude and latitude linear in the column and the row, and ground
#: above or below the scene's mean height (HEIGHT_OFF, 500 m) shifted along the columns.
LON0, LAT0, DEG = -115.1, 36.2, 1e-5  # the centre, and degrees per pixel


def by_rpcs(tmp_path: Path) -> Path:
    return _write(tmp_path / "rpcs.tif", rpcs=oblique_rpcs(SIZE, LON0, LAT0, DEG))


def _mark_position(scene) -> tuple[float, float]:
    """Where the white square's centre lands on the scene's output grid, in its CRS."""
    pixels, valid = scene.read(Window(0, 0, scene.width, scene.height))
    rows, cols = np.nonzero((pixels[0] > 200) & valid)
    assert len(rows), "the square was lost"
    return scene.transform @ (cols.mean() + 0.5, rows.mean() + 0.5)


@pytest.mark.parametrize("make, expected", [
    (rotated, ROTATED @ MARK_CENTRE),
    (turned, TURNED @ MARK_CENTRE),
    (by_gcps, ROTATED @ MARK_CENTRE),
    (by_rpcs, (LON0 + (MARK_CENTRE[0] - SIZE / 2) * DEG, LAT0 - (MARK_CENTRE[1] - SIZE / 2) * DEG)),
])
def test_every_pixel_lands_where_its_georeferencing_says(tmp_path, make, expected):
    with open_scene(make(tmp_path), resolution="native") as scene:
        assert scene.transform.b == scene.transform.d == 0  # north-up
        assert scene.transform.e < 0
        assert any("placed north-up by GDAL's warper" in note for note in scene.notes)
        x, y = _mark_position(scene)
        pixel = abs(scene.transform.a)
        assert abs(x - expected[0]) < 1.5 * pixel and abs(y - expected[1]) < 1.5 * pixel, (x, y, expected)
        # Read as it is: bilinear, not nearest's staircase.
        assert scene.src.resampling == Resampling.bilinear


def test_rotated_footprint_is_masked_outside_the_scene(tmp_path):
    with open_scene(rotated(tmp_path), resolution="native") as scene:
        _, valid = scene.read(Window(0, 0, scene.width, scene.height))
        corners = [valid[0, 0], valid[0, -1], valid[-1, 0], valid[-1, -1]]
        assert not any(corners)  # the box's corners lie off the turned square
        assert valid[scene.height // 2, scene.width // 2]
        # A square turned 30 degrees fills 1 / (cos 30 + sin 30)^2 of its north-up box.
        assert valid.mean() == pytest.approx(1 / (np.cos(np.pi / 6) + np.sin(np.pi / 6)) ** 2, abs=0.02)
        base = scene.warped_from
    assert base.closed  # closed with the scene


def test_south_up_scene_is_read_north_up_pixel_for_pixel(tmp_path):
    """Rows from south to north (as some converted products store them): the model sees the ground
    north-up, as it learned it, and a flip moves pixels without resampling them."""
    north_up = Affine.translation(500000, 4500000) @ Affine.scale(1, -1)
    south_up = north_up @ Affine.translation(0, SIZE) @ Affine.scale(1, -1)
    image = _image()
    path = tmp_path / "south.tif"
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=south_up) as dst:
        dst.write(image[:, ::-1])
    with open_scene(path, resolution="native") as scene:
        assert scene.transform.almost_equals(north_up)
        assert "south-up" in " ".join(scene.notes)
        pixels, valid = scene.read(Window(0, 0, SIZE, SIZE), np.float32)
        assert valid.all()
        np.testing.assert_array_equal(pixels, image)


def test_shrunk_warp_is_nearest_then_averaged(tmp_path):
    """Shrunk 4 times: warped nearest-neighbour (cheap), averaged by the resampled read; the
    square still lands in place."""
    with open_scene(rotated(tmp_path), resolution=4.0) as scene:
        assert scene.src.resampling == Resampling.nearest
        assert scene.scale[0] == pytest.approx(4.0, rel=0.01)
        x, y = _mark_position(scene)
        ex, ey = ROTATED @ MARK_CENTRE
        assert abs(x - ex) < 4 and abs(y - ey) < 4


def test_translate_writes_a_north_up_map_of_a_rotated_scene(tmp_path):
    out = translate(rotated(tmp_path), tmp_path / "map.tif", model=(random_generator(), ModelSpec(ngf=8)),
                    resolution="native").dst
    with rasterio.open(out) as dst, rasterio.open(tmp_path / "rotated.tif") as src:
        assert dst.crs == src.crs
        assert dst.transform.b == dst.transform.d == 0
        corners = np.array([src.transform @ (c, r) for c, r in [(0, 0), (SIZE, 0), (0, SIZE), (SIZE, SIZE)]])
        left, bottom, right, top = dst.bounds
        assert left == pytest.approx(corners[:, 0].min(), abs=1.5)
        assert right == pytest.approx(corners[:, 0].max(), abs=1.5)
        assert top == pytest.approx(corners[:, 1].max(), abs=1.5)
        assert bottom == pytest.approx(corners[:, 1].min(), abs=1.5)
        mask = dst.dataset_mask()
        assert mask[0, 0] == 0 and mask[dst.height // 2, dst.width // 2] == 255


def test_points_with_no_crs_cannot_be_placed(tmp_path):
    """Ground control points in no stated CRS (rasterio cannot write them: a VRT, as GDAL can)."""
    _write(tmp_path / "plain.tif")
    bands = "".join(f'''<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>
      <SourceFilename relativeToVRT="1">plain.tif</SourceFilename><SourceBand>{b}</SourceBand>
    </SimpleSource></VRTRasterBand>''' for b in (1, 2, 3))
    points = "".join(f'<GCP Id="{i}" Pixel="{c}" Line="{r}" X="{500000 + c}" Y="{4500000 - r}"/>'
                     for i, (r, c) in enumerate([(0, 0), (0, SIZE), (SIZE, 0)]))
    vrt = tmp_path / "points.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="{SIZE}" rasterYSize="{SIZE}"><GCPList Projection="">{points}</GCPList>'
                   f"{bands}</VRTDataset>")
    with pytest.raises(InputError, match="3 ground control points but no CRS for them.*--allow-ungeoreferenced"):
        open_scene(vrt)
    with open_scene(vrt, allow_ungeoreferenced=True) as scene:  # as the message offers: pixel space
        assert scene.crs is None and (scene.width, scene.height) == (SIZE, SIZE)


def test_points_gdal_cannot_solve_say_so(tmp_path):
    points = [GroundControlPoint(r, r, 500000 + r, 4500000 - r) for r in (0, 50, 100)]  # all on one line
    path = _write(tmp_path / "line.tif", gcps=(points, "EPSG:32633"))
    with pytest.raises(InputError, match="GDAL cannot warp .* north-up from 3 ground control points"):
        open_scene(path)


def test_map_raster_placed_by_points_is_read_where_it_lies(tmp_path):
    """evaluate --map (and tiles --map) warp a map raster onto the scene's grid; one placed by
    ground control points read as nodata everywhere (GDAL's warper then ignored the points)."""
    from geosat2map.evaluate import evaluate_rasters

    grid = Affine.translation(500000, 4500000) @ Affine.scale(1, -1)
    image = np.random.default_rng(0).integers(0, 255, (3, 300, 300), dtype=np.uint8)
    common = dict(driver="GTiff", width=300, height=300, count=3, dtype="uint8")
    with rasterio.open(tmp_path / "out.tif", "w", crs="EPSG:32633", transform=grid, **common) as dst:
        dst.write(image)
    corners = [(0, 0), (0, 300), (300, 0), (300, 300)]
    points = [GroundControlPoint(r, c, *(grid @ (c, r))) for r, c in corners]
    with rasterio.open(tmp_path / "map.tif", "w", **common) as dst:
        dst.write(image)
        dst.gcps = (points, "EPSG:32633")
    scores = evaluate_rasters(tmp_path / "out.tif", tmp_path / "map.tif")
    assert scores["count"] == 1
    assert scores["rmse"] == pytest.approx(0.0, abs=1e-6)


def test_a_warped_scene_resumes_as_if_never_stopped(tmp_path):
    """--resume on a scene read through the warper: the warp is the same in every run, so the
    resumed map is the uninterrupted one, masked corners included."""
    from geosat2map.errors import Interrupted

    from .conftest import stop_after, write_scene

    scene = write_scene(tmp_path / "s.tif", width=700, height=1200)
    with rasterio.open(scene, "r+") as ds:
        ds.transform = ds.transform @ Affine.rotation(10)
    model = (random_generator(), ModelSpec(ngf=8))
    whole = translate(scene, tmp_path / "whole.tif", model=model, resolution="native").dst
    out = tmp_path / "map.tif"
    with pytest.raises(Interrupted, match="rows are kept"):
        translate(scene, out, model=model, resolution="native", progress=stop_after(25))
    translate(scene, out, model=model, resolution="native", resume=True)
    with rasterio.open(out) as a, rasterio.open(whole) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.dataset_mask(), b.dataset_mask())
        assert a.dataset_mask()[0, 0] == 0  # a corner outside the turned scene


def _dem(path: Path, heights: np.ndarray, nodata: float | None = None, crs: str | None = "EPSG:4326") -> Path:
    """A DEM over the RPC scene and beyond it (0.0002 degree cells, 20 scene pixels), rows north to south."""
    rows, cols = heights.shape
    with rasterio.open(path, "w", driver="GTiff", width=cols, height=rows, count=1, dtype="float32", crs=crs,
                       nodata=nodata, transform=Affine.translation(LON0 - 0.005, LAT0 + 0.005) @
                       Affine.scale(0.0002, -0.0002)) as dst:
        dst.write(heights.astype(np.float32)[None])
    return path


def _shifted(height: float) -> tuple[float, float]:
    """Where by_rpcs' square lies on ground at ``height``: 20 pixels east per 500 m below the
    RPCs' mean height (their sample term in height)."""
    return (LON0 + (MARK_CENTRE[0] - SIZE / 2 + 20 * (500 - height) / 500) * DEG,
            LAT0 - (MARK_CENTRE[1] - SIZE / 2) * DEG)


@pytest.mark.parametrize("height", [0.0, 500.0, 1000.0])
def test_rpcs_over_a_dem_put_each_pixel_at_its_ground_height(tmp_path, height):
    """--rpc-dem: GDAL's RPC transformer projects each pixel onto the DEM (orthorectification),
    where without one all ground sits at the RPCs' mean height (500 m here)."""
    dem = _dem(tmp_path / "dem.tif", np.full((50, 50), height))
    with open_scene(by_rpcs(tmp_path), resolution="native", rpc_dem=dem) as scene:
        assert any(f"from its RPCs over the DEM {dem}" in note for note in scene.notes)
        x, y = _mark_position(scene)
        ex, ey = _shifted(height)
        assert abs(x - ex) < 1.5 * DEG and abs(y - ey) < 1.5 * DEG, ((x - LON0) / DEG, (ex - LON0) / DEG)
        _, valid = scene.read(Window(0, 0, scene.width, scene.height))
        assert valid.all()  # the grid is the one over the DEM: the moved scene fills it


def test_a_void_in_the_dem_is_ground_at_the_rpcs_mean_height(tmp_path):
    """Where the DEM has no height (nodata, as SRTM's voids) the RPCs' mean height stands in: over
    a DEM at that height with a void under the square, the scene reads as it does with no DEM,
    with no hole in it."""
    heights = np.full((50, 50), 500.0)
    heights[15:35, 20:45] = -32768  # under the square and round it
    dem = _dem(tmp_path / "void.tif", heights, nodata=-32768)
    rpcs = by_rpcs(tmp_path)
    with open_scene(rpcs, resolution="native", rpc_dem=dem) as scene, \
            open_scene(rpcs, resolution="native") as at_mean_height:
        assert scene.transform.almost_equals(at_mean_height.transform)
        pixels, valid = scene.read(Window(0, 0, scene.width, scene.height))
        expected, expected_valid = at_mean_height.read(Window(0, 0, scene.width, scene.height))
        assert valid.all() and expected_valid.all()
        np.testing.assert_allclose(pixels, expected, atol=1)


def test_a_dem_places_by_the_rpcs_a_scene_whose_geotransform_rides_along(tmp_path):
    """Raw products often carry an approximate geotransform beside their RPCs: placed as a
    north-up geotransform unless a DEM is given, which asks for the RPCs (gdalwarp -rpc)."""
    path = by_rpcs(tmp_path)
    with rasterio.open(path, "r+") as ds:
        ds.crs, ds.transform = "EPSG:4326", Affine.translation(LON0 - 0.001, LAT0 + 0.001) @ Affine.scale(DEG, -DEG)
    with open_scene(path, resolution="native") as plain:
        assert not any("RPCs" in note for note in plain.notes)
    with open_scene(path, resolution="native", rpc_dem=_dem(tmp_path / "dem.tif", np.zeros((50, 50)))) as scene:
        x, y = _mark_position(scene)
        ex, ey = _shifted(0.0)
        assert abs(x - ex) < 1.5 * DEG and abs(y - ey) < 1.5 * DEG, ((x - LON0) / DEG, (ex - LON0) / DEG)


def test_a_dem_that_cannot_place_the_scene_says_why(tmp_path):
    rpcs = by_rpcs(tmp_path)
    with pytest.raises(InputError, match="cannot open the DEM .*missing.tif"):
        open_scene(rpcs, rpc_dem=tmp_path / "missing.tif")
    with pytest.raises(InputError, match="the DEM .* has no CRS"):
        open_scene(rpcs, rpc_dem=_dem(tmp_path / "nocrs.tif", np.zeros((50, 50)), crs=None))
    with pytest.raises(InputError, match="rotated.tif has no RPCs: a DEM .*--rpc-dem"):
        open_scene(rotated(tmp_path), rpc_dem=_dem(tmp_path / "dem.tif", np.zeros((50, 50))))


def test_translate_over_a_dem_from_the_command_line(tmp_path, tiny_weights, monkeypatch):
    """The command line's --rpc-dem: the map is the DEM-placed scene's, says which DEM in its tags
    (and records its absolute path: a resume or a preview from another folder finds it), and a
    run with another DEM is another map (not kept by --resume)."""
    from click.testing import CliRunner

    from geosat2map_cli.main import cli

    scene, out = by_rpcs(tmp_path), tmp_path / "map.tif"
    dem = _dem(tmp_path / "dem.tif", np.zeros((50, 50)))
    common = ["translate", str(scene), str(out), "--weights", str(tiny_weights), "--resolution", "native", "--quiet"]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, [*common, "--rpc-dem", "dem.tif"])  # relative to this folder
    assert result.exit_code == 0, result.output
    assert "over the DEM" in result.stderr
    with rasterio.open(out) as dst, open_scene(scene, resolution="native", rpc_dem=dem) as placed:
        assert dst.tags()["GEOSAT2MAP_RPC_DEM"] == "dem.tif"
        assert dst.transform.almost_equals(placed.transform) and dst.shape == (placed.height, placed.width)
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert "orthorectified over the DEM dem.tif (--rpc-dem)" in info.output and f"--rpc-dem {dem}" in info.output
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = CliRunner().invoke(cli, [*common, "--resume", "--rpc-dem", str(dem)])  # the same DEM: kept
    assert result.exit_code == 0 and result.output.startswith("kept "), result.output
    # The preview places the scene over the DEM the map records, as the map was: the square where
    # the map has it (at the RPCs' mean height it would lie 20 pixels west).
    preview = CliRunner().invoke(cli, ["preview", str(scene), str(out), str(tmp_path / "p.png"), "--size", "200"])
    assert preview.exit_code == 0, preview.output
    with rasterio.open(tmp_path / "p.png") as png, rasterio.open(out) as dst:
        rows, cols = np.nonzero(png.read(1)[:, : dst.width] == 250)
        x = dst.transform.c + (cols.mean() + 0.5) * dst.transform.a
    assert abs(x - _shifted(0.0)[0]) < 1.5 * DEG, ((x - LON0) / DEG, (_shifted(0.0)[0] - LON0) / DEG)
    dem.rename(tmp_path / "moved.tif")  # gone: the preview places the scene at the RPCs' mean height
    preview = CliRunner().invoke(cli, ["preview", str(scene), str(out), str(tmp_path / "p.png"), "--overwrite"])
    assert preview.exit_code == 0, preview.output
    result = CliRunner().invoke(cli, [*common, "--resume", "--rpc-dem", str(_dem(tmp_path / "hills.tif",
                                                                               np.full((50, 50), 900.0)))])
    assert result.exit_code != 0 and "made with other options (rpc_dem" in result.stderr
    result = CliRunner().invoke(cli, [*common[:2], str(tmp_path / "none.tif"), *common[3:], "--rpc-dem",
                                      str(tmp_path / "missing.tif")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "cannot open the DEM" in result.stderr
    assert not (tmp_path / "none.tif").exists()
