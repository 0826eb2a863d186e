"""render-map and tiles: reprojected vectors land on the right pixels; tiles, index and split agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from pyproj import Transformer

from geosat2map.errors import InputError, OutputError
from geosat2map.render import Grid, MapRenderer, Style, grid_from, read_vectors, render_map
from geosat2map.tiles import TileOptions, make_tiles
from geosat2map.train import TrainConfig, Trainer
from geosat2map_cli.main import cli

from .conftest import cli_json, oblique_rpcs, synthetic_image, write_scene

ORIGIN = (500000.0, 4500000.0)  # the test scenes' top-left corner in EPSG:32633 (conftest.write_scene)


def to_lonlat(points):
    t = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    return [list(t.transform(x, y)) for x, y in points]


def utm(col: float, row: float, res: float = 1.0):
    return ORIGIN[0] + col * res, ORIGIN[1] - row * res


def write_geojson(path: Path, features: list[dict], crs: str | None = None) -> Path:
    doc = {"type": "FeatureCollection", "features": features}
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def square(col0, row0, col1, row1, res=1.0, **props) -> dict:
    ring = to_lonlat([utm(col0, row0, res), utm(col1, row0, res), utm(col1, row1, res), utm(col0, row1, res),
                      utm(col0, row0, res)])
    return {"type": "Feature", "properties": props, "geometry": {"type": "Polygon", "coordinates": [ring]}}


def test_polygon_in_another_crs_lands_on_the_right_pixels(tmp_path):
    vec = write_geojson(tmp_path / "b.geojson", [square(50, 60, 100, 120)])
    grid = Grid(rasterio.crs.CRS.from_epsg(32633), rasterio.Affine(1, 0, ORIGIN[0], 0, -1, ORIGIN[1]), 200, 200)
    style = Style.load()
    pixels, cover = MapRenderer([read_vectors(str(vec))], grid, style).render(0, 0, 200, 200)
    generic = next(r for r in style.rules if r.geometry == "polygon" and not r.where)  # a footprint: a building
    fill = [int(generic.fill[i : i + 2], 16) for i in (1, 3, 5)]
    background = [int(style.background[i : i + 2], 16) for i in (1, 3, 5)]
    assert (pixels[:, 62:118, 52:98].reshape(3, -1).T == fill).all()  # inside, clear of the outline
    assert (pixels[:, :58, :].reshape(3, -1).T == background).all()
    assert (pixels[:, :, 102:].reshape(3, -1).T == background).all()
    # 50 x 60 m, plus the 1 m outline half outside and anti-aliased edge pixels.
    assert 50 * 60 <= cover * 200**2 <= 52 * 62


def line(col0, row0, col1, row1, **props) -> dict:
    return {"type": "Feature", "properties": props,
            "geometry": {"type": "LineString", "coordinates": to_lonlat([utm(col0, row0), utm(col1, row1)])}}


def test_osm_and_geofabrik_attributes_are_drawn_as_the_maps_draw_them(tmp_path):
    """OSM tags and Geofabrik's shapefile classes (fclass): water, parks, buildings, railways and
    rivers in their colours; land-use areas, boundaries, tunnels and power lines are land, not
    the buildings and roads an unmatched polygon or line is drawn as."""
    style = Style.load()
    colour = {name: [int(hex_[i : i + 2], 16) for i in (1, 3, 5)] for name, hex_ in (
        ("land", style.background), ("water", "#b2d2fc"), ("green", "#cadcac"), ("building", "#f1efe9"),
        ("road", "#fefefe"), ("motorway", "#fc9e26"), ("ramp", "#fdd98c"), ("rail", "#bdb9b3"))}
    cases = [  # (polygon or line, its attributes, the colour drawn)
        (square, {"fclass": "water"}, "water"),
        (square, {"fclass": "residential"}, "land"),
        (square, {"landuse": "industrial"}, "land"),
        (square, {"boundary": "administrative"}, "land"),
        (square, {"fclass": "park"}, "green"),
        (square, {"building": "yes", "amenity": "school"}, "building"),
        (square, {"fclass": "building"}, "building"),
        (square, {}, "building"),
        (line, {"fclass": "primary"}, "road"),
        (line, {"fclass": "motorway"}, "motorway"),
        (line, {"railway": "rail"}, "rail"),
        (line, {"fclass": "river"}, "water"),
        (line, {"highway": "primary", "tunnel": "yes"}, "land"),
        (line, {"power": "line"}, "land"),
        (line, {"fclass": "subway"}, "land"),
        (line, {"highway": "motorway_link"}, "ramp"),
    ]
    # Each feature in a 40 x 40 cell of its own, five cells a row: a square fills it, a line runs
    # through its middle; the colour is read at the cell's centre.
    corners = [(40 * (i % 5), 40 * (i // 5)) for i in range(len(cases))]
    features = [square(x, y, x + 40, y + 40, **props) if shape is square else line(x, y + 20, x + 40, y + 20, **props)
                for (shape, props, _), (x, y) in zip(cases, corners)]
    vec = write_geojson(tmp_path / "osm.geojson", features)
    grid = Grid(rasterio.crs.CRS.from_epsg(32633), rasterio.Affine(1, 0, ORIGIN[0], 0, -1, ORIGIN[1]), 200, 160)
    pixels, _ = MapRenderer([read_vectors(str(vec))], grid, style).render(0, 0, 200, 160)
    got = [pixels[:, y + 20, x + 20].tolist() for x, y in corners]
    assert got == [colour[name] for _, _, name in cases]


def test_only_the_features_near_the_grid_are_read_and_the_map_is_the_same(tmp_path):
    """A region's extract for a small scene: GDAL's spatial filter reads the features whose extent
    meets the grid (widened so a road just outside still draws its edge), and the map is the one
    the whole layer gives."""
    grid = Grid(rasterio.crs.CRS.from_epsg(32633), rasterio.Affine(1, 0, ORIGIN[0], 0, -1, ORIGIN[1]), 200, 200)
    features = [square(20, 20, 60, 60, building="yes"), line(-5, 100, -5, 150, highway="motorway"),  # edge 3 m in
                line(-500, 0, -400, 0), square(3000, 3000, 3010, 3010)]  # far off
    vec = write_geojson(tmp_path / "region.geojson", features)
    near, whole = read_vectors(str(vec), near=grid), read_vectors(str(vec))
    assert (len(near.geometries), len(whole.geometries)) == (2, 4)
    near_map, _ = MapRenderer([near], grid).render(0, 0, 200, 200)
    whole_map, _ = MapRenderer([whole], grid).render(0, 0, 200, 200)
    np.testing.assert_array_equal(near_map, whole_map)
    assert (near_map[:, 120, :2] != near_map[:, 10, 150:152]).any()  # the motorway's edge is drawn


def test_line_width_is_in_ground_metres_and_edges_are_antialiased(tmp_path):
    t = Transformer.from_crs("EPSG:32633", "EPSG:3857", always_xy=True)
    line = [list(t.transform(*utm(0, 100))), list(t.transform(*utm(200, 100)))]
    vec = write_geojson(tmp_path / "r.geojson", [{"type": "Feature", "properties": {},
                                                 "geometry": {"type": "LineString", "coordinates": line}}],
                        crs="urn:ogc:def:crs:EPSG::3857")
    grid = Grid(rasterio.crs.CRS.from_epsg(32633), rasterio.Affine(1, 0, ORIGIN[0], 0, -1, ORIGIN[1]), 200, 200)
    pixels, _ = MapRenderer([read_vectors(str(vec))], grid).render(0, 0, 200, 200)
    column = pixels[0, :, 100].astype(int)
    background = column[0]
    painted = np.abs(column - background) > 0
    # 9 m wide on a grid whose pixels are 0.9996 m on the ground (UTM scale factor), centred on row 100.
    assert 8 <= painted.sum() <= 11
    assert painted[96:104].all() and not painted[:90].any() and not painted[110:].any()
    partial = (column != background) & (column != column[100])
    assert partial.any()  # anti-aliased: edge pixels are blends, not hard steps


def test_render_map_cli_writes_on_the_reference_grid(tmp_path):
    ref = write_scene(tmp_path / "ref.tif", width=300, height=200)
    vec = write_geojson(tmp_path / "b.geojson", [square(10, 10, 60, 60)])
    out = tmp_path / "map.tif"
    result = CliRunner().invoke(cli, ["render-map", str(vec), str(out), "--like", str(ref)])
    assert result.exit_code == 0, result.output
    with rasterio.open(ref) as r, rasterio.open(out) as m:
        assert (m.crs, m.transform, m.width, m.height) == (r.crs, r.transform, r.width, r.height)
        assert m.count == 3 and m.dtypes[0] == "uint8"
        assert m.tags()["TIFFTAG_SOFTWARE"].startswith("geosat2map ")


def test_a_polygon_whose_ring_is_not_closed_is_drawn_with_one_warning_line(tmp_path):
    """GDAL reads an unclosed ring with a warning; the polygon was then dropped (render-map said
    "no vector feature ... falls within the raster's extent") and Python printed the warning with
    pyogrio's source line. It is closed and drawn; the warning is one line."""
    ref = write_scene(tmp_path / "ref.tif", width=300, height=200)
    closed = square(10, 10, 60, 60, building="yes")
    ring = closed["geometry"]["coordinates"][0][:-1]  # the last point, the first again, left off
    vec = write_geojson(tmp_path / "b.geojson", [{**closed, "geometry": {"type": "Polygon", "coordinates": [ring]}}])
    maps, said = {}, {}
    for name, source in (("open", vec), ("closed", write_geojson(tmp_path / "c.geojson", [closed]))):
        maps[name] = tmp_path / f"{name}.tif"
        proc = subprocess.run([sys.executable, "-m", "geosat2map_cli", "render-map", str(source), str(maps[name]),
                               "--like", str(ref)], capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "1 feature drawn" in proc.stdout
        said[name] = proc.stderr.splitlines()
    assert said["closed"] == []
    assert len(said["open"]) == 1 and said["open"][0].startswith("geosat2map: warning: Non closed ring detected")
    with rasterio.open(maps["open"]) as a, rasterio.open(maps["closed"]) as b:
        assert np.array_equal(a.read(), b.read())


def test_render_map_names_a_missing_reference_raster(tmp_path):
    vec = write_geojson(tmp_path / "b.geojson", [square(10, 10, 60, 60)])
    result = CliRunner().invoke(cli, ["render-map", str(vec), str(tmp_path / "m.tif"), "--like",
                                      str(tmp_path / "nowhere.tif")])
    assert result.exit_code == 1
    assert result.output.strip() == f"geosat2map: error: input not found: {tmp_path / 'nowhere.tif'}"


def test_render_map_refuses_a_grid_past_the_pixel_limit(tmp_path):
    """A resolution typed in the wrong units (1e-8 degrees) is one line naming the size and unit,
    before any pixel is drawn; --max-pixels lets a grid that large through. A resolution or
    bound that is not a number is one line too."""
    vec = write_geojson(tmp_path / "b.geojson", [square(10, 10, 60, 60)])
    out = tmp_path / "map.tif"
    args = ["render-map", str(vec), str(out), "--bounds", "0", "0", "0.001", "0.001", "--crs", "EPSG:4326"]
    result = CliRunner().invoke(cli, [*args, "--resolution", "1e-8"])
    assert result.exit_code == 1 and not out.exists()
    assert "100,000 x 100,000 pixels, more than 4,294,967,296" in result.output and "degree" in result.output
    result = CliRunner().invoke(cli, [*args, "--resolution", "1e-5", "--max-pixels", "9999"])
    assert result.exit_code == 1 and "100 x 100 pixels, more than 9,999" in result.output
    assert grid_from(bounds=(0, 0, 0.001, 0.001), crs="EPSG:4326", resolution=1e-5, max_pixels=10_000).width == 100
    for bad, phrase in ((["--resolution", "nan"], "resolution must be a positive number of --crs units, not nan"),
                        (["--resolution", "-1"], "not -1.0"),
                        (["--resolution", "1e-5", "--bounds", "0", "0", "nan", "1"], "right > left")):
        result = CliRunner().invoke(cli, [*args, *bad])  # NaN: was a traceback from the pixel count
        assert result.exit_code == 1 and phrase in result.output and "Traceback" not in result.output
        assert not out.exists()


def make_region(tmp_path: Path, size: int = 1536) -> tuple[Path, Path]:
    """A 1 m scene with buildings scattered over it."""
    sat = write_scene(tmp_path / "sat.tif", width=size, height=size)
    rng = np.random.default_rng(1)
    feats = []
    for _ in range(120):
        c, r = rng.integers(0, size - 40, 2)
        feats.append(square(c, r, c + rng.integers(10, 40), r + rng.integers(10, 40), building="yes"))
    return sat, write_geojson(tmp_path / "buildings.geojson", feats)


@pytest.fixture
def region(tmp_path):
    return make_region(tmp_path)


def test_tiles_index_and_split(region, tmp_path):
    sat, vec = region
    out = tmp_path / "tiles"
    result = make_tiles(sat, out, vectors=[str(vec)], options=TileOptions(resolution=1.0, block_tiles=2))
    assert result.train > 0 and result.val > 0
    index = json.loads((out / "index.geojson").read_text())["features"]
    assert len(index) == result.train + result.val
    positions = {"train": [], "val": []}
    for feat in index:
        p = feat["properties"]
        for kind in ("sat", "map"):
            path = out / p["split"] / kind / p["name"]
            with rasterio.open(path) as tile:
                assert tile.shape == (256, 256) and tile.count == 3
                # The tile's georeferencing is where the index says it is.
                assert tile.transform.c == pytest.approx(ORIGIN[0] + p["x"])
                assert tile.transform.f == pytest.approx(ORIGIN[1] - p["y"])
        lons = [c[0] for c in feat["geometry"]["coordinates"][0]]
        corners = to_lonlat([utm(p["x"] + dx, p["y"] + dy) for dx in (0, 256) for dy in (0, 256)])
        assert min(lons) == pytest.approx(min(c[0] for c in corners), abs=1e-9)
        assert max(lons) == pytest.approx(max(c[0] for c in corners), abs=1e-9)
        positions[p["split"]].append((p["x"], p["y"]))
    assert sorted(f.name for f in (out / "train" / "sat").iterdir()) == sorted(
        f["properties"]["name"] for f in index if f["properties"]["split"] == "train")
    # No validation pixel next to a training pixel: at least one pixel between any two tiles.
    for tx, ty in positions["train"]:
        for vx, vy in positions["val"]:
            assert abs(tx - vx) > 256 or abs(ty - vy) > 256
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] == result.train and manifest["gsd_m"] == pytest.approx(1.0, rel=0.01)


def test_overwrite_replaces_a_tiles_folder_and_nothing_else(region, tmp_path):
    """--overwrite deleted whatever folder it was given (a slip of the path: the user's files)."""
    sat, vec = region
    options = TileOptions(resolution=1.0, block_tiles=2)
    theirs = tmp_path / "thesis"
    theirs.mkdir()
    (theirs / "chapter1.tex").write_text("years of work")
    with pytest.raises(OutputError, match="holds files and is not a tiles folder"):
        make_tiles(sat, theirs, vectors=[str(vec)], options=options, overwrite=True)
    assert (theirs / "chapter1.tex").read_text() == "years of work"
    out = tmp_path / "tiles"
    first = make_tiles(sat, out, vectors=[str(vec)], options=options)
    (tmp_path / "empty").mkdir()
    for folder in (out, tmp_path / "empty"):  # an earlier tiles folder, or an empty one
        assert make_tiles(sat, folder, vectors=[str(vec)], options=options, overwrite=True).train == first.train


@pytest.mark.parametrize("where", ["tile", "manifest"])
def test_a_full_disk_while_cutting_is_one_line_and_leaves_nothing(region, tmp_path, monkeypatch, where):
    """GDAL's write error on the fifth tile (or the OS's on the manifest) was a traceback."""
    import geosat2map.tiles as tiles
    from rasterio.errors import RasterioIOError

    sat, vec = region
    opened, real_open = [], rasterio.open

    def open_until_full(path, mode="r", **kw):
        if mode == "w" and len(opened) == 4:
            raise RasterioIOError("TIFFAppendToStrip:Write error at scanline 120")
        opened.append(path)
        return real_open(path, mode, **kw)

    def full_disk(self, text):
        raise OSError(28, "No space left on device")

    if where == "tile":
        monkeypatch.setattr(tiles.rasterio, "open", open_until_full)
    else:
        monkeypatch.setattr(tiles.Path, "write_text", full_disk)
    with pytest.raises(OutputError, match="(tile r.*|index.geojson) failed.*(Write error|No space left)"):
        make_tiles(sat, tmp_path / "tiles", vectors=[str(vec)], options=TileOptions(resolution=1.0, block_tiles=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buildings.geojson", "sat.tif"]


def test_train_runs_on_tiles(region, tmp_path):
    sat, vec = region
    out = tmp_path / "tiles"
    make_tiles(sat, out, vectors=[str(vec)], options=TileOptions(resolution=1.0, block_tiles=2))
    trainer = Trainer(TrainConfig(data=str(out), out=str(tmp_path / "run"), ngf=4, ndf=4, max_steps=2,
                                  device="cpu", checkpoint_every=0))
    assert len(trainer.train_set) > 0 and trainer.val_set is not None
    trainer.run()
    assert trainer.global_step == 2
    assert trainer.spec.gsd_m == pytest.approx(1.0, rel=0.01)  # taken from the manifest


@pytest.mark.parametrize("manifest, phrase", [
    ("{", "manifest.json is unreadable (Expecting property name"), ("[1.0]", "manifest.json is not a JSON object"),
    ('{"gsd_m": "1.0"}', 'manifest.json gives gsd_m "1.0", not a resolution'),
    ('{"gsd_m": 0}', "manifest.json gives gsd_m 0, not a resolution"),
    ('{"gsd_m": Infinity}', "manifest.json gives gsd_m Infinity, not a resolution")])
def test_a_damaged_tiles_manifest_is_one_line_naming_it(tmp_path, manifest, phrase):
    """The resolution train records is read from a tiles folder's manifest.json, which a user may
    have edited: its damage is named, not met as a traceback."""
    for kind in ("sat", "map"):  # one pair of tiles, as tiles writes them
        (tmp_path / "tiles" / "train" / kind).mkdir(parents=True)
        write_scene(tmp_path / "tiles" / "train" / kind / "r000000_c000000.tif", 256, 256)
    (tmp_path / "tiles" / "manifest.json").write_text(manifest)
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "tiles"), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and phrase in result.stderr, result.output
    assert not (tmp_path / "run").exists()


def test_a_tile_folder_without_val_tiles_trains_without_validation(region, tmp_path):
    """A small region can give no val tiles; training said "no images in tiles/val/sat"."""
    sat, vec = region
    out = tmp_path / "tiles"
    result = make_tiles(sat, out, vectors=[str(vec)], options=TileOptions(resolution=1.0, val_fraction=0))
    assert result.val == 0 and result.train > 0
    trainer = Trainer(TrainConfig(data=str(out), out=str(tmp_path / "run"), ngf=4, ndf=4, max_steps=1,
                                  device="cpu", checkpoint_every=0))
    assert len(trainer.train_set) == result.train and trainer.val_set is None


def test_a_scene_too_small_to_hold_a_block_out_trains_on_all_its_tiles(tmp_path):
    """A scene 520 pixels across cut with --stride 128 (3 x 3 overlapping tiles, as the Paris sample at
    0.3 m): any held-out block's gap took every other tile, and tiles wrote 0 train + 2 val, which
    train refuses. Now no block is held out where none can be, all tiles train, and a note says so."""
    sat, vec = make_region(tmp_path, size=520)
    out = tmp_path / "tiles"
    result = CliRunner().invoke(cli, ["tiles", str(sat), str(out), "--vector", str(vec), "--resolution", "1",
                                      "--stride", "128"])
    assert result.exit_code == 0, result.output
    assert "9 train + 0 val tiles" in result.stdout
    assert result.stderr.startswith("note: no validation tiles:") and result.stderr.count("\n") == 1
    assert len(list((out / "train" / "sat").iterdir())) == 9 and not list((out / "val" / "sat").iterdir())


def test_tiles_say_how_the_scene_was_read_as_translate_does(tmp_path):
    """A 16-bit scene is stretched to 8 bits for its tiles: tiles said nothing of it (translate's
    note, with the ranges used), so a user could not tell what the model will learn from."""
    _, vec = make_region(tmp_path)
    sat = write_scene(tmp_path / "u16.tif", width=1536, height=1536, dtype="uint16")
    result = CliRunner().invoke(cli, ["tiles", str(sat), str(tmp_path / "tiles"), "--vector", str(vec),
                                      "--resolution", "1"])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("note: uint16 input stretched to 0-255 per band")


def test_held_out_blocks_are_those_that_leave_tiles_to_train_on():
    """Where some blocks can be held out and others cannot, the split takes one that can; each
    validation tile still has a pixel's gap to every training tile."""
    from geosat2map.tiles import _split

    t = 256
    # A row of three touching tiles: holding out the middle one would take both others with its gap.
    positions = [(0, 0), (0, 256), (0, 512)]
    for seed in range(8):
        train, val, dropped = _split(positions, TileOptions(tile_size=t, block_tiles=1, val_fraction=0.2, seed=seed))
        assert train and val and len(train) + len(val) + dropped == len(positions)
        assert all(abs(a[0] - b[0]) > t or abs(a[1] - b[1]) > t for a in train for b in val)


def test_tiles_from_a_map_raster(region, tmp_path):
    sat, vec = region
    with rasterio.open(sat) as s:
        grid = Grid(s.crs, s.transform, s.width, s.height)
    map_tif = tmp_path / "map.tif"
    render_map([str(vec)], map_tif, grid)
    out = tmp_path / "tiles"
    result = make_tiles(sat, out, map_raster=map_tif, options=TileOptions(resolution=2.0, block_tiles=1))
    assert result.train + result.val > 0
    assert result.gsd_m == pytest.approx(2.0, rel=0.01)
    # A map raster with no mask that covers only the west of the scene: a tile reaching past its
    # edge is skipped (it used to be kept, part map and part black).
    west = tmp_path / "west.tif"
    with rasterio.open(map_tif) as m:
        pixels = m.read(window=((0, m.height), (0, 700)))
        profile = {**m.profile, "width": 700}
    with rasterio.open(west, "w", **profile) as ds:
        ds.write(pixels)
    out = tmp_path / "west_tiles"
    result = make_tiles(sat, out, map_raster=west, options=TileOptions(resolution=1.0, block_tiles=1, val_fraction=0))
    tiles = list((out / "train" / "map").iterdir())
    assert len(tiles) == result.train > 0
    for tile in tiles:
        with rasterio.open(tile) as t, rasterio.open(west) as w:
            assert t.bounds.right <= w.bounds.right and t.read().max(axis=0).min() > 0, tile.name


def test_tiles_skip_a_collar_marked_by_src_nodata(tmp_path):
    """A scene whose black western third the file does not mark: with --src-nodata 0 the tiles
    there are skipped as nodata; without, they are cut, black."""
    data = synthetic_image(512, 768)
    data[:, :, :256] = 0
    sat = write_scene(tmp_path / "sat.tif", width=768, height=512, data=data)
    map_raster = write_scene(tmp_path / "map.tif", width=768, height=512)
    options = dict(resolution="native", val_fraction=0, block_tiles=1)
    marked = make_tiles(sat, tmp_path / "a", map_raster=map_raster, options=TileOptions(src_nodata=0, **options))
    plain = make_tiles(sat, tmp_path / "b", map_raster=map_raster, options=TileOptions(**options))
    assert (marked.train, marked.skipped["nodata"]) == (4, 2) and (plain.train, plain.skipped["nodata"]) == (6, 0)


def test_tiles_only_at_least_half_inside_the_aoi(region, tmp_path):
    """An L of lon/lat polygons (GeoJSON) over the 1536 m scene, read as geosat2map.aoi reads
    translate's: 256-pixel tiles (stride 256) are kept where half of them or more lies inside."""
    import shapely

    sat, vec = region
    # The west 700 m, and the north 300 m: 2 whole tile columns, the third 188/256 inside.
    aoi = write_geojson(tmp_path / "aoi.geojson", [square(0, 0, 700, 1536), square(700, 0, 1536, 300)])
    out = tmp_path / "tiles"
    result = make_tiles(sat, out, vectors=[str(vec)], aoi=str(aoi),
                        options=TileOptions(resolution=1.0, val_fraction=0, max_nodata=1.0))
    area = shapely.union(shapely.box(0, 0, 700, 1536), shapely.box(700, 0, 1536, 300))
    kept = {(f["properties"]["x"], f["properties"]["y"])
            for f in json.loads((out / "index.geojson").read_text())["features"]}
    expected = {(x, y) for x in range(0, 1536, 256) for y in range(0, 1536, 256)
                if shapely.box(x, y, x + 256, y + 256).intersection(area).area >= 0.5 * 256**2}
    assert kept <= expected and len(expected - kept) == result.skipped["empty_map"]
    assert result.skipped["aoi"] == 36 - len(expected) and len(expected) == 18 + 3


def test_no_overlap_empty_layer_and_aoi_outside_are_clear_errors(region, tmp_path):
    sat, _ = region
    far = write_geojson(tmp_path / "far.geojson", [square(50000, 50000, 50100, 50100)])
    with pytest.raises(InputError, match="falls within"):
        make_tiles(sat, tmp_path / "a", vectors=[str(far)], options=TileOptions(resolution=1.0))
    empty = write_geojson(tmp_path / "empty.geojson", [])
    with pytest.raises(InputError):
        make_tiles(sat, tmp_path / "b", vectors=[str(empty)], options=TileOptions(resolution=1.0))
    aoi = write_geojson(tmp_path / "aoi.geojson", [square(40000, 40000, 41000, 41000)])
    _, vec = region
    result = CliRunner().invoke(cli, ["tiles", str(sat), str(tmp_path / "c"), "--vector", str(vec),
                                      "--resolution", "1", "--aoi", str(aoi)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"geosat2map: error: the AOI {aoi} lies outside the scene"
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_a_map_raster_elsewhere_or_without_georeferencing_is_one_line(region, tmp_path):
    """The map raster is paired with the scene on the ground: one of another place, or with no
    place at all, is refused before a tile is cut."""
    sat, _ = region
    with rasterio.open(sat) as s:
        profile = {**s.profile, "driver": "GTiff"}
        pixels = s.read()
        elsewhere = profile["transform"] @ rasterio.Affine.translation(0, -10 * s.height)
    cases = {"elsewhere.tif": ({**profile, "transform": elsewhere}, "does not overlap the satellite scene"),
             "nowhere.tif": ({k: v for k, v in profile.items() if k not in ("crs", "transform")},
                             "has no georeferencing")}
    for name, (options, phrase) in cases.items():
        with rasterio.open(tmp_path / name, "w", **options) as ds:
            ds.write(pixels)
        out = tmp_path / f"tiles_{name}"
        result = CliRunner().invoke(cli, ["tiles", str(sat), str(out), "--map", str(tmp_path / name),
                                          "--resolution", "1"])
        assert result.exit_code == 1, result.output
        assert phrase in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()


def test_a_scene_far_coarser_than_the_model_is_not_cut_at_its_resolution(tmp_path):
    sat = write_scene(tmp_path / "landsat.tif", width=64, height=64, res=30.0)  # 14x the default's 2.12 m
    vec = write_geojson(tmp_path / "v.geojson", [square(10, 10, 30, 30, res=30.0)])
    with pytest.raises(InputError, match="--resolution native"):
        make_tiles(sat, tmp_path / "t", vectors=[str(vec)])
    assert not (tmp_path / "t").exists()


def test_a_small_fine_scene_is_pointed_to_its_own_resolution(tmp_path):
    """A 200 m scene at 0.5 m is 94 pixels at the model's 2.12 m: the error gave the size only,
    and its own pixels, which a tile fits in, went unmentioned (as for the 0.27 m Las Vegas sample)."""
    sat = write_scene(tmp_path / "small.tif", width=400, height=400, res=0.5)
    vec = write_geojson(tmp_path / "v.geojson", [square(10, 10, 300, 300, res=0.5)])
    message = "smaller than one 256-pixel tile; its own pixels are 0.50 m: --resolution native"
    with pytest.raises(InputError, match=message):
        make_tiles(sat, tmp_path / "t", vectors=[str(vec)])
    assert make_tiles(sat, tmp_path / "t", vectors=[str(vec)], options=TileOptions(resolution="native")).train
    coarse = write_scene(tmp_path / "coarse.tif", width=100, height=100, res=0.5)  # too small at any scale
    with pytest.raises(InputError, match="smaller than one 256-pixel tile$"):
        make_tiles(coarse, tmp_path / "c", vectors=[str(vec)], options=TileOptions(resolution="native"))
    # Pixels not square on the ground (0.5 x 0.75 m): metres, not native, give the model square ones.
    with rasterio.open(sat, "r+") as ds:
        ds.transform = rasterio.Affine(0.5, 0, ds.transform.c, 0, -0.75, ds.transform.f)
    with pytest.raises(InputError, match=r"its own pixels are 0.50 x 0.75 m: --resolution 0.75 \(square pixels"):
        make_tiles(sat, tmp_path / "t2", vectors=[str(vec)])


def test_grid_from_bounds():
    grid = grid_from(bounds=(0, 0, 100, 50), crs="EPSG:32633", resolution=2)
    assert (grid.width, grid.height) == (50, 25)
    with pytest.raises(InputError):
        grid_from(bounds=(0, 0, 100, 50), crs="EPSG:32633")


def test_evaluate_a_translate_output_against_a_map_raster(tmp_path):
    sat, vec = make_region(tmp_path, size=768)
    with rasterio.open(sat) as s:
        grid = Grid(s.crs, s.transform, s.width, s.height)
    map_tif = tmp_path / "map.tif"
    render_map([str(vec)], map_tif, grid)
    result = CliRunner().invoke(cli, ["evaluate", str(map_tif), "--map", str(map_tif), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["count"] == (768 // 256) ** 2
    assert scores["rmse"] == 0 and scores["acc5"] == 1.0  # a map against itself
    assert scores["se"]["rmse"] == 0  # every tile alike
    text = CliRunner().invoke(cli, ["evaluate", str(map_tif), "--map", str(map_tif)]).stdout
    assert "RMSE 0.00 +- 0.00" in text and "PSNR inf dB" in text  # no spread of infinite PSNRs
    other = tmp_path / "other.tif"
    render_map([str(vec)], other, grid, style=None)
    with rasterio.open(other, "r+") as ds:
        ds.write(np.full((3, 768, 768), 255, np.uint8))
    worse = cli_json(["evaluate", str(other), "--map", str(map_tif), "--json"])
    assert worse["rmse"] > 10 and worse["acc5"] < 0.5
    # by class: all white, the output is all road; the rendered map is land and buildings
    by_class = cli_json(["evaluate", str(other), "--map", str(map_tif), "--json", "--classes"])["classes"]
    assert by_class["land"]["recall"] == 0 and by_class["road"]["precision"] == 0 and by_class["land"]["share"] > 0.5
    # A map (valid everywhere, no mask) of the left half only: the windows beyond it are not
    # scored (they were, against the warp's zeros).
    half = tmp_path / "half.tif"
    with rasterio.open(map_tif) as m:
        profile = {**m.profile, "width": 512}
        pixels = m.read(window=((0, 768), (0, 512)))
    with rasterio.open(half, "w", **profile) as ds:
        ds.write(pixels)
    part = cli_json(["evaluate", str(map_tif), "--map", str(half), "--json"])
    assert part["count"] == 6 and part["rmse"] == 0
    small = write_scene(tmp_path / "small.tif", width=165, height=300)  # under a window wide, as the Vegas sample's map
    result = CliRunner().invoke(cli, ["evaluate", str(small), "--map", str(map_tif)])
    assert result.exit_code == 1 and result.stderr == (
        f"geosat2map: error: {small} is 165 x 300 pixels: smaller than one 256-pixel window to score (translate "
        "the scene at a finer --resolution)\n")


def test_a_paletted_map_raster_is_compared_in_its_colours(tmp_path):
    """Maps are often saved paletted: evaluate (and tiles, through the same open_raster) read one
    in its colour table's colours, not as grey indices."""
    index = np.repeat(np.arange(8, dtype=np.uint8), 64)[None, :].repeat(512, axis=0)  # eight colour stripes
    table = {i: (30 * i, 255 - 30 * i, 100, 255) for i in range(8)}
    paletted = write_scene(tmp_path / "paletted.tif", width=512, height=512, count=1, data=index[None],
                           photometric="palette")
    with rasterio.open(paletted, "r+") as ds:
        ds.write_colormap(1, table)
    colours = np.array([table[i][:3] for i in range(8)], np.uint8).T[:, index]
    rgb = write_scene(tmp_path / "rgb.tif", width=512, height=512, data=colours)
    scores = cli_json(["evaluate", str(rgb), "--map", str(paletted), "--json"])
    assert scores["count"] == 4 and scores["rmse"] == 0


def test_evaluate_of_a_map_or_an_output_cut_short_is_one_line_naming_it(tmp_path):
    """Their headers read and their pixels do not: GDAL's read failure was a traceback."""
    whole = write_scene(tmp_path / "whole.tif", width=512, height=512, tiled=True, blockxsize=256, blockysize=256,
                        data=np.random.default_rng(0).integers(0, 256, (3, 512, 512), dtype=np.uint8))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for output, map_raster in ((whole, cut), (cut, whole)):
        result = CliRunner().invoke(cli, ["evaluate", str(output), "--map", str(map_raster)])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith(f"geosat2map: error: reading {cut} failed:"), result.stderr


@pytest.mark.parametrize("options, phrase", [
    (dict(tile_size=0), "tile size must be at least 256"),
    (dict(stride=-5), "stride must be at least 1"),
    (dict(val_fraction=2.0), "--val-fraction is a share"),
    (dict(block_tiles=0), "--block-tiles must be at least 1"),
    (dict(max_nodata=-1.0), "--max-nodata is a share"),
    (dict(seed=-1), "--seed is a whole number from 0"),
])
def test_options_that_cut_no_usable_tile_are_refused_before_reading(tmp_path, options, phrase):
    """A negative stride used to cut tiles outside the scene; a tile size of 0 raised from range()."""
    scene = write_scene(tmp_path / "sat.tif")
    with pytest.raises(InputError, match=phrase):
        make_tiles(scene, tmp_path / "out", map_raster=scene, options=TileOptions(**options))
    assert not (tmp_path / "out").exists()


def test_malformed_features_are_left_out_and_a_polygon_counts_once(tmp_path):
    """A one-point line (real OSM extracts hold some) failed the whole layer with a GEOS
    traceback; a building's fill and outline were counted as two features drawn."""
    sat = write_scene(tmp_path / "sat.tif", width=300, height=300)
    path = tmp_path / "mixed.geojson"
    building = square(10, 10, 60, 60, building="yes")
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        building,
        {"type": "Feature", "properties": {"highway": "primary"}, "geometry": None},
        {"type": "Feature", "properties": {"highway": "primary"},
         "geometry": {"type": "LineString", "coordinates": [building["geometry"]["coordinates"][0][0]]}},
    ]}))
    layer = read_vectors(str(path))
    assert len(layer.geometries) == 1 and layer.geometries[0].geom_type == "Polygon"
    with rasterio.open(sat) as s:
        grid = Grid(s.crs, s.transform, s.width, s.height)
    assert render_map([str(path)], tmp_path / "map.tif", grid) == 1


def test_scoring_a_map_reads_through_a_cache_of_one_row_of_blocks(tmp_path, monkeypatch):
    """evaluate --map walks windows row by row: GDAL's default cache (5 % of memory) only filled
    (1.74 GB of RSS for a 10000 x 10000 map scored against itself; 396 MB bounded)."""
    import rasterio.env

    from geosat2map import metrics
    from geosat2map.evaluate import evaluate_rasters

    from .conftest import write_scene

    scene = write_scene(tmp_path / "scene.tif")
    seen = []
    original = metrics.image_metrics
    monkeypatch.setattr(metrics, "image_metrics",
                        lambda a, b, classes=False: seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX"))
                        or original(a, b, classes))
    scores = evaluate_rasters(scene, scene)
    assert scores["count"] == len(seen) > 0 and set(seen) == {16 * 2**20}


def test_tiles_are_cut_through_a_cache_sized_like_translate(region, tmp_path, monkeypatch):
    """Not GDAL's default cache (5 % of memory), which only filled: see make_tiles."""
    import rasterio.env

    from geosat2map import reader

    sat, vec = region
    seen = []
    original = reader.Scene.read
    monkeypatch.setattr(reader.Scene, "read", lambda self, window: seen.append(
        (rasterio.env.getenv().get("GDAL_CACHEMAX"), self.cache_bytes(256))) or original(self, window))
    make_tiles(sat, tmp_path / "tiles", vectors=[str(vec)], options=TileOptions(resolution=1.0))
    assert seen and all(cache == reader.bounded_cache(need) for cache, need in seen)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # writing the RPC scene
def test_tiles_from_a_scene_placed_by_rpcs_over_a_dem(tmp_path):
    """tiles --rpc-dem (a raw product georeferenced by RPCs): the pairs are cut on the grid of the
    scene orthorectified over the DEM, as translate reads it, and the manifest records the DEM."""
    from rasterio.transform import from_origin

    from geosat2map.reader import open_scene

    from .test_placement import DEG as deg, LAT0 as lat0, LON0 as lon0, _dem

    size = 600
    half = size / 2
    sat = tmp_path / "raw.tif"
    with rasterio.open(sat, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8") as dst:
        dst.write(synthetic_image(size, size).astype(np.uint8))
        dst.rpcs = oblique_rpcs(size, lon0, lat0, deg)
    dem = _dem(tmp_path / "dem.tif", np.zeros((50, 50)))  # 500 m below the RPCs' mean height: 60 pixels east
    map_raster = tmp_path / "map.tif"
    with rasterio.open(map_raster, "w", driver="GTiff", width=1000, height=1000, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(lon0 - 0.005, lat0 + 0.005, deg, deg)) as dst:
        dst.write(synthetic_image(1000, 1000, seed=1).astype(np.uint8))
    out = tmp_path / "tiles"
    result = make_tiles(sat, out, map_raster=map_raster, options=TileOptions(
        resolution="native", rpc_dem=str(dem), val_fraction=0, block_tiles=1))
    assert result.train == 4
    assert json.loads((out / "manifest.json").read_text())["options"]["rpc_dem"] == str(dem)
    with open_scene(sat, resolution="native", rpc_dem=dem) as placed, \
            rasterio.open(out / "train" / "sat" / "r000000_c000000.tif") as tile:
        assert tile.transform.almost_equals(placed.transform)
        assert placed.transform.c == pytest.approx(lon0 - half * deg + 60 * deg, abs=1.5 * deg)
