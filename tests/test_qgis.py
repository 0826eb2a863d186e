"""translate's output in real QGIS (headless): valid, georeferenced, unstretched, transparent outside.

Needs Debian's QGIS (``make test-qgis`` installs it); skips with the reason where it is absent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geosat2map import translate

from geosat2map.weights import ModelSpec, save_generator

from .conftest import random_generator, synthetic_image, write_scene

SYSTEM_PYTHON = Path("/usr/bin/python3")
QGIS_PROCESS = Path("/usr/bin/qgis_process.bin")
CHECK = Path(__file__).with_name("qgis_check.py")


def _system_environment() -> dict[str, str]:
    """The environment without an activated virtualenv: QGIS's embedded Python finds its home by
    the first python3 on PATH, and the venv's (another Python build) made qgis_process crash.
    Taken at each call, so it carries the session's GEOSAT2MAP_CACHE (conftest): translate run
    from QGIS then keeps auto's engine pick where the test's own translate finds it, and both
    make the same map, instead of timing its own pick into the user's cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if not p.startswith(venv))
    return {**env, "QT_QPA_PLATFORM": "offscreen"}


def _qgis_python() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import qgis.core"], capture_output=True,
                           env=_system_environment())
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _qgis_python(), reason="QGIS Python bindings not installed (make test-qgis)")


@pytest.fixture(scope="module", params=["zstd", "jpeg", "webp"])
def output(request, tmp_path_factory, tiny_weights) -> tuple[Path, Path]:
    """A translate output with a nodata corner (top-left 250 x 200 pixels), in each compression
    whose reading depends on the GDAL build (QGIS's own, not the wheel's)."""
    folder = tmp_path_factory.mktemp("qgis")
    data = np.stack([np.full((500, 700), v, np.uint8) for v in (90, 140, 60)])
    data[:, :200, :250] = 0
    scene = write_scene(folder / "scene.tif", width=700, height=500, nodata=0, data=data)
    out = folder / f"map_{request.param}.tif"
    translate(scene, out, weights=tiny_weights, compress=request.param)
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
                           nodata_point, "--probe", valid_point], capture_output=True, text=True,
                          env=_system_environment(), timeout=120)
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
        pixel = dst.read(window=((row, row + 1), (col, col + 1))).ravel().astype(int)
    # Lossless: the very pixel; JPEG and WebP: as decoded by another libjpeg or libwebp, within 2.
    assert np.abs(np.array(valid_rgba[:3]) - pixel).max() <= (0 if out.name == "map_zstd.tif" else 2)
    assert report["png"] and png.stat().st_size > 0


def test_qgis_draws_a_class_raster_in_the_class_colours_with_its_nodata_transparent(tmp_path):
    """classify's output, dragged into QGIS: drawn in the classes' colours, the mask see-through,
    and the legend naming the classes (its .qml style: the colour table alone lists 256 numbers)."""
    from geosat2map.classify import CLASS_VALUES, classify_map
    from geosat2map.metrics import MAP_CLASSES

    rgb = np.zeros((3, 300, 400), np.uint8)
    rgb[:, :, 200:] = np.array(MAP_CLASSES["water"], np.uint8)[:, None, None]
    rgb[:, :, :200] = np.array(MAP_CLASSES["park"], np.uint8)[:, None, None]
    valid = np.ones((300, 400), bool)
    valid[:, :100] = False
    src = write_scene(tmp_path / "map.tif", width=400, height=300, data=rgb)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(src, "r+") as ds:
        ds.write_mask(valid.astype(np.uint8) * 255)
        left, bottom, right, top = ds.bounds
        res = ds.res[0]
    out = tmp_path / "classes.tif"
    classify_map(src, out)
    probes = [f"{left + 50 * res},{top - 150 * res}", f"{left + 150 * res},{top - 150 * res}",
              f"{left + 300 * res},{top - 150 * res}"]
    proc = subprocess.run([str(SYSTEM_PYTHON), str(CHECK), str(out), str(tmp_path / "render.png"), "--size", "400",
                           *[a for p in probes for a in ("--probe", p)]], capture_output=True, text=True,
                          env=_system_environment(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["valid"] and report["renderer"] == "paletted"
    assert report["legend"] == [[0, "unclassified"], *([v, k] for k, v in CLASS_VALUES.items())]
    nodata, park, water = report["probes"]
    assert nodata[3] == 0
    assert park == [*MAP_CLASSES["park"], 255] and water == [*MAP_CLASSES["water"], 255]


@pytest.mark.skipif(not QGIS_PROCESS.exists(), reason="qgis_process.bin not installed (make test-qgis)")
def test_qgis_counts_a_class_raster_as_classify_does_its_nodata_left_out(tmp_path):
    """QGIS's analysis tools read classify's nodata value (a mask band they would count as data)."""
    from geosat2map.classify import CLASS_VALUES, classify_map
    from geosat2map.metrics import MAP_CLASSES

    rgb = np.zeros((3, 200, 300), np.uint8)
    for k, name in enumerate(("water", "park", "road")):
        rgb[:, :, k * 100 : (k + 1) * 100] = np.array(MAP_CLASSES[name], np.uint8)[:, None, None]
    src = write_scene(tmp_path / "map.tif", width=300, height=200, data=rgb)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(src, "r+") as ds:
        valid = np.full((200, 300), 255, np.uint8)
        valid[:50] = 0
        ds.write_mask(valid)
    by_class = classify_map(src, tmp_path / "classes.tif")
    table = tmp_path / "values.csv"
    proc = subprocess.run([str(QGIS_PROCESS), "--json", "run", "native:rasterlayeruniquevaluesreport", "--",
                           f"INPUT={tmp_path / 'classes.tif'}", "BAND=1", f"OUTPUT_TABLE={table}"],
                          capture_output=True, text=True, env=_system_environment(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["results"]["NODATA_PIXEL_COUNT"] == 50 * 300
    rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
    counted = {int(float(value)): int(count.strip('"')) for value, count, _ in rows}
    assert counted == {CLASS_VALUES[n]: by_class[n].pixels for n in ("water", "park", "road")}
    assert by_class["water"].pixels == 150 * 100


@pytest.mark.skipif(not QGIS_PROCESS.exists(), reason="qgis_process.bin not installed (make test-qgis)")
def test_qgis_reads_vectorize_features_as_valid_polygons(tmp_path):
    """vectorize's GeoPackage in QGIS: every feature read, every polygon valid by GEOS (its check
    of rings and holes), the patches cut by strips joined, exact or smoothed."""
    from geosat2map.classify import classify_map
    from geosat2map.metrics import MAP_CLASSES
    from geosat2map.vectorize import vectorize_classes

    rgb = np.empty((3, 200, 300), np.uint8)
    rgb[:] = np.array(MAP_CLASSES["park"], np.uint8)[:, None, None]
    rgb[:, 20:180, 40:260] = np.array(MAP_CLASSES["water"], np.uint8)[:, None, None]
    rgb[:, 60:120, 100:160] = np.array(MAP_CLASSES["park"], np.uint8)[:, None, None]  # an island
    yy, xx = np.mgrid[:200, :300]
    rgb[:, (yy - 150) ** 2 + (xx - 200) ** 2 < 25 ** 2] = np.array(MAP_CLASSES["building"], np.uint8)[:, None]
    src = write_scene(tmp_path / "map.tif", width=300, height=200, data=rgb)
    classify_map(src, tmp_path / "classes.tif")
    for simplify in (0, 2):  # smoothed too (a round building on the lake's shore)
        features = tmp_path / f"features{simplify}.gpkg"
        by_class = vectorize_classes(tmp_path / "classes.tif", features, strip_rows=64, simplify=simplify)
        assert by_class["water"].count == 1 and by_class["park"].count == 2 and by_class["building"].count == 1
        proc = subprocess.run([str(QGIS_PROCESS), "--json", "run", "qgis:checkvalidity", "--",
                               f"INPUT_LAYER={features}", "METHOD=2",
                               f"VALID_OUTPUT={tmp_path / f'valid{simplify}.gpkg'}"],
                              capture_output=True, text=True, env=_system_environment(), timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results = json.loads(proc.stdout)["results"]
        assert results["VALID_COUNT"] == 4 and results["INVALID_COUNT"] == 0 and results["ERROR_COUNT"] == 0


@pytest.mark.skipif(not QGIS_PROCESS.exists(), reason="qgis_process.bin not installed (make test-qgis)")
def test_qgis_process_raster_statistics(output):
    _, out = output
    proc = subprocess.run([str(QGIS_PROCESS), "--json", "run", "native:rasterlayerstatistics", "--",
                           f"INPUT={out}", "BAND=1"], capture_output=True, text=True,
                          env=_system_environment(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout)["results"]
    with rasterio.open(out) as dst:
        band = dst.read(1)
    # This algorithm honours a nodata value but not a GDAL mask band, so it counts the masked
    # pixels (stored as 0) too; it agrees with the file's raw band.
    assert stats["MIN"] == band.min() == 0 and stats["MAX"] == band.max()
    assert stats["MEAN"] == pytest.approx(float(band.mean()), abs=1e-6)



PROCESSING = Path(__file__).with_name("qgis_processing_check.py")


def _run_processing(script: Path, *params: str, cancel_at: float | None = None, project_layer: bool = False,
                    aoi_in_memory: bool = False, aoi_selected: int | None = None) -> dict:
    command = [str(SYSTEM_PYTHON), str(PROCESSING), str(script), *params]
    if aoi_in_memory:
        command.append("--aoi-in-memory")
    if aoi_selected is not None:
        command += ["--aoi-selected", str(aoi_selected)]
    if cancel_at is not None:
        command += ["--cancel-at", str(cancel_at)]
    if project_layer:
        command.append("--project-layer")
    proc = subprocess.run(command, capture_output=True, text=True, env=_system_environment(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    """The Processing script as `geosat2map qgis-script FOLDER` installs it."""
    import sys

    from click.testing import CliRunner

    from geosat2map_cli.main import cli

    folder = tmp_path_factory.mktemp("qgis-scripts")
    result = CliRunner().invoke(cli, ["qgis-script", str(folder)])
    assert result.exit_code == 0, result.output
    path = folder / "geosat2map_translate.py"
    assert f"wrote {path}" in result.output
    assert f"PYTHON = {sys.executable!r}" in path.read_text()  # runs geosat2map with this Python
    again = CliRunner().invoke(cli, ["qgis-script", str(folder)])
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    return path


def test_processing_script_makes_the_command_lines_map(script, tiny_weights, tmp_path):
    data = synthetic_image(500, 700)
    data[:, :100, :150] = 0
    scene = write_scene(tmp_path / "scene.tif", width=700, height=500, nodata=0, data=data)
    out = tmp_path / "from_qgis.tif"
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"WEIGHTS={tiny_weights}",
                             "RESOLUTION=native", "BANDS=3,2,1", "COMPRESSION=3")
    assert report["name"] == "Translate imagery into a map"
    assert report.get("error") is None and report["results"] == {"OUTPUT": str(out)}
    assert report["progress"] == 100
    assert any(m.startswith(f"wrote {out}") for m in report["messages"])
    assert report["output_valid"] and report["output_crs"] == "EPSG:32633"
    direct = translate(scene, tmp_path / "direct.tif", weights=tiny_weights, resolution="native",
                       bands=[3, 2, 1], compress="jpeg").dst
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        assert a.compression.name == "jpeg"  # the dialog's fourth choice
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.dataset_mask(), b.dataset_mask())


def test_processing_script_passes_the_test_time_augmentation(script, tiny_weights, tmp_path):
    """The dialog's second and third augmentations are translate --tta and --tta-median."""
    scene = write_scene(tmp_path / "scene.tif", width=300, height=200)
    for value, tta in (("2", "median"), ("1", "flip")):
        out = tmp_path / f"{tta}.tif"
        report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"WEIGHTS={tiny_weights}",
                                 "RESOLUTION=native", f"TTA={value}")
        assert report.get("error") is None, report
        direct = translate(scene, tmp_path / f"direct-{tta}.tif", weights=tiny_weights, resolution="native",
                           tta=tta).dst
        with rasterio.open(out) as a, rasterio.open(direct) as b:
            assert a.tags()["GEOSAT2MAP_TILING"] == b.tags()["GEOSAT2MAP_TILING"]
            np.testing.assert_array_equal(a.read(), b.read())


def test_processing_script_writes_the_maps_classes_when_asked(script, tiny_weights, tmp_path):
    scene = write_scene(tmp_path / "scene.tif", width=300, height=200)
    out, classes = tmp_path / "map.tif", tmp_path / "classes.tif"
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"CLASSES={classes}",
                             f"WEIGHTS={tiny_weights}", "RESOLUTION=native")
    assert report.get("error") is None and report["results"] == {"OUTPUT": str(out), "CLASSES": str(classes)}
    assert any(m.startswith(f"wrote {classes}") for m in report["messages"])
    assert (tmp_path / "classes.qml").exists()  # the style QGIS loads with the layer: its legend names the classes
    from geosat2map.classify import classify_map

    classify_map(out, tmp_path / "direct.tif")
    with rasterio.open(classes) as a, rasterio.open(tmp_path / "direct.tif") as b:
        assert a.count == 1 and (a.read() == b.read()).all()


def test_processing_script_writes_the_maps_features_when_asked(script, tiny_weights, tmp_path):
    """The features output: vectorize on the map's classes (classified out of sight when the
    classes are not asked for too), as the command line makes them; a format vectorize does not
    write is one error line, before any work."""
    import pyogrio
    import shapely

    from geosat2map.classify import classify_map
    from geosat2map.vectorize import vectorize_classes

    scene = write_scene(tmp_path / "scene.tif", width=300, height=200)
    out, features = tmp_path / "map.tif", tmp_path / "features.gpkg"
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"FEATURES={features}",
                             f"WEIGHTS={tiny_weights}", "RESOLUTION=native", "SIMPLIFY=2")
    assert report.get("error") is None and report["results"] == {"OUTPUT": str(out), "FEATURES": str(features)}
    assert any(m.startswith(f"wrote {features}") for m in report["messages"])
    # No class raster left beside them (QGIS's own scene.tif.aux.xml aside).
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("classes") or p.suffix == ".qml"]
    classify_map(out, tmp_path / "classes.tif")
    vectorize_classes(tmp_path / "classes.tif", tmp_path / "direct.gpkg", simplify=2)
    assert pyogrio.read_info(features)["features"] == pyogrio.read_info(tmp_path / "direct.gpkg")["features"]
    vertices = [shapely.get_num_coordinates(shapely.from_wkb(pyogrio.raw.read(f)[2])).sum()
                for f in (features, tmp_path / "direct.gpkg")]
    assert vertices[0] == vertices[1]  # smoothed as asked
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={tmp_path / 'again.tif'}",
                             f"FEATURES={tmp_path / 'features.shp'}", f"WEIGHTS={tiny_weights}", "RESOLUTION=native")
    assert "GeoPackage, GeoJSON or FlatGeobuf" in report["error"] and not (tmp_path / "again.tif").exists()


def test_processing_script_nodata_value_is_src_nodata(script, tiny_weights, tmp_path):
    """The nodata parameter marks a black collar the file does not (translate --src-nodata)."""
    data = synthetic_image(300, 400)
    data[:, :, :50] = 0
    scene = write_scene(tmp_path / "scene.tif", width=400, height=300, data=data)
    out = tmp_path / "from_qgis.tif"
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"WEIGHTS={tiny_weights}", "NODATA=0")
    assert report.get("error") is None and report["output_valid"]
    direct = translate(scene, tmp_path / "direct.tif", weights=tiny_weights, src_nodata=0).dst
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        assert (a.dataset_mask() == 0).any()
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.dataset_mask(), b.dataset_mask())


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # writing the RPC image
def test_processing_script_dem_orthorectifies_an_rpc_image(script, tiny_weights, tmp_path):
    """The DEM parameter is translate's --rpc-dem (a raw product georeferenced by RPCs)."""
    from .test_placement import _dem, by_rpcs

    scene, dem = by_rpcs(tmp_path), _dem(tmp_path / "dem.tif", np.zeros((50, 50)))
    out = tmp_path / "from_qgis.tif"
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"WEIGHTS={tiny_weights}", f"DEM={dem}",
                             "RESOLUTION=native")
    assert report.get("error") is None and report["output_valid"]
    direct = translate(scene, tmp_path / "direct.tif", weights=tiny_weights, resolution="native", rpc_dem=dem).dst
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        assert a.tags()["GEOSAT2MAP_RPC_DEM"] == "dem.tif"
        assert a.transform.almost_equals(b.transform)
        np.testing.assert_array_equal(a.read(), b.read())


def test_processing_script_translates_an_extent_given_in_another_crs(script, tiny_weights, tmp_path):
    """The Extent parameter (say, the map canvas in longitude and latitude) is translate's --bounds."""
    from rasterio.warp import transform_bounds

    scene = write_scene(tmp_path / "scene.tif", width=700, height=500)
    with rasterio.open(scene) as src:
        left, bottom, right, top = src.bounds
    box = transform_bounds("EPSG:32633", "EPSG:4326", left + 100, bottom + 100, left + 400, top - 150)
    out = tmp_path / "from_qgis.tif"
    extent = f"{box[0]!r},{box[2]!r},{box[1]!r},{box[3]!r} [EPSG:4326]"  # QGIS's xmin,xmax,ymin,ymax [CRS]
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"WEIGHTS={tiny_weights}",
                             f"EXTENT={extent}")
    assert report.get("error") is None and report["output_valid"]
    direct = translate(scene, tmp_path / "direct.tif", weights=tiny_weights, bounds=box, bounds_crs="EPSG:4326").dst
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        assert a.bounds == b.bounds and a.width < 700
        np.testing.assert_array_equal(a.read(), b.read())


@pytest.mark.parametrize("in_memory", [False, True])
def test_processing_script_translates_only_inside_a_polygon_layer(script, tiny_weights, tmp_path, in_memory):
    """The polygons parameter is translate's --aoi: a layer of a GeoPackage, or a memory layer
    (no file: its features are written to one for translate)."""
    from .test_aoi import L_SHAPE, write_polygons

    scene = write_scene(tmp_path / "scene.tif", width=600, height=500)
    aoi = write_polygons(tmp_path / "aoi.gpkg", [L_SHAPE])
    out = tmp_path / "from_qgis.tif"
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"WEIGHTS={tiny_weights}",
                             f"AOI={aoi}|layername=aoi", aoi_in_memory=in_memory)
    assert report.get("error") is None and report["output_valid"]
    assert report.get("aoi_provider") == ("memory" if in_memory else None)
    direct = translate(scene, tmp_path / "direct.tif", weights=tiny_weights, aoi=str(aoi)).dst
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        assert a.bounds == b.bounds and (a.dataset_mask() == 0).any()
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.dataset_mask(), b.dataset_mask())


def test_processing_script_takes_only_the_selected_polygons(script, tiny_weights, tmp_path):
    """With "Selected features only" ticked, translate's --aoi is the selection: of an L and a
    square east of it, the L selected gives the L's map."""
    import shapely

    from .test_aoi import L_SHAPE, write_polygons

    scene = write_scene(tmp_path / "scene.tif", width=900, height=500)
    x0, y0 = L_SHAPE.bounds[2], L_SHAPE.bounds[1]
    aoi = write_polygons(tmp_path / "aoi.gpkg", [L_SHAPE, shapely.box(x0 + 100, y0, x0 + 300, y0 + 200)])
    out = tmp_path / "from_qgis.tif"
    report = _run_processing(script, f"INPUT={scene}", f"OUTPUT={out}", f"WEIGHTS={tiny_weights}",
                             f"AOI={aoi}|layername=aoi", aoi_selected=1)  # GeoPackage feature ids start at 1
    assert report.get("error") is None and report["aoi_selected"] == 1
    only_l = write_polygons(tmp_path / "l.gpkg", [L_SHAPE])
    direct = translate(scene, tmp_path / "direct.tif", weights=tiny_weights, aoi=str(only_l)).dst
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        assert a.bounds == b.bounds == L_SHAPE.bounds
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.dataset_mask(), b.dataset_mask())


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # writing plain.tif
def test_processing_script_reports_errors_and_cancels_cleanly(script, tiny_weights, tmp_path):
    plain = tmp_path / "plain.tif"  # no georeferencing: QGIS opens it, translate refuses it
    with rasterio.open(plain, "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8") as dst:
        dst.write(synthetic_image(300, 300).astype(np.uint8))
    report = _run_processing(script, f"INPUT={plain}", f"OUTPUT={tmp_path / 'x.tif'}", f"WEIGHTS={tiny_weights}")
    assert report["error"].startswith("geosat2map: error:") and "no georeferencing" in report["error"]
    assert not (tmp_path / "x.tif").exists()

    # Slow enough to be canceled part way with rows kept: at 30 %, about a third of the rows done,
    # several of the writer's 256-row blocks whole. The script polls for the cancel every 0.2 s, so
    # the run must last seconds: 169 tiles of width 16 took 6 s on 2 AVX2 cores (fp32) and 0.7 s on
    # 2 AMX cores (bf16), so the scene is sized by this machine's speed, for about 4 s of tiles.
    # Under AUTO_MIN_TILES, so the backend is PyTorch without first timing ONNX Runtime.
    slower = tmp_path / "width16.safetensors"
    save_generator(random_generator(ngf=16), ModelSpec(ngf=16), slower)
    timed = translate(write_scene(tmp_path / "probe.tif", width=1024, height=1024), tmp_path / "probe_map.tif",
                      weights=slower, resolution="native")
    per_side = max(13, math.ceil(math.sqrt(4.0 * timed.tiles_computed / timed.seconds)))  # tiles 192 apart
    scene = write_scene(tmp_path / "big.tif", width=per_side * 192 + 64, height=per_side * 192 + 64)
    out = tmp_path / "map.tif"
    params = (f"INPUT={scene}", f"OUTPUT={out}", f"WEIGHTS={slower}", "RESOLUTION=native")
    report = _run_processing(script, *params, cancel_at=30)
    assert report["canceled"] and report["results"] == {}
    assert 30 <= report["progress"] < 100
    assert any("rows are kept" in m for m in report["messages"]), report["messages"]
    assert not out.exists()  # nothing half-written at the output path
    report = _run_processing(script, *params, "RESUME=true")  # "Continue the run canceled (or killed) before"
    assert report.get("error") is None and out.exists()
    direct = translate(scene, tmp_path / "direct.tif", weights=slower, resolution="native").dst
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    # Continuing again once finished keeps the map (a second click, a rerun from the history).
    report = _run_processing(script, *params, "RESUME=true")
    assert report.get("error") is None and any(m.startswith(f"kept {out}") for m in report["messages"])


def test_processing_script_takes_a_geopackage_raster_layer(script, tiny_weights, tmp_path):
    """A project layer whose source is a GDAL subdataset (a GeoPackage raster table) goes to
    translate as that address."""
    image = synthetic_image(300, 400).astype(np.uint8)
    gpkg = tmp_path / "scenes.gpkg"
    with rasterio.open(gpkg, "w", driver="GPKG", width=400, height=300, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=rasterio.transform.from_origin(500000, 4500000, 1, 1), RASTER_TABLE="area") as dst:
        dst.write(image)
    out = tmp_path / "from_qgis.tif"
    report = _run_processing(script, f"INPUT=GPKG:{gpkg}:area", f"OUTPUT={out}", f"WEIGHTS={tiny_weights}",
                             project_layer=True)
    assert report["input_layer_valid"] and report.get("error") is None and report["output_valid"]
    direct = translate(f"GPKG:{gpkg}:area", tmp_path / "direct.tif", weights=tiny_weights).dst
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        assert (a.width, a.height) == (400, 300)
        np.testing.assert_array_equal(a.read(), b.read())
