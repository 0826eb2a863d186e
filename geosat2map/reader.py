"""Reading a scene window by window, on the grid the model wants.

:func:`open_scene` checks the input, picks the bands, works out the output grid (the scene's
footprint in its own CRS, at the model's ground sampling distance by default) and computes the
value scaling once for the whole scene. :meth:`Scene.read` then returns one window at a time as
0..255 pixels plus a validity mask, and :class:`RowBand` the rows a tile row needs. The output
grid keeps the scene's CRS and footprint and only scales the pixels, so resampling is a plain
GDAL read of the matching (fractional) source window into the output-sized buffer: GDAL's own
resampling, mask-aware and overview-aware, never ours. A WarpedVRT did the same job 20-300x slower
per tile (it re-warps for every read and again for the mask), which made reading, not the model,
the cost of translating at the model's resolution. Only a scene that is not north-up (a rotated
geotransform, ground control points, RPCs) is read through GDAL's warper (see
:mod:`geosat2map.placement`).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyproj import CRS, Geod, Transformer
from pyproj.exceptions import CRSError as PyprojCRSError, ProjError
from rasterio.enums import ColorInterp, Interleaving, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile
from rasterio.windows import Window, from_bounds

from . import aoi as area
from .buffers import row_buffer
from .errors import InputError, NotGeoreferenced, gdal_reason
from .placement import dem_name, placement, warp_north_up

#: Share of the darkest and brightest pixels clipped when stretching non-8-bit input to 0..255.
STRETCH_PERCENT = (2.0, 98.0)
#: Longest side of the decimated read used for scene statistics.
STATS_SIZE = 1024
#: Smallest side, in pixels at the working resolution, worth translating: below it nearly all of
#: the 256-pixel tile the model sees would be invented by padding.
MIN_SIDE = 8
#: Suggest building overviews when a scene this large (pixels, longest side) is shrunk this much:
#: GDAL then reads them instead (7.3 -> 1.0 ms per tile for a 0.5 m scene at 2.12 m).
OVERVIEW_HINT_SIDE = 8192
OVERVIEW_HINT_SCALE = 4
#: Output columns of one strip of a resampled read (see Scene.readers). Fixed, not sized to the
#: cores: GDAL's resampling rounds a little differently for a window that starts elsewhere (at
#: most one level, here and there), so the strips must not depend on the machine for the map not to.
STRIP = 256
#: The option of GDAL's ``vrt://`` connection string that opens a paletted raster as its colours.
EXPAND = "expand"
#: Most the model's resolution may be finer than the scene's when translate picks it: beyond this
#: the scene is blown up into a huge raster of detail it does not have (a 30 m Landsat scene at
#: the maps model's 2.12 m: 200 times the pixels). An explicit --resolution is taken as asked.
MAX_UPSAMPLE = 8
#: Most an explicit --resolution may be finer than the scene's: past it each scene pixel becomes
#: over 4 096 map pixels, a slip of units or digits (0.001 for 1 m) rather than a wish, and the
#: run would write for days (a 300 m scene at 0.001 m: 300 000 x 300 000 pixels).
MAX_EXPLICIT_UPSAMPLE = 64
#: A scene placed north-up by GDAL's warper (:mod:`geosat2map.placement`) and shrunk at least this
#: much is warped nearest-neighbour: the average of the output's resampled read then hides its steps.
#: A 4096 x 4096 scene at 0.5 m turned 20 degrees, read at 2.12 m: 3.4 s through a bilinear warp,
#: 0.4 s through a nearest one (translate: 5.2-5.6 s, then 1.5-1.8 s). A scene read as it is, or
#: shrunk less, gets bilinear.
WARP_NEAREST_SCALE = 2.0


#: Bounds of GDAL's block cache, bytes; within them it is sized to what the reads share (see bounded_cache).
MIN_GDAL_CACHE = 16 * 2**20
MAX_GDAL_CACHE = 1 * 2**30


def bounded_cache(need: int) -> int:
    """GDAL's block cache (GDAL_CACHEMAX, bytes) for reads that share ``need`` bytes of decoded
    blocks, with a tenth to spare, instead of GDAL's default of 5 % of memory, which reads that go
    row by row only fill (10000 x 10000: translate, tiles and evaluate --map peaked at 1-1.7 GB).
    At least :data:`MIN_GDAL_CACHE`; at most 1 GiB and a quarter of the memory available, so a
    very wide scene shrunk many times over without overviews decodes some blocks twice rather
    than running out of memory."""
    cap = MAX_GDAL_CACHE
    free = available_memory()
    if free is not None:
        cap = min(cap, free // 4)
    return max(MIN_GDAL_CACHE, min(cap, int(1.1 * need)))


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


@dataclass
class Scene:
    """An open input scene and the grid it is read on (``width`` x ``height`` at ``transform``)."""

    path: Path | str  # a str when GDAL reads it remotely or from an archive (is_gdal_path)
    src: rasterio.io.DatasetReader
    bands: list[int]
    width: int
    height: int
    transform: Affine
    crs: rasterio.crs.CRS | None
    gsd_m: float | None
    #: The source pixels the output grid covers: the whole scene, or what ``bounds`` selected.
    crop: Window
    stretch: tuple[np.ndarray, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)
    #: Source pixels per output pixel along x and y (None: native grid) and how to resample.
    scale: tuple[float, float] | None = None
    resampling: Resampling = Resampling.nearest
    #: No nodata value, mask or alpha band: every pixel is valid, no mask to read (a resampled mask
    #: read costs GDAL 1-2 ms per tile even when it is all 255).
    all_valid: bool = False
    #: GDAL configuration options in force while the scene is read (see :func:`_remote_options`).
    gdal_options: dict = field(default_factory=dict)
    #: The nodata value that replaces the scene's own (its handles open with it: :func:`open_raster`).
    src_nodata: float | None = None
    #: The DEM the scene's RPCs were projected onto (:func:`~geosat2map.placement.placement`).
    rpc_dem: str | None = None
    #: Threads (each with its own dataset handle) that read the strips of a resampled read. GDAL
    #: decodes and averages a resampled read on one thread (GDAL_NUM_THREADS parallelises only
    #: native multi-block reads): on 2 cores, a 0.5 m scene's row bands at 2.12 m took 0.47-0.50 s
    #: on two threads against 0.57-0.69 s on one (8192 x 8192, four rounds), and a GPU is fed by
    #: these reads. Remote scenes: one (see :func:`open_raster`).
    readers: int = 1
    #: The scene's own file when ``src`` is its north-up warp (:mod:`geosat2map.placement`), closed
    #: with it.
    warped_from: rasterio.io.DatasetReader | None = field(default=None, repr=False)
    #: The area of interest in the scene's CRS (``translate --aoi``): pixels outside it are nodata;
    #: and where it was read from (FILE or FILE:LAYER).
    aoi: shapely.Geometry | None = None
    aoi_source: str | None = None
    _handles: list = field(default_factory=list, repr=False)  # the dataset handles of readers 1..
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def always_valid(self) -> bool:
        """Every pixel read is valid: no mask, no float NaN or infinity to mask (scaled inputs), no
        area of interest."""
        return self.all_valid and self.stretch is None and self.aoi is None

    @property
    def dtype(self) -> type:
        """What :meth:`read` can return losslessly: uint8 for 8-bit input on its own grid, else
        float32 (resampled values fall between integers; other inputs are scaled)."""
        return np.uint8 if self.stretch is None and self.scale is None else np.float32

    def read(self, window: Window, dtype: type = np.float32,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of ``window`` as (bands, h, w) 0..255 and a bool validity mask (read-only when
        every pixel is valid); ``dtype`` float32, or uint8 when :attr:`dtype` says so; ``out``:
        an array (or view) of that dtype and shape to read into instead of a new one."""
        if dtype is np.uint8 and self.dtype is not np.uint8:
            raise ValueError("resampled or scaled input reads as float32")
        shape = (int(window.height), int(window.width))
        with reading(self.path), self._gdal_env():
            data, valid = self._read_source(window, shape, dtype, out)
        if self.aoi is not None:
            at = self.transform @ Affine.translation(window.col_off, window.row_off)
            valid = valid & area.inside(self.aoi, at, shape)
        return self._scale(data, valid)

    def _gdal_env(self):
        """The scene's GDAL options in force (nothing to enter for a local scene: an empty
        rasterio.Env still costs about 60 us)."""
        return rasterio.Env(**self.gdal_options) if self.gdal_options else nullcontext()

    def _read_source(self, window: Window, shape: tuple[int, int], dtype: type,
                     out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The source pixels and validity of ``window`` on the output grid, unscaled; a resampled
        read is read in strips of :data:`STRIP` columns, by :attr:`readers` threads."""
        if self.scale is None:
            window = Window(self.crop.col_off + window.col_off, self.crop.row_off + window.row_off, window.width,
                            window.height)
            data = self.src.read(self.bands, window=window, out_dtype=dtype, out=out)
            valid = self._all_valid(shape) if self.all_valid else self.src.dataset_mask(window=window) > 0
            return data, valid
        # Strips at fixed output columns; each reader reads a run of neighbouring ones, so a block two
        # strips share is decoded once unless two readers share it.
        start, end = int(window.col_off), int(window.col_off) + shape[1]
        edges = [start, *range((start // STRIP + 1) * STRIP, end, STRIP), end]
        if out is None:
            out = np.empty((len(self.bands), *shape), dtype)
        valid = None if self.all_valid else np.empty(shape, bool)
        strips = len(edges) - 1
        n = min(self.readers, strips)
        runs = [round(i * strips / n) for i in range(n + 1)]  # reader i reads strips runs[i] .. runs[i + 1]
        handles = [self.src, *self._reader_handles(n - 1)]

        def read_run(i: int) -> None:
            for a, b in zip(edges[runs[i] : runs[i + 1]], edges[runs[i] + 1 : runs[i + 1] + 1]):
                cols = slice(a - start, b - start)
                part = Window(a, window.row_off, b - a, shape[0])
                _, v = self._read_resampled(handles[i], part, (shape[0], b - a), dtype, out[:, :, cols])
                if valid is not None:
                    valid[:, cols] = v

        futures = [self._pool.submit(read_run, i) for i in range(1, n)]
        try:
            read_run(0)
        finally:
            wait(futures)  # none may still write into ``out`` once this returns or raises
        for f in futures:
            f.result()
        return out, self._all_valid(shape) if valid is None else valid

    def _read_resampled(self, src: rasterio.io.DatasetReader, window: Window, shape: tuple[int, int], dtype: type,
                        out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One resampled read of ``window`` (output grid) through the handle ``src``."""
        sx, sy = self.scale
        x, y = window.col_off * sx, window.row_off * sy
        # The last tiles end at the crop's edge: keep float rounding from stepping past it.
        source = Window(self.crop.col_off + x, self.crop.row_off + y, min(window.width * sx, self.crop.width - x),
                        min(window.height * sy, self.crop.height - y))
        size = {"out": out} if out is not None else {"out_shape": (len(self.bands), *shape)}
        data = src.read(self.bands, window=source, resampling=self.resampling, out_dtype=dtype, **size)
        valid = (self._all_valid(shape) if self.all_valid else
                 src.dataset_mask(window=source, out_shape=shape, resampling=Resampling.nearest) > 0)
        return data, valid

    def _reader_handles(self, n: int) -> list[rasterio.io.DatasetReader]:
        """``n`` more handles on the scene and a thread for each, opened at the first read that needs them."""
        if n and len(self._handles) < n:
            self._handles += [open_raster(self.path, nodata=self.src_nodata) for _ in range(n - len(self._handles))]
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="scene-reader")
        return self._handles[:n]

    def _all_valid(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask of a scene with no mask: an all-True view of one element, or a writable array
        when scaling may still mask NaN and infinity."""
        return np.broadcast_to(np.True_, shape) if self.stretch is None else np.ones(shape, bool)

    def cache_bytes(self, tile: int) -> int:
        """Bytes of decoded source blocks GDAL's block cache must hold so that each block is decoded
        once for all bands, and the block row shared with the next tile row is still there for it."""
        block_h, block_w = self.src.block_shapes[0]
        itemsize = max(np.dtype(d).itemsize for d in self.src.dtypes)
        span = min(self.src.width, int(self.crop.width) + 2 * block_w)  # the blocks a read across the crop touches
        span += (self.readers - 1) * block_w  # a block two readers share is decoded by both
        block_row = block_h * span * self.src.count * itemsize
        if self.scale is None and self.src.interleaving is not Interleaving.band and self.warped_from is None:
            # Native reads of a pixel-interleaved (or one-band) file need only the block row they
            # share with the next read kept (16384 x 2048 scenes, 3 and 4 bands: 0.22-0.32 s with
            # 1.1 block rows, 0.19-0.34 s with 2.2, 0.35-0.61 s with 0.3-0.4). Resampled reads need
            # the blocks of the whole window: half of that doubled their time (3.1-4.0 s vs 1.3-1.9).
            return block_row
        rows = tile * (self.scale[1] if self.scale else 1)
        need = (math.ceil(rows / block_h) + 1) * block_row
        if self.warped_from is not None:
            # A warped block evicted between the pixel read and the mask read, or before the next
            # tile row, is warped again, which costs far more than decoding: keep all the warped
            # blocks of a window, and the scene's own blocks under them. A row of warped blocks
            # lies on a slanted strip of the scene's file: about three of its block rows' worth at
            # any slant (a block row deep in each column), a fourth for the strip below.
            base = self.warped_from
            base_h = base.block_shapes[0][0]
            need += 4 * base_h * base.width * base.count * max(np.dtype(d).itemsize for d in base.dtypes)
        return need

    def read_decimated(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole scene resampled to ``height`` x ``width`` (for previews), scaled like :meth:`read`."""
        shape = (height, width)
        with reading(self.path), self._gdal_env():
            data = self.src.read(self.bands, window=self.crop, out_shape=(len(self.bands), *shape),
                                 out_dtype="float32", resampling=Resampling.bilinear)
        return self._scale(data, self.valid_decimated(height, width))

    def valid_decimated(self, height: int, width: int) -> np.ndarray:
        """The scene's mask (its nodata value, alpha band or mask band; not a float scene's NaN)
        sampled on a ``height`` x ``width`` grid over it (nearest: each cell's centre pixel)."""
        with reading(self.path), self._gdal_env():
            return self.src.dataset_mask(window=self.crop, out_shape=(height, width),
                                         resampling=Resampling.nearest) > 0

    def _scale(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.stretch is not None:  # in place: ``data`` may be the caller's buffer
            valid &= np.isfinite(data).all(axis=0)
            lo, hi = self.stretch
            data -= lo[:, None, None]
            data *= (255.0 / (hi - lo))[:, None, None]
            np.clip(data, 0.0, 255.0, out=data)
            data[:, ~valid] = 0.0
        return data, valid

    def check_readable(self) -> None:
        """Read the scene's first and last pixel: a file whose data GDAL cannot decode (a header
        declaring more pixels than the file holds, a download cut short) fails here, with GDAL's
        reason, before a model is prepared for it (on a first run, auto's ONNX export and timing:
        13.5 s of the 17.0 s a 375-byte file declaring 200 000 x 200 000 pixels took before) rather
        than at its first or last tile."""
        for col, row in ((0, 0), (self.width - 1, self.height - 1)):
            self.read(Window(col, row, 1, 1))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for handle in (self.src, *self._handles):
            handle.close()
        if self.warped_from is not None:
            self.warped_from.close()

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RowBand:
    """The output rows one tile row needs, read across the whole scene at once.

    Rows the previous tile row also needed are kept, so every output row is read, and resampled,
    once however much the tiles overlap: reading tile by tile resampled each 64-pixel overlap again
    for every tile sharing it (1.8x the pixels at 256/64), most of the cost of translating at the
    model's resolution. Memory: one tile row of the scene's width, as uint8 when the input is 8-bit
    and read on its own grid.
    """

    def __init__(self, scene: Scene, rows: int) -> None:
        self.scene = scene
        self.pixels = row_buffer((len(scene.bands), rows, scene.width), scene.dtype)
        # A scene valid everywhere needs no mask rows: a read-only all-True view stands for them.
        self.valid = (np.broadcast_to(np.True_, (rows, scene.width)) if scene.always_valid
                      else row_buffer((rows, scene.width), bool))
        self.top = self.end = 0  # scene rows held

    def rows(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``top .. bottom`` (moving down the scene), as views valid until the next call."""
        keep = self.end - top if self.top <= top < self.end else 0
        fixed = self.scene.always_valid  # the mask is the all-True view
        if keep:  # move the shared rows up, read only the new ones below them
            self.pixels[:, :keep] = self.pixels[:, top - self.top : self.end - self.top]
            if not fixed:
                self.valid[:keep] = self.valid[top - self.top : self.end - self.top]
        n = bottom - top
        if n > keep:
            window = Window(0, top + keep, self.scene.width, n - keep)
            _, valid = self.scene.read(window, self.scene.dtype, out=self.pixels[:, keep:n])
            if not fixed:
                self.valid[keep:n] = valid
        self.top, self.end = top, bottom
        return self.pixels[:, :n], self.valid[:n]


#: A GDAL driver's prefix, as in ``GPKG:tiles.gpkg:table``, ``NETCDF:"scene.nc":band`` or
#: ``SENTINEL2_L2A:.../MTD_MSIL2A.xml:10m:EPSG_32632``; two characters at least, so that a Windows
#: drive (``C:``) is not one.
_DRIVER_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_]+:")


def is_gdal_path(path: str | Path) -> bool:
    """Whether ``path`` is a raster address GDAL reads other than as a local file: a remote one
    (:func:`is_remote`) or a driver's subdataset (:func:`is_subdataset`). Such an address must
    stay a string: ``Path`` would fold a URL's ``//``."""
    return is_remote(path) or is_subdataset(path)


def is_subdataset(path: str | Path) -> bool:
    """A driver's part of a local file: ``GPKG:tiles.gpkg:table``, ``NETCDF:...``,
    ``SENTINEL2_L2A:...`` (a local file of that name goes first)."""
    text = str(path)
    return not is_remote(text) and _DRIVER_PREFIX.match(text) is not None and not Path(text).exists()


def is_remote(path: str | Path) -> bool:
    """A URL (https://, s3://, gs://, az://, and rasterio's zip+https:// or zip:// forms) or a /vsi
    path (/vsizip/, /vsicurl/ ...): read on one thread, with no folder listing (see
    :func:`open_raster`, :func:`_remote_options`)."""
    text = str(path)
    return "://" in text or text.startswith("/vsi")


def scene_path(path: str | Path) -> Path | str:
    """``path`` as a scene is addressed: a ``Path`` for a local file, the string itself for an
    address GDAL reads otherwise (:func:`is_gdal_path`)."""
    return path if is_gdal_path(path) else Path(path)


def scene_name(path: str | Path) -> str:
    """The file name in ``path``, URLs included (their query string left out); for a driver's
    subdataset, the file's name and what follows it (``GPKG:/data/tiles.gpkg:table`` ->
    ``tiles.gpkg:table``)."""
    text = str(path)
    if "://" in text:
        text = urlsplit(text).path
    elif is_subdataset(text):
        text = text[_DRIVER_PREFIX.match(text).end():].replace('"', "")
    return PurePosixPath(text).name


def reader_threads() -> int:
    """Threads a resampled read may use: this process's cores, shared with the other torchrun
    ranks on the machine (LOCAL_WORLD_SIZE), which read their own rows at the same time."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, len(os.sched_getaffinity(0)) // max(1, ranks))


def check_input(path: Path | str) -> None:
    """Refuse a local input that is missing or a folder (an address GDAL reads is checked when
    opened). The command line calls it before loading the model, so a mistyped path is answered
    at once, not after the second importing torch takes."""
    if is_gdal_path(path):
        return
    if not Path(path).exists():
        raise InputError(f"input not found: {path}")
    if Path(path).is_dir():
        pattern = str(Path(path) / "*.tif")
        raise InputError(f"input is a folder, not a raster: {path} (for the scenes in it, pass '{pattern}')")


def open_raster(path: Path | str, expand_palette: bool = True,
                nodata: float | None = None) -> rasterio.io.DatasetReader:
    """``path`` opened by GDAL, or an :class:`InputError` that says why not in one line; a
    paletted raster in its colours unless ``expand_palette`` is false (for a description of the
    file itself, as a mosaic's source); with ``nodata``, that value as every band's nodata (see
    :func:`_with_nodata`)."""
    remote = is_remote(path)
    check_input(path)
    # GDAL_NUM_THREADS at open: the GTiff driver then decodes the blocks of a multi-block read
    # (a row band spans the scene's width) on every core. Reads run between model calls, when
    # the cores are otherwise idle: sixteen 16384 x 256 native reads took 0.37-0.43 s opened so
    # against 0.51-0.55 s without, on 2 cores. Not for a remote scene: GDAL 3.10 then fetches the
    # blocks by parallel range requests that are not retried (OSGeo/gdal#12933), and a block
    # refused with a 503 came back as wrong pixels with no error (tests/test_remote.py).
    threads = {} if remote else {"GDAL_NUM_THREADS": "ALL_CPUS"}
    try:
        with warnings.catch_warnings(), rasterio.Env(**threads):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path) if nodata is None else _with_nodata(path, rasterio.open(path), nodata)
            return _colours(path, src) if expand_palette else src
    except RasterioIOError as exc:
        if is_gdal_path(path):  # not found, refused, not a raster, no such table: GDAL's reason says which
            raise InputError(f"cannot open {path}: {gdal_reason(exc)}") from None
        raise InputError(f"{path} is not a raster GDAL can read") from None


def _with_nodata(path: Path | str, src: rasterio.io.DatasetReader, nodata: float) -> rasterio.io.DatasetReader:
    """``src`` reopened with ``nodata`` as every band's nodata value, in place of its own nodata,
    alpha or mask (GDAL's ``vrt://...?a_nodata=``, as ``gdal_translate -a_nodata``): for a scene
    whose empty border or collar the file does not mark. A pixel is then nodata where every band
    holds the value (GDAL's dataset mask); in a paletted raster, where the index is that value."""
    misfit = next((t for t in src.dtypes if not rasterio.dtypes.in_dtype_range(nodata, t)), None)
    if misfit is not None:
        src.close()
        raise InputError(f"nodata {nodata:g} is outside the range of {path}'s {misfit} values")
    return _translated(path, src, f"a_nodata={nodata!r}")


def _colours(path: Path | str, src: rasterio.io.DatasetReader) -> rasterio.io.DatasetReader:
    """``src``, or for a one-band paletted raster the same raster through GDAL's palette expansion
    (``vrt://...?expand=``, as ``gdal_translate -expand``): its colours, as QGIS shows it, never
    its indices, which no resampling or warp may average. With an alpha band (``rgba``) where the
    raster has a nodata index or see-through colours: the three colour bands alone lose them
    (GDAL paints a nodata index black and marks nothing)."""
    if src.count != 1 or src.colorinterp[0] is not ColorInterp.palette:
        return src
    see_through = src.nodata is not None or any(entry[3] < 255 for entry in src.colormap(1).values())
    return _translated(path, src, f"{EXPAND}={'rgba' if see_through else 'rgb'}")


def _translated(path: Path | str, src: rasterio.io.DatasetReader, option: str) -> rasterio.io.DatasetReader:
    """``src`` (closed) opened again as GDAL's ``vrt://NAME?OPTION`` (a ``gdal_translate`` option
    applied on the fly). GDAL's connection string takes one '?': where ``src`` is such a view
    already (a paletted scene's nodata index, then its colours), it is described as a VRT file in
    memory and that is opened; the opened VRT no longer needs the file."""
    name = src.name
    try:
        if "?" not in name:
            return rasterio.open(f"vrt://{name}?{option}")
        if not name.startswith("vrt://"):
            raise InputError(f"{path} has a '?' in its name, which GDAL's vrt:// options cannot follow: rename it")
        with MemoryFile(ext=".vrt") as described:
            rasterio.shutil.copy(src, described.name, driver="VRT")
            return rasterio.open(f"vrt://{described.name}?{option}")
    finally:
        src.close()


def _expansion(src: rasterio.io.DatasetReader) -> str | None:
    """How :func:`open_raster` expanded ``src``'s palette: ``"rgb"``, ``"rgba"``, or None."""
    found = re.search(rf"[?&]{EXPAND}=(rgba?)$", src.name) if src.name.startswith("vrt://") else None
    return found.group(1) if found else None


def default_bands(src: rasterio.io.DatasetReader) -> list[int]:
    """Red, green, blue by colour interpretation; else bands 1-3; one or two bands: band 1 as grey."""
    interp = list(src.colorinterp)
    wanted = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in interp for c in wanted):
        return [interp.index(c) + 1 for c in wanted]
    if src.count >= 3:
        return [1, 2, 3]
    return [1, 1, 1]


def ground_pixel_size(crs, transform: Affine, width: int, height: int) -> tuple[float, float]:
    """Metres on the ground spanned by one pixel along x and along y, at the scene centre.

    Geodesic, so degrees (EPSG:4326) and Web Mercator's scale factor come out right. A CRS with
    no link to the Earth (a local site grid, as drone surveys and CAD plans use) is measured in its
    own linear units.
    """
    try:
        to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    except ProjError:
        return _local_pixel_size(crs, transform)
    cx, cy = width / 2, height / 2
    pts = [transform @ (cx, cy), transform @ (cx + 1, cy), transform @ (cx, cy + 1)]
    lon, lat = to_lonlat.transform([p[0] for p in pts], [p[1] for p in pts])
    geod = Geod(ellps="WGS84")
    dx = geod.inv(lon[0], lat[0], lon[1], lat[1])[2]
    dy = geod.inv(lon[0], lat[0], lon[2], lat[2])[2]
    if not (math.isfinite(dx) and math.isfinite(dy)):
        raise InputError(f"the scene's coordinates do not lie within its CRS ({crs}): its pixels cannot be "
                         "measured on the ground; pass --resolution native")
    return dx, dy


def _local_pixel_size(crs, transform: Affine) -> tuple[float, float]:
    """Pixel size in a local (engineering) CRS, which cannot be placed on the Earth, from its axes' units."""
    local = CRS.from_user_input(crs)
    factors = [a.unit_conversion_factor for a in local.axis_info[:2]]  # to metres
    if not local.is_engineering or len(factors) < 2 or not all(factors):
        raise InputError(f"the scene's CRS cannot be placed on the Earth and its axes have no linear unit ({crs}): "
                         "its pixels cannot be measured on the ground; pass --resolution native")
    return math.hypot(transform.a, transform.d) * factors[0], math.hypot(transform.b, transform.e) * factors[1]


def oblong(ground: tuple[float, float]) -> bool:
    """Whether pixels of these ground sides (:func:`ground_pixel_size`) differ by more than a tenth,
    which translate and tiles say at native resolution: the model learned square ones (a degree
    pixel at 26 degrees north is 0.9 as wide as tall)."""
    return not math.isclose(*ground, rel_tol=0.1)


def _stretch(src, bands: list[int], crop: Window,
             aoi: shapely.Geometry | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-band 2-98 % percentiles over the part of the scene translated (``crop``, and inside
    ``aoi`` when given: the ground outside the polygons is never mapped, so a bright quarry or a
    cloud beside them must not darken the map), from one decimated read (computed once)."""
    factor = max(1, math.ceil(max(crop.width, crop.height) / STATS_SIZE))
    shape = (len(bands), max(1, int(crop.height) // factor), max(1, int(crop.width) // factor))
    data = src.read(bands, window=crop, out_shape=shape, out_dtype="float64", resampling=Resampling.nearest)
    valid = src.dataset_mask(window=crop, out_shape=shape[1:], resampling=Resampling.nearest) > 0
    valid &= np.isfinite(data).all(axis=0)
    if not valid.any():
        raise InputError(f"{src.name} has no valid pixels (everything is nodata or not finite)")
    if aoi is not None:  # a sliver thinner than the decimated pixels keeps its box's statistics
        sampled = src.window_transform(crop) @ Affine.scale(crop.width / shape[2], crop.height / shape[1])
        inside = valid & area.inside(aoi, sampled, shape[1:])
        valid = inside if inside.any() else valid
    lo = np.array([np.percentile(b[valid], STRETCH_PERCENT[0]) for b in data], dtype=np.float32)
    hi = np.array([np.percentile(b[valid], STRETCH_PERCENT[1]) for b in data], dtype=np.float32)
    hi = np.where(hi > lo, hi, lo + 1)
    return lo, hi


def open_scene(
    path: str | Path,
    bands: list[int] | None = None,
    resolution: str | float = "model",
    model_gsd_m: float | None = None,
    allow_ungeoreferenced: bool = False,
    bounds: tuple[float, float, float, float] | None = None,
    bounds_crs: str | None = None,
    aoi: area.AreaOfInterest | None = None,
    src_nodata: float | None = None,
    rpc_dem: str | Path | None = None,
) -> Scene:
    """Open ``path`` (a file, or any address GDAL reads: see :func:`is_gdal_path`) for windowed
    reading on the output grid.

    ``resolution``: ``"model"`` resamples to ``model_gsd_m`` (native when the model does not
    say), ``"native"`` keeps the scene's pixels, a number is metres per pixel. ``bounds`` (left,
    bottom, right, top, in the scene's CRS or in ``bounds_crs``) keeps only the source pixels
    that cover them: the output grid is theirs. ``aoi`` (instead of ``bounds``): the source pixels
    under its bounding box, those outside its polygons read as nodata. ``src_nodata``: a value
    that marks nodata in every band, in place of the scene's own nodata, alpha or mask.
    ``rpc_dem``: a raster of heights to orthorectify a scene georeferenced by RPCs over (see
    :func:`~geosat2map.placement.placement`).
    """
    path = scene_path(path)
    options = _remote_options(path)
    with rasterio.Env(**options):  # GDAL looks for side-car files while the scene is planned
        src = open_raster(path, nodata=src_nodata)
        expanded = _expansion(src)
        base = None  # the scene's own file, when src is its north-up warp
        try:
            where = placement(path, src, allow_ungeoreferenced, rpc_dem)
            if where is not None:  # planned on a cheap warp, read through the one that suits the plan
                base, src = src, warp_north_up(path, src, where, Resampling.nearest)
            scene = _plan(path, src, bands, resolution, model_gsd_m, allow_ungeoreferenced, bounds, bounds_crs,
                          None if where is None else where[1], aoi)
            if where is not None and (scene.scale is None or min(scene.scale) < WARP_NEAREST_SCALE):
                scene.src = warp_north_up(path, base, where, Resampling.bilinear)
                src.close()
        except BaseException:
            src.close()
            if base is not None:
                base.close()
            raise
    if (base or scene.src).driver == "PNG":
        options = {**options, **PNG_READ_OPTIONS}
    scene.gdal_options, scene.src_nodata = options, src_nodata
    scene.rpc_dem = None if rpc_dem is None else dem_name(rpc_dem)
    scene.warped_from = base
    if src_nodata is not None:
        scene.notes.append(f"pixels of value {src_nodata:g} in every band read as nodata (--src-nodata), in place "
                           "of the scene's own nodata or mask")
    if expanded:
        scene.notes.insert(0, f"paletted: read in its colour table's colours (GDAL's expand={expanded})")
    return scene


@contextmanager
def reading(path: Path | str) -> Iterator[None]:
    """GDAL's failure to read ``path``'s pixels in the block as an :class:`InputError` naming it: a
    truncated or corrupt file opens (GDAL reads its header) and fails only at a read."""
    try:
        yield
    except RasterioIOError as exc:
        raise InputError(f"reading {path} failed: {gdal_reason(exc)}") from None


#: GDAL's options while a PNG is read. GDAL 3.10's fast whole-image PNG decoding gives a PNG cut
#: short (its last 1 % missing, or more) as its compressed bytes with no error, every row of it
#: noise, and read enlarged (a preview of a small image) as zeros. Its row-by-row decoding reports
#: the cut. That doubles the time to decode a PNG (18.5 against 9.6 ms for a 1200 x 600 one here);
#: other formats ignore it.
PNG_READ_OPTIONS = {"GDAL_PNG_WHOLE_IMAGE_OPTIM": "NO"}


def _remote_options(path: Path | str) -> dict:
    """GDAL options for a remote scene: ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``, no listing of
    its folder (on object storage, of the whole prefix) and no requests for side-car files
    (.aux.xml, .msk, .ovr: eleven round trips otherwise), as titiler and rio-tiler set for COGs;
    unless the user set it in the environment (say, to use external .ovr overviews)."""
    if not is_remote(path) or "GDAL_DISABLE_READDIR_ON_OPEN" in os.environ:
        return {}
    return {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def _crop_window(path: Path | str, src: rasterio.io.DatasetReader, bounds: tuple[float, float, float, float],
                 bounds_crs: str | None, what: str = "the bounds") -> tuple[Window, bool]:
    """The whole source pixels that cover ``bounds`` within the scene, and whether the bounds
    reach past it; ``what`` names the bounds in the error when none are inside."""
    if len(bounds) != 4:
        raise InputError(f"bounds are four numbers, left bottom right top, not {bounds}")
    left, bottom, right, top = bounds
    if not (left < right and bottom < top):
        raise InputError(f"bounds are left bottom right top, with left < right and bottom < top, not {bounds}")
    if bounds_crs is not None:
        try:
            to_scene = Transformer.from_crs(bounds_crs, src.crs, always_xy=True)
        except PyprojCRSError:  # a kind of ProjError: caught first
            raise InputError(f"unknown CRS for the bounds: {bounds_crs}") from None
        except ProjError:
            raise InputError(f"the bounds cannot be carried from {bounds_crs} into the scene's CRS") from None
        # Densified: the box's edges curve in the scene's CRS, and all of it must be covered.
        left, bottom, right, top = to_scene.transform_bounds(*bounds, densify_pts=21)
        if not all(map(math.isfinite, (left, bottom, right, top))):
            raise InputError(f"the bounds cannot be carried from {bounds_crs} into the scene's CRS")
    w = from_bounds(left, bottom, right, top, transform=src.transform)
    eps = 1e-6  # a bound on a pixel edge, give or take float rounding, takes no extra pixel
    cover = (math.floor(w.col_off + eps), math.floor(w.row_off + eps),
             math.ceil(w.col_off + w.width - eps), math.ceil(w.row_off + w.height - eps))
    col0, row0 = max(0, cover[0]), max(0, cover[1])
    col1, row1 = min(src.width, cover[2]), min(src.height, cover[3])
    if col1 <= col0 or row1 <= row0:
        raise InputError(f"{what} and {path} do not overlap: nothing to translate")
    return Window(col0, row0, col1 - col0, row1 - row0), (col0, row0, col1, row1) != cover


def _check_size(path: Path | str, width: int, height: int, gsd_m: float | None, native_fits: bool = False) -> None:
    """Refuse a grid too small for the model; ``native_fits``: the scene's own pixels would do."""
    if min(width, height) < MIN_SIDE:
        at = f" at {gsd_m:.2f} m/pixel" if gsd_m else ""
        hint = " (at --resolution native it would fit)" if native_fits else ""
        raise InputError(f"{path} is only {width} x {height} pixels{at}; translate needs at least {MIN_SIDE} x "
                         f"{MIN_SIDE}{hint}")


def _rgb_bands(path, src, bands: list[int] | None, notes: list[str]) -> list[int]:
    """The three bands read as red, green and blue: ``bands`` as given (one band as grey), else
    by the file's colour interpretation; bands it lacks, or complex values, are refused."""
    if not bands:
        bands = default_bands(src)
        if src.count > 3 and bands == [1, 2, 3] and ColorInterp.red not in src.colorinterp:
            # NAIP's order, but an 8-band WorldView or a Sentinel-2 stack starts with coastal blue.
            notes.append(f"bands 1, 2, 3 of {src.count} read as red, green, blue (the file does not say which "
                         "are): pass --bands to choose others")
    bad = [b for b in bands if not 1 <= b <= src.count]
    if bad:
        raise InputError(f"{path} has {src.count} band(s); cannot read band(s) {bad}")
    if any(src.dtypes[b - 1].startswith("complex") for b in bands):  # GDAL would hand over the real parts
        raise InputError(f"{path} holds complex values (radar, or a Fourier transform), not the optical "
                         "imagery the model reads")
    return bands * 3 if len(bands) == 1 else bands


def _target_gsd(path, resolution, model_gsd_m: float | None, native: float | None, size: tuple[int, int],
                notes: list[str]) -> float | None:
    """The ground sampling distance to resample the scene to, in metres, or None for its own
    pixels: ``resolution`` is "model", "native" or metres. A scene that would grow past all reason
    at it (a 300 m mosaic at the model's 2.12 m: 100,000 pixels a side) is refused with the way out."""
    cols, rows = size
    if resolution == "native":
        return None
    if resolution == "model":
        if model_gsd_m is None:
            notes.append("the model records no ground sampling distance: native resolution used")
            return None
        if native is None:
            notes.append("the scene has no georeferencing: native resolution used")
            return None
        target = model_gsd_m
        if native / target > MAX_UPSAMPLE:
            side = f"{round(cols * native / target):,} x {round(rows * native / target):,}"
            raise InputError(f"{path} has {native:.3g} m pixels, {native / target:.0f} times coarser than the "
                             f"model's {target:.2f} m: at the model's resolution it would be {side} pixels; "
                             "pass --resolution native, or metres per pixel, to use it anyway")
        return target
    try:
        target = float(resolution)
    except (TypeError, ValueError):
        raise InputError(f"resolution is 'model', 'native' or metres per pixel, not {resolution!r}") from None
    if not target > 0:
        raise InputError(f"resolution must be positive metres, not {resolution}")
    if native is None:
        raise InputError("a resolution in metres needs a georeferenced scene")
    if native / target > MAX_EXPLICIT_UPSAMPLE:
        side = f"{round(cols * native / target):,} x {round(rows * native / target):,}"
        raise InputError(f"--resolution {target:g} m is {native / target:.0f} times finer than {path}'s "
                         f"{native:.3g} m pixels: the map would be {side} pixels; pass a coarser resolution")
    return target


def _plan(path, src, bands, resolution, model_gsd_m, allow_ungeoreferenced, bounds, bounds_crs,
          warped: str | None, aoi: area.AreaOfInterest | None = None) -> Scene:
    """The output grid and reading plan for ``src``: the scene, or its north-up warp (``warped``
    says from what)."""
    if src.width < 1 or src.height < 1:
        raise InputError(f"{path} is empty ({src.width} x {src.height})")
    georeferenced = src.crs is not None and not src.transform.is_identity
    if not georeferenced and not allow_ungeoreferenced:
        raise NotGeoreferenced(f"{path} has no georeferencing (pass --allow-ungeoreferenced to translate it in pixel "
                               "space)")
    if (bounds is not None or aoi is not None) and not georeferenced:
        raise InputError(f"{path} has no georeferencing: {'bounds' if aoi is None else 'an area of interest'} "
                         "cannot be placed on it")
    if bounds is not None and aoi is not None:
        raise InputError("give bounds or an area of interest, not both")
    notes: list[str] = []
    if warped is not None:
        notes.append(f"placed north-up by GDAL's warper from {warped}")
    # An area of interest is cut like bounds: its polygons' box, in the scene's CRS.
    aoi_here, aoi_source = (None, None) if aoi is None else (aoi.in_crs(src.crs), aoi.source)
    if aoi_here is not None:
        bounds, bounds_crs = aoi_here.bounds, None
    what = "the bounds" if aoi is None else "the area of interest"
    crop, clipped = (Window(0, 0, src.width, src.height), False) if bounds is None else \
        _crop_window(path, src, bounds, bounds_crs, what)
    if clipped:
        notes.append(f"{what} reach{'' if aoi is None else 'es'} past the scene: the map covers only the part "
                     "inside them")
    # From here on the scene is its crop: these pixels, at this place.
    cols, rows, t = int(crop.width), int(crop.height), src.window_transform(crop)
    bands = _rgb_bands(path, src, bands, notes)
    stretch = None if all(src.dtypes[b - 1] == "uint8" for b in bands) else _stretch(src, bands, crop, aoi_here)
    if stretch is not None:  # say what the map's colours were computed from
        kinds = "/".join(sorted({src.dtypes[b - 1] for b in bands}))
        ranges = ", ".join(f"{b}: {lo:.6g}-{hi:.6g}" for b, lo, hi in dict.fromkeys(zip(bands, *stretch)))
        notes.append(f"{kinds} input stretched to 0-255 per band, its darkest {STRETCH_PERCENT[0]:g} % and brightest "
                     f"{100 - STRETCH_PERCENT[1]:g} % clipped (band {ranges})")

    all_valid = all(flags == [MaskFlags.all_valid] for flags in src.mask_flag_enums)
    try:
        ground = ground_pixel_size(src.crs, t, cols, rows) if georeferenced else None
    except InputError:  # no ground resolution: fine as long as nothing is resampled to one
        if (resolution == "model" and model_gsd_m is not None) or resolution not in ("model", "native"):
            raise
        ground = None
    native = math.sqrt(ground[0] * ground[1]) if ground else None
    target = _target_gsd(path, resolution, model_gsd_m, native, (cols, rows), notes)
    if target is None or all(math.isclose(target, g, rel_tol=1e-3) for g in ground):
        if ground and oblong(ground):
            also = " (or model)" if model_gsd_m is not None else ""  # a model without one keeps these pixels
            notes.append(f"the scene's pixels are {ground[0]:.3g} x {ground[1]:.3g} m on the ground: at its own pixels "
                         f"the model sees the ground stretched one way; a resolution in metres{also} resamples "
                         "it to square ones")
        _check_size(path, cols, rows, native)
        return Scene(path, src, bands, cols, rows, t, src.crs, native, crop, stretch, notes,
                     all_valid=all_valid, aoi=aoi_here, aoi_source=aoi_source)

    # Same CRS and footprint, pixels scaled so one covers `target` metres on the ground along each
    # axis: square on the ground, as the model learned, though not in the CRS where a pixel's sides
    # differ on the ground (degrees away from the equator: at 49 degrees north, 0.66 as wide as tall).
    scale = target / native
    width = max(1, round(cols * ground[0] / target))
    height = max(1, round(rows * ground[1] / target))
    _check_size(path, width, height, target, native_fits=min(cols, rows) >= MIN_SIDE)
    transform = Affine(t.a * cols / width, 0, t.c, 0, t.e * rows / height, t.f)
    method = Resampling.average if scale > 1 else Resampling.bilinear
    large = max(cols, rows) >= OVERVIEW_HINT_SIDE
    if large and scale >= OVERVIEW_HINT_SCALE and not src.overviews(bands[0]):
        name = scene_name(path)
        notes.append(f"each output pixel is read from about {scale * scale:.0f} source pixels and {name} has no "
                     f"overviews; `gdaladdo -r average {name} 2 4 8` once makes reading it several times faster")
    # A warp is read on one thread: the readers' own handles would open the unwarped file.
    one = is_remote(path) or warped is not None
    readers = 1 if one else max(1, min(reader_threads(), math.ceil(width / STRIP)))
    gsd = math.sqrt(ground[0] * cols / width * ground[1] * rows / height)
    return Scene(path, src, bands, width, height, transform, src.crs, gsd, crop, stretch,
                 notes, scale=(cols / width, rows / height), resampling=method, all_valid=all_valid, readers=readers,
                 aoi=aoi_here, aoi_source=aoi_source)
