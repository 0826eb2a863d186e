"""Scenes GDAL reads from elsewhere than a local file: a URL (GDAL's /vsicurl/, here served by a
local HTTP server), a file inside a zip archive (/vsizip/) and a driver's subdataset (GPKG:...)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geosat2map import Geosat2mapError, translate
from geosat2map.reader import is_gdal_path, scene_name
from geosat2map.resume import identity

from .conftest import write_scene
from .test_cli import assert_clean_failure, run


#: A static HTTP server answering byte-range requests, as GDAL's /vsicurl/ makes them (the standard
#: library's handler ignores Range). Its own process: GDAL holds the GIL while it opens a file, so a
#: server thread in the test's process could never answer.
SERVER = """
import http.server, io, sys
from pathlib import Path

class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=sys.argv[1], **kwargs)

    def log_message(self, *args):
        pass

    ranged = 0

    def send_head(self):
        asked = self.headers.get("Range")
        if asked:
            Handler.ranged += 1
        refuse = asked and int(sys.argv[3]) and Handler.ranged % int(sys.argv[3]) == 0
        with open(sys.argv[2], "a") as log:  # what GDAL asked for
            log.write(f"{'503 ' if refuse else ''}{self.command} {self.path}\\n")
        if refuse:  # a busy server: the client is expected to retry
            self.send_error(503)
            return None
        path = Path(self.translate_path(self.path))
        if not asked or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first, _, last = asked.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture
def served(request, tmp_path, monkeypatch) -> tuple[str, Path, Path]:
    """(base URL, folder, log): files put in the folder are served over HTTP on 127.0.0.1; the
    log gets a line per request ("GET /scene.tif", "503 GET /scene.tif" for a refused one).
    Parametrized indirectly with N, it refuses every Nth byte-range request with 503."""
    folder = tmp_path / "served"
    folder.mkdir()
    for name in ("no_proxy", "NO_PROXY"):  # curl must not send 127.0.0.1 to a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.delenv("GDAL_DISABLE_READDIR_ON_OPEN", raising=False)  # translate's own choice is tested
    log = tmp_path / "requests.log"
    refuse_every = str(getattr(request, "param", 0))
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(folder), str(log), refuse_every],
                              stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(server.stdout.readline())}", folder, log
    finally:
        server.terminate()
        server.wait()


def _same_map(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert (x.crs, x.transform, x.shape) == (y.crs, y.transform, y.shape)
        np.testing.assert_array_equal(x.read(), y.read())


def test_translate_from_a_url_matches_the_local_file(served, tiny_weights, tmp_path):
    base, folder, log = served
    scene = write_scene(folder / "scene.tif", tiled=True, blockxsize=256, blockysize=256)
    local = tmp_path / "local.tif"
    translate(scene, local, weights=tiny_weights, backend="torch")
    # Through the CLI, with a query string: its "?" must not make the URL a glob pattern.
    out = tmp_path / "remote.tif"
    result = run("translate", f"{base}/scene.tif?version=1", out, "--weights", tiny_weights, "--backend", "torch",
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}")
    _same_map(local, out)
    # No listing of the folder and no probing for side-car files (.aux.xml, .msk, .ovr): only the scene.
    assert {line.split("?")[0] for line in log.read_text().splitlines()} == {"HEAD /scene.tif", "GET /scene.tif"}


@pytest.mark.parametrize("served", [3], indirect=True)
def test_a_busy_server_is_retried(served, tiny_weights, tmp_path):
    """Every third block request answered 503: the run retries them and makes the same map."""
    base, folder, log = served
    scene = write_scene(folder / "scene.tif", width=900, tiled=True, blockxsize=256, blockysize=256)
    local, remote = tmp_path / "local.tif", tmp_path / "remote.tif"
    translate(scene, local, weights=tiny_weights, backend="torch")
    translate(f"{base}/scene.tif", remote, weights=tiny_weights, backend="torch")
    _same_map(local, remote)
    assert any(line.startswith("503 ") for line in log.read_text().splitlines())


def test_translate_from_a_zip_archive(scene, tiny_weights, tmp_path):
    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(scene, "inner/scene.tif")
    local, zipped = tmp_path / "local.tif", tmp_path / "zipped.tif"
    translate(scene, local, weights=tiny_weights, backend="torch")
    translate(f"/vsizip/{archive}/inner/scene.tif", zipped, weights=tiny_weights, backend="torch")
    _same_map(local, zipped)


def test_a_missing_url_is_one_line(served, tiny_weights, tmp_path):
    base, _, _ = served
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", f"{base}/nope.tif", out, "--weights", tiny_weights), out, "cannot open")


def test_remote_addresses_keep_their_form():
    assert is_gdal_path("https://example.com/a/scene.tif") and is_gdal_path("s3://bucket/scene.tif")
    assert is_gdal_path("/vsizip/x.zip/scene.tif") and not is_gdal_path("data/scene.tif")
    assert scene_name("https://example.com/a/scene.tif?sig=x%2Fy") == "scene.tif"
    assert scene_name("zip+https://example.com/a.zip!/b/scene.tif") == "scene.tif"
    assert scene_name(Path("data/scene.tif")) == "scene.tif"
    # A resumed run from a URL is matched by its address: the server is not asked for size or date.
    ident = identity("https://example.com/a/scene.tif", {}, "0" * 64)
    assert ident["input"] == {"path": "https://example.com/a/scene.tif"}


def test_preview_of_a_zipped_scene(scene, tiny_weights, tmp_path):
    """preview (and tiles) open their scene as translate does: the same addresses work."""
    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(scene, "scene.tif")
    out = tmp_path / "map.tif"
    translate(scene, out, weights=tiny_weights, backend="torch")
    pngs = [tmp_path / "local.png", tmp_path / "zipped.png"]
    for source, png in zip((scene, f"/vsizip/{archive}/scene.tif"), pngs):
        result = run("preview", source, out, png, "--size", "128")
        assert result.exit_code == 0, result.output
    with rasterio.open(pngs[0]) as a, rasterio.open(pngs[1]) as b:
        assert a.count == 3 and max(a.shape) > 128
        np.testing.assert_array_equal(a.read(), b.read())


def test_a_driver_subdataset_is_an_address(tiny_weights, tmp_path):
    """GDAL's DRIVER:file:part addresses (a GeoPackage's raster table, NETCDF:..., SENTINEL2_L2A:...)
    are read as GDAL reads them, not refused as missing files; several make a map each."""
    image = np.random.default_rng(0).integers(0, 255, (3, 300, 400), dtype=np.uint8)
    gpkg = tmp_path / "tiles.gpkg"
    for table in ("north", "south"):
        with rasterio.open(gpkg, "w", driver="GPKG", width=400, height=300, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 4500000, 1, 1),
                           RASTER_TABLE=table, APPEND_SUBDATASET="YES") as dst:
            dst.write(image if table == "north" else image[:, ::-1])
    assert is_gdal_path(f"GPKG:{gpkg}:north") and not is_gdal_path("C:/data/scene.tif")
    assert scene_name(f"GPKG:{gpkg}:north") == "tiles.gpkg:north"
    (tmp_path / "maps").mkdir()
    result = run("translate", f"GPKG:{gpkg}:north", f"GPKG:{gpkg}:south", tmp_path / "maps", "--weights",
                 tiny_weights, "--quiet")
    assert result.exit_code == 0, result.output
    maps = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert maps == ["tiles.gpkg_north.tif", "tiles.gpkg_south.tif"]
    with rasterio.open(tmp_path / "maps" / maps[0]) as north, rasterio.open(tmp_path / "maps" / maps[1]) as south:
        assert (north.width, north.height) == (400, 300) and north.crs == "EPSG:32633"
        assert not np.array_equal(north.read(), south.read())  # each table's own map
    out = tmp_path / "map.tif"
    assert_clean_failure(run("translate", f"GPKG:{gpkg}:east", out, "--weights", tiny_weights), out, "cannot open")


def test_an_area_of_interest_from_a_url(served, tiny_weights, tmp_path):
    """--aoi (and every vector input: tiles --vector, render-map) reads a URL's first layer as GDAL
    does; the map equals the one from the same polygons on disk."""
    from .test_aoi import L_SHAPE, write_polygons

    base, folder, _ = served
    scene = write_scene(tmp_path / "scene.tif")
    local = write_polygons(folder / "aoi.geojson", [L_SHAPE])
    a = translate(scene, tmp_path / "local.tif", weights=tiny_weights, aoi=str(local)).dst
    b = translate(scene, tmp_path / "remote.tif", weights=tiny_weights, aoi=f"{base}/aoi.geojson").dst
    _same_map(a, b)
    with rasterio.open(b) as ds:
        assert (ds.dataset_mask() == 0).any() and ds.tags()["GEOSAT2MAP_AOI"] == "aoi.geojson"
    with pytest.raises(Geosat2mapError, match="cannot read vectors from .*/nosuch.geojson"):
        translate(scene, tmp_path / "x.tif", weights=tiny_weights, aoi=f"{base}/nosuch.geojson")


def test_a_layer_of_a_geopackage_at_a_url(served, tiny_weights, tmp_path):
    """URL:LAYER picks a layer of a served GeoPackage (its first layer is another polygon); a
    missing layer is one line that names it."""
    import pyogrio
    import shapely

    from .test_aoi import L_SHAPE, write_polygons

    base, folder, _ = served
    scene = write_scene(tmp_path / "scene.tif")
    gpkg = folder / "areas.gpkg"
    for name, polygon in (("square", shapely.box(*L_SHAPE.bounds)), ("ell", L_SHAPE)):
        pyogrio.raw.write(gpkg, geometry=np.array([shapely.to_wkb(polygon)], dtype=object), field_data=[],
                          fields=[], layer=name, crs="EPSG:32633", geometry_type="Polygon", append=gpkg.exists())
    local = translate(scene, tmp_path / "local.tif", weights=tiny_weights,
                      aoi=str(write_polygons(tmp_path / "ell.gpkg", [L_SHAPE]))).dst
    remote = translate(scene, tmp_path / "remote.tif", weights=tiny_weights, aoi=f"{base}/areas.gpkg:ell").dst
    _same_map(local, remote)
    with rasterio.open(remote) as ds:
        assert (ds.dataset_mask() == 0).any()
    with pytest.raises(Geosat2mapError, match="cannot read vectors from .*/areas.gpkg:nosuch"):
        translate(scene, tmp_path / "x.tif", weights=tiny_weights, aoi=f"{base}/areas.gpkg:nosuch")


def test_a_tile_index_at_a_url_lists_its_sheets_beside_it(served, tmp_path):
    """mosaic --index URL: the index's relative locations are read at the index's address."""
    import pyogrio
    import shapely

    from geosat2map.mosaic import build_mosaic, sheets_from_index

    from .test_mosaic import cut

    base, folder, _ = served
    whole = write_scene(tmp_path / "whole.tif", width=400, height=300)
    sheets = cut(whole, folder / "sheets", (200, 300))
    pyogrio.raw.write(folder / "index.geojson", geometry=np.array([shapely.to_wkb(shapely.box(0, 0, 1, 1))] * 2,
                                                                   dtype=object),
                      field_data=[np.array([f"sheets/{s.name}" for s in sheets], dtype=object)],
                      fields=["location"], crs="EPSG:32633", geometry_type="Polygon")
    listed = sheets_from_index(f"{base}/index.geojson")
    assert listed == [f"{base}/sheets/{s.name}" for s in sheets]
    with rasterio.open(build_mosaic(listed, tmp_path / "m.vrt").dst) as m, rasterio.open(whole) as w:
        np.testing.assert_array_equal(m.read(), w.read())
