"""Cutting aligned satellite/map training pairs from a new region.

The satellite scene sets the grid (its CRS and footprint, at the target ground sampling
distance); the map comes onto that grid by GDAL warping (a map raster) or by rendering (vector
layers). Tiles are cut on a regular grid, filtered (AOI, nodata, empty map) and split into train
and validation by spatial blocks, with training tiles that touch a validation tile dropped, so no
validation pixel lies next to a training pixel. The output folder is what ``geosat2map train``
reads::

    OUTDIR/train/sat/NAME.tif  OUTDIR/train/map/NAME.tif   (georeferenced 8-bit RGB tiles)
    OUTDIR/val/sat/NAME.tif    OUTDIR/val/map/NAME.tif
    OUTDIR/index.geojson       tile footprints (EPSG:4326) with their split
    OUTDIR/manifest.json       inputs, options and counts
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
import shapely.geometry
from pyproj import Transformer
from rasterio.errors import RasterioIOError
from rasterio.warp import transform_bounds
from rasterio.windows import Window, transform as window_transform

from .aoi import AreaOfInterest
from .errors import InputError, NotGeoreferenced, OutputError, gdal_reason
from .placement import north_up, warped_onto
from .reader import PNG_READ_OPTIONS, Scene, bounded_cache, ground_pixel_size, oblong, open_raster, open_scene
from .render import Grid, MapRenderer, Style, read_vectors


#: The manifest's format: what ``--overwrite`` takes for a tiles folder it may replace.
TILES_FORMAT = "geosat2map-tiles/1"


@dataclass(frozen=True)
class TileOptions:
    resolution: float | str = "model"  # metres per pixel, "native", or "model" (the default model's)
    tile_size: int = 256
    stride: int | None = None  # default: tile_size
    max_nodata: float = 0.05  # share of nodata pixels above which a tile is skipped
    min_map_cover: float = 0.01  # vector maps: share of pixels that must show a feature
    val_fraction: float = 0.2
    block_tiles: int = 4  # side of a split block, in tiles
    seed: int = 0
    style: str | None = None
    src_nodata: float | None = None  # the scene's nodata value in place of its own marking (translate's)
    rpc_dem: str | None = None  # a DEM to orthorectify a scene georeferenced by RPCs over (translate's)

    def check(self) -> None:
        """Refuse options that cut no usable tile, in one line (a stride of -5 cut tiles outside the
        scene, a tile size of 0 and a seed of -1 failed with a traceback)."""
        problems = [
            (self.tile_size < 256, f"tile size must be at least 256 pixels (train crops 256), not {self.tile_size}"),
            (self.stride is not None and self.stride < 1, f"stride must be at least 1 pixel, not {self.stride}"),
            (not 0.0 <= self.max_nodata <= 1.0, f"--max-nodata is a share from 0 to 1, not {self.max_nodata}"),
            (not 0.0 <= self.min_map_cover <= 1.0, f"the map cover is a share from 0 to 1, not {self.min_map_cover}"),
            (not 0.0 <= self.val_fraction <= 1.0, f"--val-fraction is a share from 0 to 1, not {self.val_fraction}"),
            (self.block_tiles < 1, f"--block-tiles must be at least 1, not {self.block_tiles}"),
            (self.seed < 0, f"--seed is a whole number from 0, not {self.seed}"),  # numpy's generators take no sign
        ]
        for failed, message in problems:
            if failed:
                raise InputError(message)


@dataclass
class TilesResult:
    out_dir: Path
    train: int
    val: int
    skipped: dict[str, int]
    gsd_m: float | None
    #: What the user should know about the tiles: how the scene was read (as translate's notes),
    #: a split that held nothing out and why.
    notes: list[str] = field(default_factory=list)


def _model_resolution() -> float:
    from .weights import default_weights_path, read_spec

    spec = read_spec(default_weights_path())
    if spec.gsd_m is None:
        raise InputError("the default model records no ground sampling distance: pass --resolution")
    return spec.gsd_m


class _RasterMap:
    """A map raster warped onto the scene's grid (average when shrinking, so lines stay visible)."""

    def __init__(self, path: str | Path, grid: Grid) -> None:
        self.src = open_raster(path)  # a paletted map in its colours, averaged as such below
        self.vrt = None
        try:
            self.north = north_up(path, self.src)
        except InputError:
            self.src.close()
            raise
        if self.north.crs is None:
            self.close()
            raise InputError(f"map raster {path} has no georeferencing")
        left, bottom, right, top = transform_bounds(self.north.crs, grid.crs, *self.north.bounds)
        gl, gb, gr, gt = grid.bounds
        if left >= gr or right <= gl or bottom >= gt or top <= gb:
            self.close()
            raise InputError(f"the map {path} does not overlap the satellite scene")
        self.bands = [1, 2, 3] if self.src.count >= 3 else [1, 1, 1]
        self.vrt = warped_onto(self.north, grid.crs, grid.transform, grid.width, grid.height)

    def read(self, x: int, y: int, size: int) -> tuple[np.ndarray, bool]:
        window = Window(x, y, size, size)
        pixels = self.vrt.read(self.bands, window=window)
        valid = self.vrt.dataset_mask(window=window) > 0
        usable = bool(valid.all()) and float(pixels.reshape(3, -1).std(axis=1).max()) > 1.0
        return pixels.astype(np.uint8), usable

    def close(self) -> None:
        for ds in (self.vrt, self.north, self.src):
            if ds is not None:
                ds.close()


class _VectorMap:
    def __init__(self, specs: list[str], grid: Grid, style: str | None, min_cover: float) -> None:
        self.renderer = MapRenderer([read_vectors(s, near=grid) for s in specs], grid, Style.load(style))
        self.renderer.require_features()
        self.min_cover = min_cover

    def read(self, x: int, y: int, size: int) -> tuple[np.ndarray, bool]:
        pixels, cover = self.renderer.render(x, y, size, size)
        return pixels, cover >= self.min_cover

    def close(self) -> None:
        pass


def _split(positions: list[tuple[int, int]], opts: TileOptions) -> tuple[list, list, int]:
    """(train, val, dropped): val = whole random blocks; train tiles touching a val tile are dropped.

    On a scene a few tiles across (overlapping tiles, ``--stride`` under the tile size) the random
    blocks' gap can take every other tile, and a folder of validation tiles alone trains nothing:
    then blocks are taken in the same random order, skipping one whose gap would leave no training
    tile, and where none can be held out so, all tiles train (``val`` is empty). Elsewhere the
    split is the random blocks', computed once (each try costs a pass over tiles and val tiles)."""
    # Blocks shrink (down to one tile) on small scenes, so there are enough to split.
    block_tiles = opts.block_tiles
    while block_tiles > 1 and len({(y // (block_tiles * opts.tile_size), x // (block_tiles * opts.tile_size))
                                   for y, x in positions}) < 4:
        block_tiles //= 2
    block = block_tiles * opts.tile_size
    blocks = sorted({(y // block, x // block) for y, x in positions})
    rng = np.random.default_rng(opts.seed)
    n_val = 0 if len(blocks) < 2 or opts.val_fraction == 0 else max(1, round(opts.val_fraction * len(blocks)))
    t = opts.tile_size

    def split(val_blocks: set) -> tuple[list, list]:
        val = [p for p in positions if (p[0] // block, p[1] // block) in val_blocks]
        # A training tile may not overlap or touch a validation tile: at least one pixel between them.
        train = [p for p in positions if (p[0] // block, p[1] // block) not in val_blocks
                 and not any(abs(p[0] - v[0]) <= t and abs(p[1] - v[1]) <= t for v in val)]
        return train, val

    order = [blocks[i] for i in rng.permutation(len(blocks))]
    train, val = split(set(order[:n_val]))
    if not train:  # the random blocks' gap took every training tile
        val_blocks: set = set()
        for b in order:
            if len(val_blocks) < n_val and split(val_blocks | {b})[0]:
                val_blocks.add(b)
        train, val = split(val_blocks)
    return train, val, len(positions) - len(val) - len(train)


def _write_tile(path: Path, pixels: np.ndarray, scene: Scene, x: int, y: int) -> None:
    transform = window_transform(Window(x, y, pixels.shape[2], pixels.shape[1]), scene.transform)
    try:
        with rasterio.open(path, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=3,
                           dtype="uint8", crs=scene.crs, transform=transform, compress="deflate",
                           photometric="RGB") as dst:
            dst.write(pixels)
    except (RasterioIOError, OSError) as exc:
        raise OutputError(f"writing the tile {path.name} failed (disk full?): {gdal_reason(exc)}") from None


def make_tiles(
    sat: str | Path,
    out_dir: str | Path,
    *,
    map_raster: str | Path | None = None,
    vectors: list[str] | None = None,
    aoi: str | Path | None = None,
    options: TileOptions = TileOptions(),
    overwrite: bool = False,
) -> TilesResult:
    """Cut training pairs from ``sat`` and a map raster or vector layers into ``out_dir``."""
    if (map_raster is None) == (not vectors):
        raise InputError("give either a map raster (--map) or vector layers (--vector), not both or neither")
    options.check()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputError(f"{out_dir} exists (pass --overwrite to replace it)")
    if out_dir.exists():
        _check_replaceable(out_dir)
    if not out_dir.parent.is_dir():
        raise OutputError(f"the output folder {out_dir.parent} does not exist")
    model_gsd = _model_resolution() if options.resolution == "model" else None
    resolution = model_gsd or options.resolution  # what the index records: metres, or "native"
    t = options.tile_size
    stride = options.stride or t
    # "model" goes through as such, so open_scene refuses a scene far coarser than the model's pixels.
    try:
        scene = open_scene(sat, resolution=options.resolution, model_gsd_m=model_gsd, src_nodata=options.src_nodata,
                           rpc_dem=options.rpc_dem)
    except NotGeoreferenced:
        raise InputError(f"{sat} has no georeferencing: tiles pairs it with the map where both lie on the ground") \
            from None
    work = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.part")
    source = None
    # Tiles are cut row by row, as translate reads: the scene's shared blocks, and the map raster's
    # as many (a 10000 x 10000 scene and map: 951 MB of RSS in GDAL's default cache, 434 MB so).
    cache = bounded_cache(scene.cache_bytes(t) * (2 if map_raster is not None else 1))
    with rasterio.Env(GDAL_CACHEMAX=cache, **PNG_READ_OPTIONS):  # a map raster may be a PNG
        try:
            grid = Grid(scene.crs, scene.transform, scene.width, scene.height)
            source = (_RasterMap(map_raster, grid) if map_raster is not None
                      else _VectorMap(list(vectors), grid, options.style, options.min_map_cover))
            area = AreaOfInterest.read(str(aoi)).in_crs(scene.crs) if aoi is not None else None
            if area is not None and not shapely.intersects(area, shapely.box(*grid.bounds)):
                raise InputError(f"the AOI {aoi} lies outside the scene")
            rows, cols = range(0, scene.height - t + 1, stride), range(0, scene.width - t + 1, stride)
            if not rows or not cols:
                raise InputError(f"the scene is {scene.width} x {scene.height} pixels at {scene.gsd_m:.2f} m: "
                                 f"smaller than one {t}-pixel tile{_finer_hint(scene)}")
            if work.exists():
                shutil.rmtree(work)
            staging = work / "staging"
            kept, skipped = _cut(scene, source, area, itertools.product(rows, cols), options, staging)
            train, val, dropped = _split(sorted(kept), options)
            skipped["split_buffer"] = dropped
            features = _place(staging, work, scene, {"train": train, "val": val}, kept, t)
            _write_text(work / "index.geojson", json.dumps({"type": "FeatureCollection", "features": features}))
            manifest = {
                "format": TILES_FORMAT,
                "satellite": str(sat),
                "map": str(map_raster) if map_raster is not None else None,
                "vectors": list(vectors or []),
                "aoi": str(aoi) if aoi is not None else None,
                "crs": scene.crs.to_string(),
                "gsd_m": scene.gsd_m,
                "options": {**asdict(options), "resolution": resolution, "stride": stride},
                "counts": {"train": len(train), "val": len(val), "skipped": skipped},
            }
            _write_text(work / "manifest.json", json.dumps(manifest, indent=2))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            work.rename(out_dir)
        finally:
            if source is not None:
                source.close()
            scene.close()
            if work.exists():
                shutil.rmtree(work)
    notes = list(scene.notes)  # as translate says them: bands guessed, values stretched, a warp
    if not val and options.val_fraction > 0:
        notes.append("no validation tiles: the scene is too small to hold out a block of them with a gap to the "
                     "training tiles and keep any to train on; train runs without validation (score the model on "
                     "another scene's tiles)")
    return TilesResult(out_dir, len(train), len(val), skipped, scene.gsd_m, notes)


def _cut(scene: Scene, source: _RasterMap | _VectorMap, area: shapely.Geometry | None,
         positions: Iterable[tuple[int, int]], options: TileOptions,
         staging: Path) -> tuple[dict[tuple[int, int], float], dict[str, int]]:
    """Write each usable pair at ``positions`` (top, left) into ``staging``/sat and /map as it is
    cut, so memory stays flat (``positions`` is not listed first: a small stride makes millions).

    Returns the kept positions with their share of nodata pixels, and the count of each reason a
    tile was skipped."""
    t = options.tile_size
    for kind in ("sat", "map"):
        (staging / kind).mkdir(parents=True)
    skipped = {"aoi": 0, "nodata": 0, "empty_map": 0}
    kept: dict[tuple[int, int], float] = {}
    for y, x in positions:
        footprint = _footprint(scene, x, y, t)
        if area is not None and shapely.intersection(footprint, area).area < 0.5 * footprint.area:
            skipped["aoi"] += 1
            continue
        sat_px, valid = scene.read(Window(x, y, t, t))
        nodata = 1.0 - float(valid.mean())
        if nodata > options.max_nodata:
            skipped["nodata"] += 1
            continue
        map_px, usable = source.read(x, y, t)
        if not usable:
            skipped["empty_map"] += 1
            continue
        name = _tile_name(y, x)
        _write_tile(staging / "sat" / name, np.clip(np.rint(sat_px), 0, 255).astype(np.uint8), scene, x, y)
        _write_tile(staging / "map" / name, map_px, scene, x, y)
        kept[(y, x)] = nodata
    if not kept:
        raise InputError(f"no usable tile: skipped {skipped}")
    return kept, skipped


def _place(staging: Path, work: Path, scene: Scene, splits: dict[str, list[tuple[int, int]]],
           kept: dict[tuple[int, int], float], size: int) -> list[dict]:
    """Move each staged pair into its split's folders under ``work`` and return the index's
    features; the pairs left in ``staging`` (those the split's gap dropped) go with it."""
    features = []
    to_wgs84 = Transformer.from_crs(scene.crs, "EPSG:4326", always_xy=True)
    for split, positions in splits.items():
        for kind in ("sat", "map"):
            (work / split / kind).mkdir(parents=True, exist_ok=True)
        for y, x in positions:
            name = _tile_name(y, x)
            for kind in ("sat", "map"):
                (staging / kind / name).rename(work / split / kind / name)
            features.append(_index_feature(scene, to_wgs84, x, y, size, name, split, kept[(y, x)]))
    shutil.rmtree(staging)
    return features


def _check_replaceable(out_dir: Path) -> None:
    """``--overwrite`` replaces an earlier tiles folder (its manifest says so) or an empty one,
    never another folder: a slip of the output path must not delete the user's files."""
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file, not a tiles folder; it is not replaced")
    manifest = out_dir / "manifest.json"
    try:
        made_here = json.loads(manifest.read_text()).get("format", "").startswith(TILES_FORMAT.split("/")[0])
    except (OSError, ValueError, AttributeError):
        made_here = False
    if not made_here and any(out_dir.iterdir()):
        raise OutputError(f"{out_dir} holds files and is not a tiles folder (no tiles manifest.json); --overwrite "
                          "replaces only those: choose another folder")


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise OutputError(f"writing {path.name} failed: {exc.strerror}") from None


def _tile_name(y: int, x: int) -> str:
    return f"r{y:06d}_c{x:06d}.tif"


def _footprint(scene: Scene, x: int, y: int, t: int) -> shapely.Geometry:
    a = scene.transform @ (x, y)
    b = scene.transform @ (x + t, y + t)
    return shapely.box(min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1]))


def _index_feature(scene: Scene, to_wgs84: Transformer, x: int, y: int, t: int, name: str, split: str,
                   nodata: float) -> dict:
    """A tile footprint in EPSG:4326 (GeoJSON's CRS), edges densified so reprojection stays exact."""
    footprint = _footprint(scene, x, y, t)
    ring = shapely.segmentize(footprint, footprint.length / 64)
    wgs = shapely.transform(ring, lambda c: np.column_stack(to_wgs84.transform(c[:, 0], c[:, 1])))
    return {"type": "Feature", "geometry": shapely.geometry.mapping(wgs),
            "properties": {"name": name, "split": split, "x": x, "y": y, "nodata": round(nodata, 4)}}


def _finer_hint(scene: Scene) -> str:
    """Where the scene was resampled coarser than its own pixels (a small scene at the model's
    2.12 m), the resolution that would cut tiles of it: the model then learns that scale."""
    if scene.scale is None or min(scene.scale) <= 1:
        return ""
    dx, dy = ground_pixel_size(scene.src.crs, scene.src.transform, scene.src.width, scene.src.height)
    if not oblong((dx, dy)):
        own = f"{math.sqrt(dx * dy):.2f} m: --resolution native (or metres per pixel)"
    else:  # not square on the ground (degrees away from the equator): native would keep them so
        own = f"{dx:.2f} x {dy:.2f} m: --resolution {max(dx, dy):.2g} (square pixels on the ground)"
    return f"; its own pixels are {own} cuts tiles finer"
