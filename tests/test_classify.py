"""classify: a map's colours as a paletted class raster on its grid, and each class's area."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from pyproj import Geod

from geosat2map.classify import CLASS_VALUES, UNCLASSIFIED, classify_map
from geosat2map.metrics import MAP_CLASSES
from geosat2map_cli.main import cli

from .conftest import NAIP_SCENE


def write_map(path: Path, rgb: np.ndarray, crs: str, transform: Affine, valid: np.ndarray | None = None) -> Path:
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
            path, "w", driver="GTiff", width=rgb.shape[2], height=rgb.shape[1], count=3, dtype="uint8", crs=crs,
            transform=transform, tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(rgb)
        if valid is not None:
            dst.write_mask(valid.astype(np.uint8) * 255)
    return path


def striped_map(height: int = 600, width: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Rows in bands of water, park and road colour, a near-water colour, and black (a label)."""
    rgb = np.zeros((3, height, width), np.uint8)
    expected = np.zeros((height, width), np.uint8)
    red, green, blue = MAP_CLASSES["water"]
    near_water = (red + 10, green + 10, blue - 1)  # 14.2 from it, within the tolerance of 20
    colours = [(MAP_CLASSES["water"], CLASS_VALUES["water"]), (MAP_CLASSES["park"], CLASS_VALUES["park"]),
               (MAP_CLASSES["road"], CLASS_VALUES["road"]), (near_water, CLASS_VALUES["water"]),
               ((0, 0, 0), UNCLASSIFIED)]
    for k, (colour, value) in enumerate(colours):
        rows = slice(k * height // len(colours), (k + 1) * height // len(colours))
        rgb[:, rows] = np.array(colour, np.uint8)[:, None, None]
        expected[rows] = value
    return rgb, expected


def test_classes_mask_palette_and_areas_in_metres(tmp_path):
    rgb, expected = striped_map()
    valid = np.ones(expected.shape, bool)
    valid[:, :40] = False  # a nodata strip down the left edge
    src = write_map(tmp_path / "map.tif", rgb, "EPSG:32633", Affine(2, 0, 500000, 0, -2, 4600000), valid)
    by_class = classify_map(src, tmp_path / "classes.tif")
    with rasterio.open(tmp_path / "classes.tif") as out:
        values = out.read(1)
        assert out.count == 1 and out.dtypes[0] == "uint8"
        assert out.crs.to_epsg() == 32633 and out.transform == Affine(2, 0, 500000, 0, -2, 4600000)
        assert out.colorinterp[0] == rasterio.enums.ColorInterp.palette
        assert out.colormap(1)[CLASS_VALUES["water"]][:3] == MAP_CLASSES["water"]
        assert out.overviews(1) and out.tags(ns="rio_overview")["resampling"] == "mode"
        assert "5=water" in out.tags()["GEOSAT2MAP_CLASSES"]
        assert out.nodata == 255 and out.colormap(1)[255][3] == 0  # nodata see-through
        mask = out.dataset_mask()
    assert (mask[:, :40] == 0).all() and (mask[:, 40:] == 255).all()
    assert (values[:, :40] == 255).all()
    assert (values[:, 40:] == expected[:, 40:]).all()
    for name, c in by_class.items():
        value = UNCLASSIFIED if name == "unclassified" else CLASS_VALUES[name]
        assert c.pixels == int((expected[:, 40:] == value).sum())
        # 2 m pixels on UTM's central meridian, where the plane shrinks the ground by 0.9996
        assert c.area_m2 == pytest.approx(4.0 * c.pixels / 0.9996**2, rel=1e-6)
    assert by_class["water"].pixels == 2 * 120 * 260  # the near-water colour is water too


def test_areas_in_degrees_sum_to_the_footprint_on_the_ellipsoid(tmp_path):
    rgb, _ = striped_map(300, 200)
    transform = Affine(1e-4, 0, 10.0, 0, -1e-4, 60.0)
    src = write_map(tmp_path / "map.tif", rgb, "EPSG:4326", transform)
    by_class = classify_map(src, tmp_path / "classes.tif")
    lon = [10.0, 10.02, 10.02, 10.0]
    lat = [60.0, 60.0, 59.97, 59.97]
    footprint, _ = Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)
    assert sum(c.area_m2 for c in by_class.values()) == pytest.approx(abs(footprint), rel=1e-6)
    # Pixels further north are smaller: the park band (rows 60-119) covers less ground than the road
    # band south of it (rows 120-179), by the cosine of latitude (0.05 % over 0.006 degrees).
    assert by_class["park"].pixels == by_class["road"].pixels
    assert by_class["park"].area_m2 / by_class["road"].area_m2 == pytest.approx(
        np.cos(np.radians(59.991)) / np.cos(np.radians(59.985)), rel=2e-5)


def test_areas_in_web_mercator_are_on_the_ground_not_the_plane(tmp_path):
    """EPSG:3857 at 60 degrees north draws the ground four times too large; the areas are the
    ground's, as the footprint's on the ellipsoid."""
    from pyproj import Transformer

    x0, y0 = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10.0, 60.0)
    rgb, _ = striped_map(300, 2600)  # wider than the 2048 columns measured at once
    transform = Affine(10, 0, x0, 0, -10, y0)
    by_class = classify_map(write_map(tmp_path / "map.tif", rgb, "EPSG:3857", transform), tmp_path / "c.tif")
    lon1, lat1 = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(x0 + 26000, y0 - 3000)
    along = np.linspace(10.0, lon1, 200)  # the edges along parallels, densified
    lon = [*along, *along[::-1]]
    lat = [60.0] * 200 + [lat1] * 200
    footprint, _ = Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)
    total = sum(c.area_m2 for c in by_class.values())
    assert total == pytest.approx(abs(footprint), rel=1e-5)
    assert 300 * 2600 * 100 / total == pytest.approx(4.0, rel=0.01)  # the plane's area


def test_cli_prints_areas_and_refuses_a_map_that_is_not_rgb(tmp_path):
    rgb, _ = striped_map(60, 64)
    src = write_map(tmp_path / "map.tif", rgb, "EPSG:32633", Affine(100, 0, 500000, 0, -100, 4600000))
    result = CliRunner().invoke(cli, ["classify", str(src), str(tmp_path / "c.tif")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'c.tif'} (its QGIS style: c.qml): 3,840 valid pixels"
    assert any(line.split()[:2] == ["water", "40.0"] and line.endswith("km²") for line in lines), lines
    result = CliRunner().invoke(cli, ["classify", str(src), str(tmp_path / "j.tif"), "--json"])
    assert json.loads(result.stdout)["park"]["area_m2"] == pytest.approx(12 * 64 * 1e4 / 0.9996**2, rel=1e-5)
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "c.tif")])
    assert result.exit_code == 0 and "the classes of 64 x 60 pixels (EPSG:32633) of the map map.tif" in result.stdout
    assert "5=water" in result.stdout

    grey = tmp_path / "grey.tif"
    with rasterio.open(grey, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint16", crs="EPSG:32633",
                       transform=Affine(1, 0, 10, 0, -1, 10)) as dst:
        dst.write(np.zeros((1, 8, 8), np.uint16))
    result = CliRunner().invoke(cli, ["classify", str(grey), str(tmp_path / "g.tif")])
    assert result.exit_code == 1 and "is not an RGB map" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "g.tif").exists()
    result = CliRunner().invoke(cli, ["classify", str(src), str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "the classes are a GeoTIFF: name it .tif or .tiff" in result.stderr


def test_the_qgis_style_beside_the_classes_names_them_and_is_never_left_half_made(tmp_path, monkeypatch):
    """The .qml QGIS loads as the layer's style (its legend checked in QGIS: tests/test_qgis.py):
    each class's value, colour and name; an existing one is replaced only with overwrite, and a
    failure leaves neither file."""
    import xml.etree.ElementTree as ET

    import geosat2map.writer as writer
    from geosat2map.errors import OutputError

    rgb, _ = striped_map(60, 64)
    src = write_map(tmp_path / "map.tif", rgb, "EPSG:32633", Affine(100, 0, 500000, 0, -100, 4600000))
    classify_map(src, tmp_path / "c.tif")
    entries = ET.parse(tmp_path / "c.qml").getroot().findall("pipe/rasterrenderer[@type='paletted']/colorPalette/"
                                                             "paletteEntry")
    named = {e.get("label"): (int(e.get("value")), e.get("color")) for e in entries}
    assert named.pop("unclassified") == (UNCLASSIFIED, "#808080")
    assert named == {k: (CLASS_VALUES[k], "#{:02x}{:02x}{:02x}".format(*colour)) for k, colour in MAP_CLASSES.items()}
    with rasterio.open(tmp_path / "c.tif") as ds:
        assert all(ds.colormap(1)[v][:3] == tuple(int(c[i : i + 2], 16) for i in (1, 3, 5))
                   for v, c in named.values())
    (tmp_path / "d.qml").write_text("the user's own style")
    with pytest.raises(OutputError, match=r"d\.qml exists \(pass --overwrite"):
        classify_map(src, tmp_path / "d.tif")
    assert not (tmp_path / "d.tif").exists() and (tmp_path / "d.qml").read_text() == "the user's own style"
    classify_map(src, tmp_path / "d.tif", overwrite=True)
    assert (tmp_path / "d.qml").read_text() == (tmp_path / "c.qml").read_text()

    def failed_commit(self) -> None:
        raise OutputError("finishing the file failed: No space left on device")

    monkeypatch.setattr(writer.GeoTIFFWriter, "commit", failed_commit)
    with pytest.raises(OutputError, match="No space left"):
        classify_map(src, tmp_path / "e.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.qml", "c.tif", "d.qml", "d.tif", "map.tif"]


def test_a_picture_without_a_crs_gets_classes_and_no_areas(tmp_path):
    rgb, expected = striped_map(60, 64)
    picture = tmp_path / "picture.tif"
    with rasterio.open(picture, "w", driver="GTiff", width=64, height=60, count=3, dtype="uint8") as dst:
        dst.write(rgb)
    by_class = classify_map(picture, tmp_path / "c.tif")
    assert by_class["water"].pixels == int((expected == CLASS_VALUES["water"]).sum())
    assert all(c.area_m2 is None for c in by_class.values())
    result = CliRunner().invoke(cli, ["classify", str(picture), str(tmp_path / "d.tif")])
    assert result.exit_code == 0 and "ha" not in result.stdout and "km²" not in result.stdout


def test_a_scene_given_for_a_map_is_classified_with_a_note(tmp_path):
    """A satellite scene has no map colours: its classes are written, and a note asks whether it is a
    map; a map (a fifth of it black, labels) gets no note."""
    rgb, _ = striped_map(60, 64)
    src = write_map(tmp_path / "map.tif", rgb, "EPSG:32633", Affine(100, 0, 500000, 0, -100, 4600000))
    result = CliRunner().invoke(cli, ["classify", str(src), str(tmp_path / "c.tif")])
    assert result.exit_code == 0 and "note:" not in result.stderr
    result = CliRunner().invoke(cli, ["classify", str(NAIP_SCENE), str(tmp_path / "s.tif"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["unclassified"]["pixels"] > 0
    assert result.stderr.startswith("note: 100 % of ") and "is it a map (translate's output)" in result.stderr
