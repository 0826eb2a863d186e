"""Scene in, map out: read -> tile -> infer -> blend -> write, streaming.

Only the tiles of one batch, the overlap rows carried between tile rows and the writer's three block
rows are in memory, so peak memory depends on the scene's width and the batch size, not on its
height.
"""

from __future__ import annotations

import inspect
import json
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
import rasterio
import torch
import torch.distributed as dist

from . import aoi as area, device_rows, sharded
from .devices import resolve_device
from .distributed import DistContext, process_group
from .engine import PRECISIONS, Engine, InferenceEngine, auto_batch_size, engine_choice, make_engine
from . import resume as progress_record
from .errors import Geosat2mapError, InputError, Interrupted, OutputError, WeightsError
from .grid import RowBlender, TileGrid
from .model import TTA_LABELS, recorded_tta, tta_name, tta_of, with_tta
from .placement import dem_name
from .provenance import OPTIONS_TAG, provenance_tags, read_provenance
from .quantize import calibration_picks
from .reader import (RowBand, Scene, available_memory, bounded_cache, is_subdataset, open_scene,
                     scene_name, scene_path)
from .weights import ModelSpec, default_weights_path, load_generator, model_digest, read_spec
from .writer import (BLOCK, GEOTIFF, GEOTIFF_SUFFIXES, GeoTIFFWriter, block_row_buffers, check_compression,
                     check_destination, partial_path)

#: Default overlap between 256-pixel tiles (see benchmarks/overlap.py for the measurement).
DEFAULT_OVERLAP = 64


@dataclass
class TranslateResult:
    """What a translate run did, for the caller to report."""

    dst: Path
    width: int
    height: int
    tiles: int
    tiles_computed: int
    seconds: float
    gsd_m: float | None
    device: str
    backend: str = "torch"
    notes: list[str] = field(default_factory=list)
    batch_size: int = 0
    tta: str | None = None  # the test-time augmentation run (a key of model.TTA)


@dataclass
class FinishedMap:
    """A map that a resumed batch (:func:`translate_many` with ``resume=True``) found already made
    from its scene by its model, and kept."""

    dst: Path


def _pad(tile: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad a tile clipped by a scene smaller than the tile back to ``size``."""
    _, h, w = tile.shape
    if h == size and w == size:
        return tile
    mode = "reflect" if h > 1 and w > 1 else "edge"
    while tile.shape[1] < size or tile.shape[2] < size:  # reflect can at most double per pass
        ph = min(size - tile.shape[1], tile.shape[1] - 1) if mode == "reflect" else size - tile.shape[1]
        pw = min(size - tile.shape[2], tile.shape[2] - 1) if mode == "reflect" else size - tile.shape[2]
        tile = np.pad(tile, ((0, 0), (0, ph), (0, pw)), mode=mode)
    return tile


def _tiles(scene: Scene, grid: TileGrid, first_row: int = 0,
           end_row: int | None = None) -> Iterator[tuple[int, int, np.ndarray | None, np.ndarray]]:
    """(row, col, pixels or None when all-nodata, valid mask) in row-major order, rows
    ``first_row`` to ``end_row``; each tile row is cut from one read across the scene.

    The pixels (the scene's dtype, padded to the tile) are borrowed: a view of the row band,
    valid until the next tile row is read. Consumers copy them where they keep them, converting
    on the way (one pass over each tile instead of a float32 copy here and another there)."""
    band = RowBand(scene, grid.tile_shape(0, 0)[0])
    always_valid = scene.always_valid
    for r in range(first_row, len(grid.ys) if end_row is None else end_row):
        y = grid.ys[r]
        pixels, valid_rows = band.rows(y, y + grid.tile_shape(r, 0)[0])
        for c, x in enumerate(grid.xs):
            _, w = grid.tile_shape(r, c)
            if always_valid:  # a read-only all-True view: nothing to copy or look at
                valid = valid_rows[:, x : x + w]
            else:
                valid = valid_rows[:, x : x + w].copy()  # the band moves on before the tile is blended
            has_data = always_valid or valid.any()
            yield r, c, _pad(pixels[:, :, x : x + w], grid.tile) if has_data else None, valid


def _calibration_tiles(scene: Scene, grid: TileGrid) -> np.ndarray:
    """int8's calibration tiles (:func:`~geosat2map.quantize.calibration_picks`), as the engine
    gets them: where a pick is all nodata, the nearest tile of its row with data, if any."""
    picks = calibration_picks(len(grid.ys), len(grid.xs))
    tiles = []
    for row in sorted({r for r, _ in picks}):
        # the row's tiles with data (views of one read of the row, which stays valid: no next row)
        with_data = {c: pixels for _, c, pixels, _ in _tiles(scene, grid, row, row + 1) if pixels is not None}
        for col in sorted({c for r, c in picks if r == row}):
            if with_data:
                nearest = min(with_data, key=lambda c: abs(c - col))
                tiles.append(with_data.pop(nearest).astype(np.float32))
    if not tiles:
        raise InputError("the scene has no valid pixels where int8 takes its calibration tiles")
    return np.stack(tiles)


def _row_reader(scene: Scene, grid: TileGrid):
    """One tile row's ``_tiles`` items, for the torchrun path, which works row by row."""
    return lambda row: _tiles(scene, grid, row, row + 1)


def _batches(scene: Scene, grid: TileGrid, first_row: int,
             batch_size: int) -> Iterator[tuple[list, np.ndarray | None]]:
    """The tiles from ``first_row`` on, grouped for the model: (the items (row, col, has data,
    valid mask), the float32 pixels of those with data, or None when none has). A group closes
    when ``batch_size`` tiles have data; also when none has or the group spans three tile rows, so
    all-nodata stretches never hold rows in memory. The last group may be empty.

    Each tile is converted straight into its batch's buffer as it is cut (the row band it is cut
    from moves on), a fresh buffer per batch: the engine may still hold the previous one."""
    shape = (batch_size, len(scene.bands), grid.tile, grid.tile)
    pending: list[tuple[int, int, bool, np.ndarray]] = []
    batch, real = np.empty(shape, np.float32), 0  # real: pending tiles with data
    for r, c, pixels, valid in _tiles(scene, grid, first_row):
        if pixels is not None:
            batch[real] = pixels
            real += 1
        pending.append((r, c, pixels is not None, valid))
        if real >= batch_size or real == 0 or r - pending[0][0] >= 2:
            yield pending, batch[:real] if real else None
            if real:
                batch = np.empty(shape, np.float32)
            pending, real = [], 0
    yield pending, batch[:real] if real else None


def _finish(submitted, blender: RowBlender, tile_done: Callable[[], None], computed_in_row: list[int]) -> None:
    """Wait for a submitted batch and blend all its tiles in order."""
    pending, result = submitted
    outputs = iter(result()) if result is not None else iter(())
    for r, c, has_data, valid in pending:
        if not has_data:
            blender.mark_empty(r, c)
        else:
            blender.add(r, c, next(outputs), valid)
            computed_in_row[r] += 1
        tile_done()


def translate(
    src: str | Path,
    dst: str | Path,
    *,
    weights: str | Path | None = None,
    resolution: str | float = "model",
    tile_size: int = 256,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int | None = None,
    device: str = "auto",
    bands: list[int] | None = None,
    cog: bool = False,
    compress: str = "zstd",
    quality: int | None = None,
    overwrite: bool = False,
    allow_ungeoreferenced: bool = False,
    progress: Callable[[int, int], None] | None = None,
    model: tuple[torch.nn.Module, ModelSpec] | None = None,
    resume: bool = False,
    backend: str = "auto",
    precision: str = "auto",
    tta: bool | str = False,
    bounds: tuple[float, float, float, float] | None = None,
    bounds_crs: str | None = None,
    aoi: str | area.AreaOfInterest | None = None,
    src_nodata: float | None = None,
    rpc_dem: str | Path | None = None,
) -> TranslateResult:
    """Translate the GeoTIFF ``src`` into a map GeoTIFF at ``dst``; see ``geosat2map translate --help``.
    ``src`` may be any address GDAL reads (a URL such as ``https://.../scene.tif`` or ``s3://...``,
    a ``/vsizip/`` path, see :func:`~geosat2map.reader.is_gdal_path`); ``dst`` is a local file.

    ``model`` passes an already loaded (generator, spec) pair, to translate many scenes without
    reloading. ``batch_size`` None: 8 tiles on the CPU (16 in bf16), on a GPU as many as half its free memory
    holds (up to 128). ``progress(advance, total)`` is called as tiles finish. ``backend``: ``torch``,
    ``onnxruntime`` (CPU, needs the onnx extra) or ``auto`` (the fastest, timed); ``precision``: ``fp32``,
    ``bf16`` (autocast), ``auto`` (bf16 where the hardware has it, see :func:`make_engine`) or ``int8``
    (ONNX Runtime on the CPU, calibrated on the scene's own tiles, see :mod:`~geosat2map.quantize`).
    Interrupted (Ctrl-C, SIGTERM), a run keeps its finished rows beside ``dst`` and raises :class:`Interrupted`;
    killed, its rows up to the last checkpoint (:data:`~geosat2map.writer.CHECKPOINT_SECONDS`) are
    kept. ``resume=True`` with the same input, options and model continues it. ``tta``: average each
    tile's map with the mirrored map of its mirror image (True or ``"flip"``:
    :class:`~geosat2map.model.FlipAveraged`, twice the compute), or take the per-pixel median of
    18 shifted and mirrored views (``"median"``: :class:`~geosat2map.model.ViewMedian`, 18 times
    the compute, on any engine). ``bounds`` (left, bottom, right, top; in the scene's CRS, or in
    ``bounds_crs`` such as ``"EPSG:4326"``) translates only the source pixels that cover them.
    ``aoi`` (instead of ``bounds``): an area of interest, ``FILE`` or ``FILE:LAYER`` of polygons
    (or its :class:`~geosat2map.aoi.AreaOfInterest`): the map covers their bounding box and is
    nodata outside them. ``src_nodata``: the value that marks nodata in the scene (in every band
    of a pixel), in place of its own nodata, alpha or mask: a black collar the file does not mark.
    ``rpc_dem``: a raster of heights (any CRS GDAL reads) to orthorectify a scene georeferenced by
    RPCs over, as ``gdalwarp -rpc -to RPC_DEM=...`` (without it, RPCs place the ground at their
    mean height; see :func:`~geosat2map.placement.placement`).
    ``compress``: ``zstd`` (the default), ``deflate`` or ``lzw`` (lossless), ``jpeg`` or ``webp``
    (lossy, at ``quality`` 1-100, 90 unless given); see :mod:`~geosat2map.writer`.
    """
    src, dst = scene_path(src), Path(dst)
    _check_tiling(tile_size, overlap)
    if batch_size is not None and batch_size < 1:
        raise InputError("batch size must be at least 1")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    tta = tta_name(tta)
    check_compression(compress, quality)
    aoi = _area(aoi, bounds)
    batch_bytes = (batch_size or 0) * tile_size**2 * 3 * 4 * 2  # float32 tiles in, maps out: a lower bound
    free = available_memory()
    if free is not None and batch_bytes > 0.5 * free:
        raise InputError(f"a batch of {batch_size} tiles needs over {batch_bytes / 2**30:.1f} GiB and "
                         f"{free / 2**30:.1f} GiB is available: use a smaller --batch-size")
    torch_device = resolve_device("cpu" if precision == "int8" and device == "auto" else device)
    with process_group(torch_device.type) as ctx:
        if ctx.enabled:
            if resume:
                raise InputError("--resume is not available under torchrun; run the resumed job in one process")
            if torch_device.type == "cuda":
                torch_device = torch.device("cuda", ctx.local_rank)
            if backend == "auto":  # every rank must run the same engine: no timing
                backend = "onnxruntime" if precision == "int8" else "torch"
        local_src = None if isinstance(src, str) else src
        _agree(ctx, lambda: check_destination(dst, local_src, overwrite, GEOTIFF) if ctx.is_main else None)
        net, spec = model if model is not None else load_generator(weights)
        net = with_tta(net, tta)
        started = time.perf_counter()
        if batch_size is None:  # ONNX Runtime never computes in bf16, whatever the hardware: fp32's batch
            batch_size = auto_batch_size(net, torch_device, spec.in_channels, tile_size,
                                         "fp32" if backend == "onnxruntime" or precision == "int8" else precision)
        asked = asked_options(dict(resolution=resolution, bands=bands, tile_size=tile_size, overlap=overlap, tta=tta,
                                   precision=precision, backend=backend, bounds=bounds, bounds_crs=bounds_crs,
                                   aoi=aoi, src_nodata=src_nodata, rpc_dem=rpc_dem, cog=cog, compress=compress,
                                   quality=quality))
        return _run(src, dst, net, spec, torch_device, started, asked, bands=bands, resolution=resolution,
                    bounds=bounds, bounds_crs=bounds_crs, aoi=aoi, src_nodata=src_nodata, rpc_dem=rpc_dem,
                    tile_size=tile_size, overlap=overlap, batch_size=batch_size, cog=cog,
                    compress=compress, quality=quality, allow_ungeoreferenced=allow_ungeoreferenced,
                    progress=progress, resume=resume, backend=backend, precision=precision, ctx=ctx)


@dataclass
class TranslatePlan:
    """What :func:`translate` would make of a scene (:func:`plan_translation`)."""

    width: int
    height: int
    gsd_m: float | None
    crs: str | None
    #: The tiles a run computes at most: those of the grid with a pixel inside the area of interest
    #: (all without one). A run also skips those wholly nodata: see ``data_tiles``.
    tiles: int
    #: All the tiles of the map's grid.
    grid_tiles: int
    bands: list[int]
    notes: list[str] = field(default_factory=list)
    #: Of ``tiles``, those with a valid pixel in the scene's mask read every ``mask_step`` pixels
    #: (1: every pixel, the count a run computes; more, on a large scene: an estimate, which a thin
    #: strip of data between the samples escapes). None when the scene marks no nodata (a nodata
    #: value, an alpha band or a mask): every tile is computed.
    data_tiles: int | None = None
    mask_step: int = 1


def plan_translation(
    src: str | Path,
    weights: str | Path | None = None,
    *,
    resolution: str | float = "model",
    tile_size: int = 256,
    overlap: int = DEFAULT_OVERLAP,
    bands: list[int] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    bounds_crs: str | None = None,
    aoi: str | area.AreaOfInterest | None = None,
    src_nodata: float | None = None,
    rpc_dem: str | Path | None = None,
    allow_ungeoreferenced: bool = False,
) -> TranslatePlan:
    """The map :func:`translate` would write from ``src`` with these options, and its tiles, planned
    as translate plans them (placement, resampling to the model's ground sampling distance, bounds
    or area of interest, bands, the memory check) but with no model loaded and no tile computed:
    a large scene's size and cost before a long run (``translate --dry-run``). Of the pixels,
    only a scene's mask is read, where it marks nodata (:attr:`TranslatePlan.data_tiles`)."""
    _check_tiling(tile_size, overlap)
    spec = read_spec(weights if weights is not None else default_weights_path())
    scene, grid, _ = _open_checked(scene_path(src), bands, resolution, spec, allow_ungeoreferenced, tile_size,
                                   overlap, bounds, bounds_crs, _area(aoi, bounds), src_nodata, rpc_dem)
    try:
        windows = np.array([(x, y, *grid.tile_shape(r, c)[::-1]) for r, y in enumerate(grid.ys)
                            for c, x in enumerate(grid.xs)], np.int64)
        computed = (np.ones(len(windows), bool) if scene.aoi is None
                    else area.windows_touched(scene.aoi, scene.transform, windows))
        plan = TranslatePlan(scene.width, scene.height, scene.gsd_m,
                             None if scene.crs is None else scene.crs.to_string(), int(computed.sum()), len(grid),
                             list(scene.bands), list(scene.notes))
        if not scene.all_valid:
            plan.mask_step = -(-max(scene.width, scene.height) // PLAN_MASK_SIDE)
            plan.data_tiles = int((computed & _with_data(scene, windows, plan.mask_step)).sum())
        return plan
    finally:
        scene.close()


#: The longest side of the mask :func:`plan_translation` reads (67 MB of counts at most).
PLAN_MASK_SIDE = 4096


def _with_data(scene: Scene, windows: np.ndarray, step: int) -> np.ndarray:
    """Which ``windows`` (column, row, width, height) hold a valid pixel of the scene's mask read
    every ``step`` pixels; each window is asked of the cells it overlaps at all."""
    h, w = -(-scene.height // step), -(-scene.width // step)
    valid = scene.valid_decimated(h, w)
    counts = np.zeros((h + 1, w + 1), np.int32)  # valid cells above and left of each corner
    np.cumsum(np.cumsum(valid, axis=0, dtype=np.int32), axis=1, out=counts[1:, 1:])
    x, y, tw, th = windows.T
    c0, c1 = x * w // scene.width, -(-(x + tw) * w // scene.width)
    r0, r1 = y * h // scene.height, -(-(y + th) * h // scene.height)
    return counts[r1, c1] - counts[r0, c1] - counts[r1, c0] + counts[r0, c0] > 0


def kept_rows(dst: Path, required: bool = True) -> int | None:
    """The rows of ``dst`` an interrupted run kept in its partial output, which ``resume=True``
    continues from (whether this run may is checked when it starts: the same input, options and
    model). None when there is none and it is not ``required`` (a batch starts such a map
    afresh); else, or when its record is unreadable, the run's error."""
    record = progress_record.record_path(dst)
    if not required and not record.exists():
        return None
    return progress_record.load(record, partial_path(dst), dst)["rows"]


def _check_tiling(tile_size: int, overlap: int) -> None:
    if tile_size % 256 or tile_size <= 0:
        raise InputError(f"tile size must be a multiple of 256 (the U-Net halves it 8 times), not {tile_size}")
    if not 0 <= overlap <= tile_size // 2:
        raise InputError(f"overlap must be between 0 and {tile_size // 2} pixels, not {overlap}")


def _area(aoi: str | Path | area.AreaOfInterest | None, bounds) -> area.AreaOfInterest | None:
    """The area of interest read (before the model loads), refused beside bounds."""
    if aoi is not None and bounds is not None:
        raise InputError("give bounds or an area of interest, not both")
    return area.AreaOfInterest.read(str(aoi)) if isinstance(aoi, (str, Path)) else aoi


def _engine_on_every_rank(ctx: DistContext, build: Callable[[], Engine]) -> Engine:
    """``build()`` on every rank, the main rank's first: what it makes once and keeps in the cache
    (an ONNX export, an int8 model from the same calibration tiles) the others then load instead of
    all making it at once; a failure on any rank stops them all with its error."""
    made: list[Engine] = []
    _agree(ctx, lambda: made.append(build()) if ctx.is_main else None)
    _agree(ctx, lambda: None if ctx.is_main else made.append(build()))
    return made[0]


def _agree(ctx: DistContext, check: Callable[[], None]) -> None:
    """Run ``check`` on every rank and fail on all of them if it fails on any (no rank left waiting)."""
    failure: Geosat2mapError | None = None
    try:
        check()
    except Geosat2mapError as exc:
        failure = exc
    if ctx.enabled:
        flag = torch.tensor([1 if failure else 0])
        dist.all_reduce(flag)
        if flag.item() and failure is None:
            raise Geosat2mapError("another torchrun rank failed (its error is in its own output)")
    if failure is not None:
        raise failure


def check_map_folder(srcs: list[str | Path], dst_dir: Path) -> None:
    """Refuse, before any work, a folder of maps that is not there or where two scenes' maps would
    take one name (:func:`map_name`)."""
    if not dst_dir.is_dir():
        raise OutputError(f"with several inputs the output must be an existing folder, not {dst_dir}")
    names = [map_name(s) for s in srcs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"several inputs share a file name, their outputs would collide: {', '.join(twice)}")


def translate_many(
    srcs: list[str | Path],
    dst_dir: str | Path,
    *,
    weights: str | Path | None = None,
    **options,
) -> Iterator[tuple[str | Path, TranslateResult | Geosat2mapError]]:
    """Translate several scenes into the folder ``dst_dir``, loading the model once. Each map takes
    its scene's file name (:func:`map_name`: ``.tif`` for a scene in another format).

    Yields ``(src, result)`` per scene, or ``(src, error)`` for a scene that fails with a
    :class:`Geosat2mapError`, so one bad file does not stop the others. Other options as for
    :func:`translate`; ``resume=True`` continues an interrupted batch: a scene whose map is
    finished is kept (:class:`FinishedMap`; it must name the scene and the model), one with a
    partial output is resumed, the rest are translated.
    """
    dst_dir = Path(dst_dir)
    check_map_folder(srcs, dst_dir)
    options["aoi"] = _area(options.get("aoi"), options.get("bounds"))  # read once for all scenes
    model = options.pop("model", None) or load_generator(weights)
    model = (with_tta(model[0], options.get("tta")), model[1])  # wrapped once for all scenes
    resume = options.pop("resume", False)
    digest = model_digest(model[0].generator if tta_of(model[0]) else model[0]) if resume else ""
    with process_group(resolve_device(options.get("device", "auto")).type):  # one group for all scenes
        for src in srcs:
            dst = dst_dir / map_name(src)
            try:
                if resume and dst.exists() and not options.get("overwrite"):
                    yield src, finished_map(src, dst, digest, options)
                    continue
                partial = resume and progress_record.record_path(dst).exists()
                yield src, translate(src, dst, model=model, resume=partial, **options)
            except Geosat2mapError as exc:
                yield src, exc


def finished_map(src: str | Path, dst: Path, digest: str, options: dict) -> FinishedMap:
    """``dst``, found by a resumed run, if it is ``src``'s map by the model of ``digest``
    (:func:`~geosat2map.weights.model_digest`) made with these :func:`translate` ``options`` (see
    :func:`asked_options`); else an :class:`OutputError`."""
    made = read_provenance(dst)
    if (made.get("GEOSAT2MAP_SOURCE"), made.get("GEOSAT2MAP_MODEL_SHA256")) != (scene_name(src), digest):
        raise OutputError(f"{dst} exists and is not this scene's map by this model; pass --overwrite to replace it")
    then = made.get(OPTIONS_TAG)
    if then is None:
        raise OutputError(f"{dst} exists and does not record the options it was made with; pass --overwrite to "
                          "replace it")
    now = json.loads(asked_options(options))
    differ = [f"{name} {then.get(name)!r}, not {value!r}" for name, value in now.items() if then.get(name) != value]
    if differ:
        raise OutputError(f"{dst} exists and was made with other options ({'; '.join(differ)}); pass --overwrite "
                          "to replace it")
    return FinishedMap(dst)


def asked_options(options: dict) -> str:
    """The :func:`translate` options that shape a map, as asked (defaults filled in), as JSON: a
    map records them (``GEOSAT2MAP_OPTIONS``) so that a resumed batch keeps a finished map only if
    it was asked for the same way. An area of interest is named by a digest of its polygons."""
    asked = {name: options.get(name, default) for name, default in _ASKED.items()}
    aoi = _area(asked["aoi"], None)
    asked["aoi"] = None if aoi is None else f"{area.digest(aoi.geometry)} {aoi.crs.to_string()}"
    if asked["src_nodata"] is not None:
        asked["src_nodata"] = repr(float(asked["src_nodata"]))  # NaN as text
    if asked["rpc_dem"] is not None:
        asked["rpc_dem"] = dem_name(asked["rpc_dem"])
    asked["tta"] = recorded_tta(tta_name(asked["tta"]))
    return json.dumps(asked, sort_keys=True)


def tta_text(name: str) -> str:
    """The test-time augmentation ``name`` as a map's tags say it, with its option."""
    return f"{TTA_LABELS[name]} (--tta{'' if name == 'flip' else '-' + name})"


def changed_options(recorded: dict) -> dict:
    """The options a map records as asked (its ``GEOSAT2MAP_OPTIONS``, read by
    :func:`~geosat2map.provenance.read_provenance`) that are not translate's defaults: what its
    command line said beyond ``translate SRC DST``."""
    defaults = json.loads(asked_options({}))
    return {name: value for name, value in recorded.items() if defaults.get(name) != value}


#: translate's options that change the pixels of its map (not how fast, where or what it reports),
#: with their defaults.
_ASKED = {name: p.default for name, p in inspect.signature(translate).parameters.items()
          if name in ("resolution", "bands", "tile_size", "overlap", "tta", "precision", "backend", "bounds",
                      "bounds_crs", "aoi", "src_nodata", "rpc_dem", "cog", "compress", "quality")}


def map_name(src: str | Path) -> str:
    """The file name of ``src``'s map in a folder of maps: the scene's own, ending ``.tif`` where
    it names another format (``scene.jp2`` -> ``scene.tif``); a subdataset's keeps what names it
    (``GPKG:tiles.gpkg:table`` -> ``tiles.gpkg_table.tif``, so two tables make two maps)."""
    name = scene_name(src)
    if is_subdataset(src):
        return name.replace(":", "_") + ".tif"
    path = Path(name)
    return path.name if path.suffix.lower() in GEOTIFF_SUFFIXES else f"{path.stem}.tif"


def row_buffer_bytes(grid: TileGrid) -> int:
    """Memory the streaming needs beyond the model: the row band tiles are cut from and the
    blender's carried overlap rows (float32 RGB and a mask at most), and the writer's uint8
    block rows with their masks."""
    return grid.width * ((grid.tile + grid.carried_rows) * (3 * 4 + 1) + block_row_buffers(grid.tile) * BLOCK * 4)


def gdal_cache_bytes(scene: Scene, tile: int) -> int:
    """GDAL's block cache for a run: the source blocks :meth:`Scene.cache_bytes` says reads share
    (:func:`~geosat2map.reader.bounded_cache`). It grows with the scene's width, never its height.
    (A smaller cache makes GDAL decode source blocks several times; room for output blocks as well
    only added memory: the writer hands GDAL whole block rows.)"""
    need = scene.cache_bytes(tile)
    if scene.warped_from is not None:
        # The writer's block row passes through the same cache; for a warped scene its room
        # matters (4096 x 4096 rotated 20 degrees, read at 0.5 m: reading 7.1-7.5 s in a 16 MB
        # cache, 3.0-3.4 s in 24-64 MB).
        need += BLOCK * scene.width * 4
    return bounded_cache(need)


def first_row_after(grid: TileGrid, rows: int) -> int:
    """The first tile row that writes to output rows at or below ``rows`` (earlier ones cannot)."""
    return next((r for r, y in enumerate(grid.ys) if y + grid.tile_shape(r, 0)[0] > rows), len(grid.ys))


def _open_checked(src, bands, resolution, spec, allow_ungeoreferenced, tile_size, overlap, bounds,
                  bounds_crs, aoi, src_nodata, rpc_dem) -> tuple[Scene, TileGrid, int]:
    """The scene, its tile grid and the GDAL cache size for it, once it is known to fit in memory
    and its data to decode (:meth:`Scene.check_readable`)."""
    scene = open_scene(src, bands, resolution, spec.gsd_m, allow_ungeoreferenced, bounds, bounds_crs, aoi,
                       src_nodata, rpc_dem)
    try:
        if len(scene.bands) != spec.in_channels:
            raise WeightsError(
                f"the model takes {spec.in_channels} bands but {len(scene.bands)} were selected (--bands)"
            )
        grid = TileGrid(scene.width, scene.height, tile_size, overlap)
        cache = gdal_cache_bytes(scene, tile_size)
        need = row_buffer_bytes(grid) + cache
        free = available_memory()
        if free is not None and need > 0.8 * free:  # a hostile header or a truly huge scene: say so now
            raise InputError(f"{src} is {scene.width} pixels wide at this resolution: streaming it needs "
                             f"{need / 2**30:.1f} GiB of row buffers and {free / 2**30:.1f} GiB is available; "
                             "use a coarser --resolution or cut the scene into strips")
        scene.check_readable()
    except BaseException:
        scene.close()
        raise
    return scene, grid, cache


def _run(src, dst, net, spec, torch_device, started, asked, *, bands, resolution, bounds, bounds_crs, aoi, src_nodata,
         rpc_dem, tile_size, overlap, batch_size, cog, compress, quality, allow_ungeoreferenced, progress, resume,
         backend, precision, ctx) -> TranslateResult:
    opened: list = []
    _agree(ctx, lambda: opened.append(_open_checked(src, bands, resolution, spec, allow_ungeoreferenced,
                                                    tile_size, overlap, bounds, bounds_crs, aoi, src_nodata,
                                                    rpc_dem)))
    scene, grid, cache = opened[0]
    try:
        # rasterio takes GDAL_CACHEMAX in bytes (a bare 32 would be a 32-byte cache, i.e. none).
        with rasterio.Env(GDAL_CACHEMAX=cache):
            return _stream_scene(scene, grid, src, dst, net, spec, torch_device, started, asked, resolution=resolution,
                                 tile_size=tile_size, overlap=overlap, batch_size=batch_size, cog=cog,
                                 compress=compress, quality=quality,
                                 progress=progress, resume=resume, backend=backend, precision=precision, ctx=ctx)
    finally:
        scene.close()


def _stream_scene(scene, grid, src, dst, net, spec, torch_device, started, asked, *, resolution, tile_size, overlap,
                  batch_size, cog, compress, quality, progress, resume, backend, precision,
                  ctx) -> TranslateResult:
    """The main rank reads, infers, blends and writes; a helper rank (torchrun) computes and sends rows."""
    tta = tta_of(net)
    record_file = progress_record.record_path(dst)
    kept_rows, computed_before = 0, 0
    if resume:  # the interrupted run's engine again: backends differ in the last float bit (no resume in torchrun)
        record = progress_record.load(record_file, partial_path(dst), dst)
        recorded = record.get("options", {}).get("backend")
        if recorded:
            backend, precision = engine_choice(recorded)
    calibration = _calibration_tiles(scene, grid) if precision == "int8" else None
    engine = _engine_on_every_rank(ctx, lambda: make_engine(
        net, torch_device, backend, precision, in_channels=spec.in_channels, tile=tile_size,
        batch_size=batch_size, tiles=len(grid), calibration=calibration))
    if ctx.enabled and not ctx.is_main:  # a helper rank: compute its rows, send them, write nothing
        computed = sharded.send_rows(ctx, grid, _row_reader(scene, grid), engine, batch_size)
        return TranslateResult(dst, scene.width, scene.height, len(grid), computed,
                               time.perf_counter() - started, scene.gsd_m, str(torch_device), engine.name,
                               scene.notes, batch_size, tta)
    c = scene.crop
    options = {"resolution": resolution, "tile_size": tile_size, "overlap": overlap, "bands": scene.bands,
               "cog": cog, "compress": compress, "quality": quality, "backend": engine.name, "tta": recorded_tta(tta),
               "crop": [int(c.col_off), int(c.row_off), int(c.width), int(c.height)],
               "aoi": None if scene.aoi is None else area.digest(scene.aoi),
               "src_nodata": None if scene.src_nodata is None else repr(float(scene.src_nodata)),  # NaN as text
               "rpc_dem": scene.rpc_dem}
    digest = model_digest(net.generator if tta else net)  # the weights the record and the map's tags name
    ident = progress_record.identity(src, options, digest)
    if resume:
        progress_record.check(record, ident, dst)
        kept_rows, computed_before = record["rows"], record["computed"]
    first_row = first_row_after(grid, kept_rows)
    computed_in_row = [0] * len(grid.ys)

    def tile_done() -> None:
        if progress:
            progress(1, len(grid))

    def keep(rows: int) -> None:
        """Record that the partial file holds ``rows`` rows (tile rows above them are finished)."""
        done = computed_before + sum(computed_in_row[first_row : first_row_after(grid, rows)])
        progress_record.save(record_file, ident, rows, done)

    tags = provenance_tags(src, scene, digest, engine.name, tile_size, overlap, tta and tta_text(tta), asked)
    with _record_follows_partial(record_file, partial_path(dst)), \
            GeoTIFFWriter(dst, scene.width, scene.height, scene.crs, scene.transform, cog=cog, compress=compress,
                          quality=quality, resume_rows=kept_rows, parallel=engine.asynchronous, tags=tags,
                          checkpoint=None if ctx.enabled else keep, put_rows=tile_size) as writer:
        on_device = not ctx.enabled and _blend_on_device(engine, grid)
        blender = None if on_device else RowBlender(grid, writer, first_row, track_valid=not scene.always_valid)
        if not resume and record_file.exists():  # under the writer's lock, before its first checkpoint
            record_file.unlink()
            scene.notes.append("an interrupted run's partial output was replaced (--resume continues one)")
        if progress and first_row:
            progress(first_row * len(grid.xs), len(grid))
        try:
            if ctx.enabled:
                for row, payload in sharded.gather_rows(ctx, grid, _row_reader(scene, grid), engine, batch_size):
                    computed_in_row[row] = sharded.blend_row(grid, row, payload, blender, tile_done)
            elif on_device:
                _stream_on_device(scene, grid, first_row, batch_size, engine, writer, tile_done, computed_in_row)
            else:
                _stream(scene, grid, first_row, batch_size, engine, blender, tile_done, computed_in_row)
            computed = computed_before + sum(computed_in_row[first_row:])
            if computed == 0:
                raise InputError(f"{src} has no valid pixels: everything is nodata")
            if blender is not None:
                blender.release()  # the overviews are built next: no blending buffers held meanwhile
            writer.commit()
            record_file.unlink(missing_ok=True)
        except KeyboardInterrupt:  # while the tiles were computed, or while the map was finished
            if writer.committed:  # its progress record goes with the partial file (_record_follows_partial)
                raise Interrupted(f"{dst} was finished before the stop: the map is whole") from None
            rows = writer.keep_partial()
            if not rows:
                raise
            try:
                keep(rows)
            except OSError as exc:  # a full disk: the rows cannot be vouched for, so none are kept
                writer.drop_partial()
                raise KeyboardInterrupt(f"keeping the {rows} rows done failed ({exc.strerror or exc}): "
                                        "nothing to resume") from None
            again = "the same command with --resume" + (" in one process (not under torchrun)" if ctx.enabled else "")
            if rows < scene.height:
                raise Interrupted(f"{rows} of {scene.height} rows are kept; {again} continues") from None
            raise Interrupted(f"all {rows} rows are kept; {again} finishes the map") from None
    return TranslateResult(dst, scene.width, scene.height, len(grid), computed,
                           time.perf_counter() - started, scene.gsd_m, str(torch_device), engine.name, scene.notes,
                           batch_size, tta)


@contextmanager
def _record_follows_partial(record_file: Path, partial: Path) -> Iterator[None]:
    """On any failure, once the writer has cleaned up: a progress record whose partial file is
    gone goes too (one kept for --resume stays, with its record). A checkpoint may have written
    the record long before the failure."""
    try:
        yield
    except BaseException:
        if not partial.exists():
            record_file.unlink(missing_ok=True)
        raise


def _blend_on_device(engine: Engine, grid: TileGrid) -> bool:
    """Whether tiles are cut and blended on the GPU (see device_rows): PyTorch on CUDA, and a scene
    at least a tile wide and high."""
    return isinstance(engine, InferenceEngine) and engine.asynchronous and device_rows.fits(grid)


def _stream_on_device(scene, grid, first_row, batch_size, engine, writer, tile_done, computed_in_row) -> None:
    """The GPU path: whole tile rows to the device, finished rows from it to the writer."""
    blender = device_rows.DeviceRowBlender(grid, engine, batch_size, len(scene.bands), scene.dtype,
                                           track_valid=not scene.always_valid)

    def row_done(row: int, tiles: int) -> None:
        computed_in_row[row] = tiles
        for _ in grid.xs:
            tile_done()

    device_rows.stream_rows(scene, grid, first_row, blender, writer.write_rows, row_done)


def _stream(scene, grid, first_row, batch_size, engine, blender, tile_done, computed_in_row) -> None:
    """Read, infer and blend every tile from ``first_row`` on, in batches; counts tiles run per row.

    An asynchronous engine (CUDA; here only for scenes smaller than a tile, larger ones are
    blended on the device) gets the next batch before the previous one is blended. A CPU engine's
    batch is blended at once: holding one back gains nothing there and cost ONNX Runtime 30-50 MB
    more peak memory. (Reading the batches ahead on a thread was measured slower on 2 cores, for
    the CPU engines and for a model that takes no time alike; see docs/performance.md.)
    """
    lag = 1 if engine.asynchronous else 0
    in_flight: deque = deque()
    for pending, tiles in _batches(scene, grid, first_row, batch_size):
        in_flight.append((pending, engine.submit(tiles) if tiles is not None else None))
        while len(in_flight) > lag:
            _finish(in_flight.popleft(), blender, tile_done, computed_in_row)
    while in_flight:
        _finish(in_flight.popleft(), blender, tile_done, computed_in_row)
