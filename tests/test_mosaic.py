"""geosat2map mosaic: sheets put together as one VRT scene, gaps nodata, sheets found where they lie."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geosat2map import translate
from geosat2map.errors import Geosat2mapError
from geosat2map.mosaic import build_mosaic

from .conftest import write_scene


#: A colour table: index 1 red.
RED = {0: (0, 0, 0, 255), 1: (200, 30, 30, 255)}


def cut(scene: Path, folder: Path, size: tuple[int, int], skip: tuple = (), **profile) -> list[Path]:
    """``scene`` cut into sheets of ``size`` (width, height), each placed where it lies; ``skip``:
    (col, row) offsets left out, as gaps."""
    folder.mkdir(parents=True, exist_ok=True)
    sheets = []
    with rasterio.open(scene) as src:
        for row in range(0, src.height, size[1]):
            for col in range(0, src.width, size[0]):
                if (col, row) in skip:
                    continue
                window = Window(col, row, min(size[0], src.width - col), min(size[1], src.height - row))
                path = folder / f"sheet_{row}_{col}.tif"
                placed = {"width": window.width, "height": window.height, "transform": src.window_transform(window)}
                with rasterio.open(path, "w", **(src.profile | placed | profile)) as out:
                    out.write(src.read(window=window))
                sheets.append(path)
    return sheets


def test_a_mosaic_of_sheets_makes_the_map_of_the_whole_scene(tiny_weights_gsd, tmp_path):
    """Native and resampled (0.5 m to the model's 2 m, where each reader thread opens the VRT
    itself): the same pixels as the scene in one file."""
    whole = write_scene(tmp_path / "whole.tif", width=600, height=500, res=0.5)
    sheets = cut(whole, tmp_path / "sheets", (300, 250))
    result = build_mosaic(sheets, tmp_path / "mosaic.vrt")
    assert (result.sheets, result.width, result.height) == (4, 600, 500)
    for resolution in ("native", "model"):
        maps = [translate(src, tmp_path / f"{src.stem}_{resolution}.tif", weights=tiny_weights_gsd,
                          resolution=resolution).dst for src in (whole, result.dst)]
        with rasterio.open(maps[0]) as a, rasterio.open(maps[1]) as b:
            assert (a.transform, a.width, a.height, a.crs) == (b.transform, b.width, b.height, b.crs)
            np.testing.assert_array_equal(a.read(), b.read())
            np.testing.assert_array_equal(a.dataset_mask(), b.dataset_mask())


@pytest.mark.parametrize("nodata", [None, 0])
def test_ground_no_sheet_covers_is_nodata(nodata, tmp_path):
    """Sheets with no mask (a mask band made of theirs) or with a nodata value (the mosaic's)."""
    whole = write_scene(tmp_path / "whole.tif", width=400, height=300, data=np.full((3, 300, 400), 90, np.uint8))
    sheets = cut(whole, tmp_path / "sheets", (200, 150), skip=[(200, 150)], nodata=nodata)
    with rasterio.open(build_mosaic(sheets, tmp_path / "m.vrt").dst) as m:
        mask, pixels = m.dataset_mask(), m.read()
        assert m.shape == (300, 400)
    assert not mask[150:, 200:].any() and mask[:150].all() and mask[:, :200].all()
    assert (pixels[:, mask > 0] == 90).all()


@pytest.mark.parametrize("masked", [False, True, "src_nodata"])
def test_the_later_sheet_is_drawn_where_sheets_overlap_but_not_its_nodata(tmp_path, masked):
    """Its margin marked by a nodata value, or by a mask band (then sheet a's pixels show there,
    and the mosaic's mask is valid there too), or unmarked in the file but given as --src-nodata."""
    nodata = None if masked else 0
    a = write_scene(tmp_path / "a.tif", width=200, height=100, nodata=nodata,
                    data=np.full((3, 100, 200), 50, np.uint8))
    data = np.full((3, 100, 200), 200, np.uint8)
    data[:, :, :20] = 0  # a margin without data, over sheet a
    b = write_scene(tmp_path / "b.tif", width=200, height=100, nodata=nodata, data=data)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(b, "r+") as ds:
        ds.transform = ds.transform @ rasterio.Affine.translation(100, 0)  # 100 m east of a: over its east half
        if masked is True:
            ds.write_mask(np.where(data[0] > 0, 255, 0).astype(np.uint8))
    src_nodata = 0 if masked == "src_nodata" else None
    with rasterio.open(build_mosaic([a, b], tmp_path / "m.vrt", src_nodata=src_nodata).dst) as m:
        row, valid = m.read(1)[50], m.dataset_mask()[50]
        assert m.shape == (100, 300)
    assert (row[:120] == 50).all() and (row[120:] == 200).all() and (valid == 255).all()


def test_a_coarser_sheet_is_enlarged_smoothly(tmp_path):
    """Sheets of 1 m and 2 m: the mosaic takes 1 m, and the 2 m sheet's ramp stays a ramp
    (bilinear), not steps of two pixels (nearest neighbour)."""
    fine = write_scene(tmp_path / "fine.tif", width=100, height=50, data=np.full((3, 50, 100), 7, np.uint8))
    ramp = np.broadcast_to(np.arange(0, 250, 5, dtype=np.uint8), (3, 25, 50))
    coarse = write_scene(tmp_path / "coarse.tif", width=50, height=25, res=2.0, data=ramp)
    with rasterio.open(coarse, "r+") as ds:  # east of the fine sheet
        ds.transform = ds.transform @ rasterio.Affine.translation(50, 0)
    with rasterio.open(build_mosaic([fine, coarse], tmp_path / "m.vrt").dst) as m:
        assert m.res == (1.0, 1.0) and m.shape == (50, 200)
        row = m.read(1)[25, 100:].astype(int)
    steps = np.diff(row[2:-2])
    assert steps.min() >= 2 and steps.max() <= 3  # 5 levels per 2 m: 2.5 per metre, no 0/5 steps


def test_float_sheets_with_nan_nodata(tmp_path):
    """NaN, the usual nodata of float rasters, equals no value, itself included: still one nodata."""
    whole = write_scene(tmp_path / "whole.tif", width=400, height=300, dtype="float32", nodata=float("nan"))
    sheets = cut(whole, tmp_path / "sheets", (200, 150), skip=[(0, 0)])
    with rasterio.open(build_mosaic(sheets, tmp_path / "m.vrt").dst) as m:
        assert np.isnan(m.nodata) and not m.dataset_mask()[:150, :200].any() and m.dataset_mask()[150:].all()


def test_paletted_sheets_keep_their_colours(tiny_weights, tmp_path):
    """A mosaic of one-band paletted sheets carries the colour table: translate reads it in its
    colours, as it reads a paletted file (without the table GDAL refused the VRT)."""
    from geosat2map.reader import open_scene

    mosaic = build_mosaic(_paletted(tmp_path, [RED] * 2), tmp_path / "m.vrt").dst
    with open_scene(mosaic, resolution="native") as scene:
        pixels, valid = scene.read(Window(0, 0, 200, 100))
    assert valid.all() and (pixels[:, 50, 150] == (200, 30, 30)).all() and (pixels[:, 50, 20] == (200, 30, 30)).all()
    assert translate(mosaic, tmp_path / "map.tif", weights=tiny_weights, resolution="native").width == 200


def test_the_mosaic_moves_with_its_sheets(tmp_path):
    """Sheet paths are relative to the VRT: the folder can be moved or shared as a whole."""
    whole = write_scene(tmp_path / "whole.tif", width=400, height=300)
    folder = tmp_path / "delivery"
    build_mosaic(cut(whole, folder / "sheets", (200, 150)), folder / "m.vrt")
    moved = shutil.move(folder, tmp_path / "elsewhere")
    with rasterio.open(Path(moved) / "m.vrt") as m, rasterio.open(whole) as w:
        np.testing.assert_array_equal(m.read(), w.read())


def _paletted(tmp_path: Path, tables: list[dict]) -> list[Path]:
    """One-band paletted 100 x 100 sheets side by side, one per colour table."""
    sheets = []
    for i, table in enumerate(tables):
        sheets.append(write_scene(tmp_path / f"p{i}.tif", width=100, height=100, count=1,
                                  data=np.full((1, 100, 100), 1, np.uint8)))
        with rasterio.open(sheets[-1], "r+") as ds:
            ds.write_colormap(1, table)
            ds.transform = ds.transform @ rasterio.Affine.translation(100 * i, 0)
    return sheets


def _rotated(tmp_path: Path) -> Path:
    path = write_scene(tmp_path / "rotated.tif", width=100, height=100)
    with rasterio.open(path, "r+") as ds:
        ds.transform = ds.transform @ rasterio.Affine.rotation(20)
    return path


@pytest.mark.parametrize("make, dst, message", [
    (lambda d: [write_scene(d / "a.tif"), write_scene(d / "b.tif", count=4)], "m.vrt", "have the same bands"),
    (lambda d: [write_scene(d / "a.tif"), write_scene(d / "b.tif", nodata=0)], "m.vrt", "share one nodata value"),
    (lambda d: [write_scene(d / "a.tif")], "m.tif", "name it .vrt"),
    (lambda d: [d / "missing.tif"], "m.vrt", "missing.tif"),
    (_rotated, "m.vrt", "not north-up"),
    (lambda d: _paletted(d, [RED, {0: (0, 0, 0, 255), 1: (30, 30, 200, 255)}]), "m.vrt", "share one colour table"),
    (lambda d: [write_scene(d / "grey.tif", count=1), *_paletted(d, [RED])], "m.vrt", "share one colour table"),
])
def test_sheets_that_do_not_fit_together_are_one_line_and_write_nothing(make, dst, message, tmp_path):
    sheets = make(tmp_path)
    with pytest.raises(Geosat2mapError, match=message):
        build_mosaic(sheets if isinstance(sheets, list) else [sheets], tmp_path / dst)
    assert not (tmp_path / dst).exists() and not list(tmp_path.glob(".*part*"))


def test_a_src_nodata_outside_the_sheets_values_is_refused(tmp_path):
    with pytest.raises(Geosat2mapError, match="nodata -1 is outside the range of .*a.tif's uint8 values"):
        build_mosaic([write_scene(tmp_path / "a.tif")], tmp_path / "m.vrt", src_nodata=-1)
    assert not (tmp_path / "m.vrt").exists()


def test_cli_mosaic_takes_a_pattern_and_keeps_an_existing_mosaic(tmp_path):
    from .conftest import run

    whole = write_scene(tmp_path / "whole.tif", width=400, height=300)
    cut(whole, tmp_path / "sheets", (200, 150))
    out = tmp_path / "m.vrt"
    result = run("mosaic", f"{tmp_path}/sheets/*.tif", out)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {out}: 4 sheets, 400 x 300 pixels (EPSG:32633)"
    again = run("mosaic", f"{tmp_path}/sheets/*.tif", out)
    assert again.exit_code == 1 and "--overwrite" in again.output


def _into(sheet: Path, crs: str, dst: Path) -> Path:
    """``sheet`` reprojected into ``crs`` (bilinear, about its own pixel size), as another file:
    the neighbouring UTM zone's copy of a delivery's sheet, its corners outside the ground
    nodata, or masked where it has no nodata value."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(sheet) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), \
                rasterio.open(dst, "w", **(src.profile | {"crs": crs, "transform": transform, "width": width,
                                                         "height": height})) as out:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(out, b), resampling=Resampling.bilinear)
            if src.nodata is None:
                covered = np.zeros((height, width), np.uint8)
                reproject(np.full(src.shape, 255, np.uint8), covered, src_transform=src.transform, src_crs=src.crs,
                          dst_transform=transform, dst_crs=crs, resampling=Resampling.nearest)
                out.write_mask(covered)
    return dst


@pytest.mark.parametrize("nodata", [None, 0])
def test_a_sheet_in_another_crs_is_warped_into_the_mosaics(nodata, tmp_path):
    """Two sheets in two UTM zones: the second is warped into the first's CRS through a warped VRT
    beside the mosaic, onto the first's pixel grid; the mosaic is the whole scene again (the first
    sheet exactly, the warped one within the blur of two bilinear resamplings: there and back)
    and valid throughout, but for a pixel or so along the cut that neither warped edge covers.
    The warped sheet's empty corners, nodata or masked, let the first sheet show."""
    whole = write_scene(tmp_path / "whole.tif", width=400, height=300, nodata=nodata)
    west, east = cut(whole, tmp_path / "sheets", (200, 300))
    moved = _into(east, "EPSG:32632", tmp_path / "sheets" / "east_32632.tif")
    result = build_mosaic([west, moved], tmp_path / "m.vrt")
    assert (result.crs, result.warped) == ("EPSG:32633", 1)
    assert [p.name for p in (tmp_path / "m_warped").iterdir()] == ["002_east_32632.vrt"]
    with rasterio.open(tmp_path / "m.vrt") as m, rasterio.open(whole) as w:
        assert m.res == w.res  # the first sheet's grid, the warped sheet on whole pixels of it
        there = m.window(*w.bounds)
        got, mask, truth = m.read(window=there), m.read_masks(1, window=there), w.read()
    # The first sheet as it is (but at the cut, where the warped sheet's edge pixels are drawn).
    np.testing.assert_array_equal(got[:, :, :199], truth[:, :, :199])
    inner = (slice(None), slice(2, -2), slice(202, -2))
    assert np.abs(got[inner].astype(int) - truth[inner]).mean() < 8
    assert (mask[2:-2, 2:198] == 255).all() and (mask[2:-2, 202:-2] == 255).all()
    assert (mask[2:-2, 198:202] == 255).mean() > 0.99  # at the cut, a pixel or so uncovered


def test_a_mosaic_in_a_crs_of_its_own_and_its_folder_moves_with_it(tiny_weights, tmp_path):
    """--crs: every sheet is warped (here both, into the second's zone); the mosaic and its
    folder of warped sheets can be moved together, and translated. Rebuilt without warping
    (--overwrite), the stale folder goes; without --overwrite an existing folder is refused."""
    whole = write_scene(tmp_path / "whole.tif", width=400, height=300)
    sheets = cut(whole, tmp_path / "d" / "sheets", (200, 300))
    result = build_mosaic(sheets, tmp_path / "d" / "m.vrt", crs="EPSG:32632")
    assert (result.crs, result.warped) == ("EPSG:32632", 2)
    with rasterio.open(tmp_path / "d" / "m.vrt") as m:
        before = m.read()
    moved = Path(shutil.move(tmp_path / "d", tmp_path / "elsewhere"))
    with rasterio.open(moved / "m.vrt") as m:
        np.testing.assert_array_equal(m.read(), before)
    mapped = translate(moved / "m.vrt", tmp_path / "map.tif", weights=tiny_weights, resolution="native")
    with rasterio.open(mapped.dst) as out:
        assert out.crs == "EPSG:32632" and out.shape == before.shape[1:] and (out.dataset_mask() == 0).any()
    sheets = sorted((moved / "sheets").iterdir())
    (moved / "m.vrt").unlink()  # the folder of an earlier mosaic of that name is left
    with pytest.raises(Geosat2mapError, match="m_warped exists"):
        build_mosaic(sheets, moved / "m.vrt", crs="EPSG:32632")
    build_mosaic(sheets, moved / "m.vrt", overwrite=True)
    assert not (moved / "m_warped").exists()
    with pytest.raises(Geosat2mapError, match="unknown CRS"):
        build_mosaic(sheets, moved / "n.vrt", crs="EPSG:999999")


def test_a_full_disk_while_warping_a_sheet_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """GDAL's VRT copy on a full disk fails in rasterio as a SystemError without a reason: it was a
    traceback (found on a 64 kB tmpfs)."""
    import geosat2map.mosaic as mosaic

    whole = write_scene(tmp_path / "whole.tif", width=400, height=300)
    west, east = cut(whole, tmp_path / "sheets", (200, 300))
    moved = _into(east, "EPSG:32632", tmp_path / "sheets" / "east_32632.tif")

    def full_disk(*args, **kwargs) -> None:
        raise SystemError("Unknown GDAL Error. To debug: ...")

    monkeypatch.setattr(mosaic.rasterio.shutil, "copy", full_disk)
    with pytest.raises(Geosat2mapError, match="writing the warped sheet 002_east_32632.vrt failed .*no reason"):
        build_mosaic([west, moved], tmp_path / "m.vrt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheets", "whole.tif"]


def test_overwrite_never_takes_a_folder_that_is_not_a_mosaics(tmp_path):
    """A folder of the user's own that happens to be named like the warped sheets' is refused,
    even with --overwrite, and left as it is."""
    sheets = cut(write_scene(tmp_path / "whole.tif", width=400, height=300), tmp_path / "sheets", (200, 300))
    own = tmp_path / "m_warped"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    for crs in (None, "EPSG:32632"):
        with pytest.raises(Geosat2mapError, match="holds more than a mosaic's warped sheets"):
            build_mosaic(sheets, tmp_path / "m.vrt", overwrite=True, crs=crs)
    assert (own / "notes.txt").read_text() == "mine" and not (tmp_path / "m.vrt").exists()


def test_sheets_from_a_tile_index_and_only_those_that_meet_an_area(tmp_path):
    """A tile index (a layer of footprints with each sheet's path, relative to the index, as
    gdaltindex and QGIS's Tile Index write) lists the sheets; --aoi keeps those meeting it."""
    import pyogrio
    import shapely

    from .conftest import run

    whole = write_scene(tmp_path / "whole.tif", width=400, height=300)
    sheets = cut(whole, tmp_path / "delivery" / "sheets", (200, 150))
    footprints = []
    for s in sheets:
        with rasterio.open(s) as ds:
            footprints.append(shapely.box(*ds.bounds))
    index = tmp_path / "delivery" / "index.gpkg"
    pyogrio.raw.write(index, geometry=np.array(shapely.to_wkb(footprints), dtype=object),
                      field_data=[np.array([f"sheets/{s.name}" for s in sheets], dtype=object)],
                      fields=["location"], crs="EPSG:32633", geometry_type="Polygon")
    result = run("mosaic", tmp_path / "m.vrt", "--index", index)
    assert result.exit_code == 0 and "4 sheets" in result.stdout, result.output
    with rasterio.open(tmp_path / "m.vrt") as m, rasterio.open(whole) as w:
        np.testing.assert_array_equal(m.read(), w.read())
    # An area over the western half (sheets at columns 0-200): two sheets.
    from .test_aoi import write_polygons

    west = write_polygons(tmp_path / "west.gpkg", [shapely.box(500010, 4499710, 500150, 4499990)])
    result = run("mosaic", tmp_path / "w.vrt", "--index", index, "--aoi", west)
    assert result.exit_code == 0 and "2 sheets" in result.stdout, result.output
    with rasterio.open(tmp_path / "w.vrt") as m:
        assert m.shape == (300, 200)
    far = write_polygons(tmp_path / "far.gpkg", [shapely.box(600000, 4000000, 600100, 4000100)])
    assert "no sheet meets the area of interest" in run("mosaic", tmp_path / "f.vrt", "--index", index,
                                                         "--aoi", far).stderr
    assert "has no field 'path'" in run("mosaic", tmp_path / "g.vrt", "--index", index, "--index-field",
                                        "path").stderr
    # Footprints without a path (drawn by hand in QGIS, the field left empty): named, not "input not found: None".
    pyogrio.raw.write(tmp_path / "gaps.gpkg", geometry=np.array(shapely.to_wkb(footprints), dtype=object),
                      field_data=[np.array([f"delivery/sheets/{sheets[0].name}", None, "", None], dtype=object)],
                      fields=["location"], crs="EPSG:32633", geometry_type="Polygon")
    gaps = run("mosaic", tmp_path / "h.vrt", "--index", tmp_path / "gaps.gpkg")
    assert gaps.exit_code == 1 and gaps.stderr == (f"geosat2map: error: {tmp_path / 'gaps.gpkg'}: feature 2 (and 2 "
                                                   "more) has no sheet path in its 'location' field\n"), gaps.output
