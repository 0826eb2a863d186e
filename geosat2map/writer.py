"""Writing the map GeoTIFF: tiled, compressed, RGB (or one band of classes), masked, with overviews,
published atomically.

Pixels arrive as rectangles within the two block rows being filled (or as whole rows); they are
written in whole block rows so GDAL never has to re-read and re-compress a half-filled block,
on one background thread so compression (GDAL releases the GIL) overlaps the model's compute.
The file is built under a temporary name beside the destination and renamed over it only when
complete, so an interrupted run never leaves a half-written file at the destination.

An interrupted run (Ctrl-C, SIGTERM) can leave its partial file for ``translate --resume``:
:meth:`GeoTIFFWriter.keep_partial` closes it with every whole block row written so far, and a
resumed writer copies those rows into a fresh file (same creation options, same block order)
before taking new ones. A run killed outright (SIGKILL, the OOM killer, a lost machine) gets no
chance to close it, and GDAL writes a TIFF's block index only when the file is closed; so every
:data:`CHECKPOINT_SECONDS` the writer closes the file, syncs it to disk and reopens it to go on,
and the caller records the rows it holds. Blocks written after that land past the index and are
ignored on resume. The partial names are fixed per destination, so a lock file keeps two runs
from writing the same destination at once.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError  # no public alias
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from .errors import OutputError, gdal_reason

BLOCK = 256
#: How often a writer with a checkpoint callback makes its partial file resumable after a kill.
#: Closing and reopening costs milliseconds (the block index of a 16384 x 16384 map is 32 KB).
CHECKPOINT_SECONDS = 60.0


def block_row_buffers(put_rows: int) -> int:
    """How many block-row buffers a :class:`GeoTIFFWriter` given rectangles up to ``put_rows`` rows
    tall keeps: those one rectangle can span, filled at once, and one more being written."""
    return (BLOCK + max(put_rows, 1) - 2) // BLOCK + 2


#: ZSTD level 1: on map-like rasters about as small as the default level 9 and 5-7x faster to write.
ZSTD_LEVEL = 1
#: Masks are written inside the TIFF (QGIS reads them as transparency), not as .msk sidecars;
#: overviews are compressed at the base's ZSTD level (GDAL's default for them is 9, which made
#: building them twice as slow for files 2 % smaller).
GDAL_ENV = {"GDAL_TIFF_INTERNAL_MASK": True, "ZSTD_LEVEL_OVERVIEW": ZSTD_LEVEL}
#: Lossless compressions (with the horizontal predictor): ZSTD at level 1, the default, is quick to
#: write; DEFLATE made the NAIP sample's map 7 % smaller (3.91 against 4.21 MB), and it and LZW are
#: read by tools built without ZSTD (GDAL before 2.3, older ArcGIS).
LOSSLESS = ("zstd", "deflate", "lzw")
#: Lossy ones, for basemaps where file size matters more than exact colours: JPEG (in YCbCr, as
#: GDAL's own JPEG GeoTIFFs) and WebP.
LOSSY = ("jpeg", "webp")
COMPRESSIONS = LOSSLESS + LOSSY
#: JPEG and WebP quality unless asked. At GDAL's default, 75, JPEG moved 1.45 % of the NAIP sample
#: map's pixels by more than 5 levels (WebP 1.97 %); at 90, 0.69 % (0.67 %), for twice the bytes.
DEFAULT_QUALITY = 90


#: Endings a GeoTIFF output's name may have: any other would name a GeoTIFF as another format
#: (``map.png`` opened by an image viewer, ``map.jp2`` by a JPEG 2000 reader).
GEOTIFF_SUFFIXES = (".tif", ".tiff")
#: Each kind of output and the endings its name may have (``check_destination``'s ``kind``).
GEOTIFF = ("the map is a GeoTIFF", GEOTIFF_SUFFIXES)
PNG = ("the preview is a PNG", (".png",))
VRT = ("the mosaic is a GDAL VRT", (".vrt",))
ONNX = ("the model is an ONNX file", (".onnx",))
WEIGHTS = ("weights are a safetensors file", (".safetensors",))


def check_destination(dst: Path, src: Path | None, overwrite: bool,
                      kind: tuple[str, tuple[str, ...]] | None = None) -> None:
    """Refuse, before any work, outputs that would lose data or cannot be written, and a name that
    says another format than ``kind``'s (:data:`GEOTIFF`, :data:`PNG`...): a file is opened by
    what its ending names."""
    if src is not None and dst.exists() and src.exists() and os.path.samefile(src, dst):  # links included
        raise OutputError(f"the output {dst} is the input; choose another path")
    if dst.is_dir():
        example = f", e.g. {dst / (src.stem + kind[1][0])}" if src is not None and kind is not None else ""
        raise OutputError(f"the output {dst} is a folder: name a file in it{example}")
    if kind is not None and dst.suffix.lower() not in kind[1]:
        raise OutputError(f"{kind[0]}: name it {' or '.join(kind[1])}, not {dst.name}")
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst} exists (pass --overwrite to replace it)")
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"the output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {folder} is not writable")


def partial_path(dst: Path) -> Path:
    """The temporary file a run builds (and an interrupted run leaves) beside ``dst``."""
    return dst.with_name(f".{dst.name}.part.tif")


def check_compression(compress: str, quality: int | None) -> None:
    """Refuse, before any work, a compression GDAL is not asked for here or a quality it ignores."""
    if compress not in COMPRESSIONS:
        raise OutputError(f"unknown compression {compress!r} (use {', '.join(COMPRESSIONS)})")
    if quality is not None and compress not in LOSSY:
        raise OutputError(f"a quality is for lossy compression ({' or '.join(LOSSY)}), not {compress}")
    if quality is not None and not 1 <= quality <= 100:
        raise OutputError(f"the quality must be 1 to 100, not {quality}")


def compression_options(compress: str, quality: int | None, cog: bool = False) -> dict:
    """The creation options of ``compress`` for GDAL's GTiff driver, or (``cog``) its COG driver,
    whose option names differ (LEVEL and QUALITY; it picks YCbCr for RGB JPEG itself)."""
    if compress in LOSSLESS:
        options = {"compress": compress, "predictor": 2}
        if compress == "zstd":
            options["level" if cog else "zstd_level"] = ZSTD_LEVEL
        return options
    quality = DEFAULT_QUALITY if quality is None else quality
    if cog:
        return {"compress": compress, "quality": quality}
    if compress == "jpeg":
        return {"compress": "jpeg", "photometric": "YCbCr", "jpeg_quality": quality}
    return {"compress": "webp", "webp_level": quality}


def software_tags() -> dict[str, str]:
    """The TIFF tags naming the program and the time that wrote a file."""
    from . import __version__

    return {"TIFFTAG_SOFTWARE": f"geosat2map {__version__}", "TIFFTAG_DATETIME": time.strftime("%Y:%m:%d %H:%M:%S")}


def overview_factors(width: int, height: int, smallest: int = BLOCK) -> list[int]:
    """Powers of two until the overview fits in one block."""
    factors, f = [], 2
    while max(width, height) / f >= smallest / 2 and max(width, height) > smallest:
        factors.append(f)
        f *= 2
    return factors


#: What a failed GDAL write reaches Python as: rasterio's errors, the OS's, or a CPLE_* error where
#: a driver fails on close or inside a copy (libpng's "Write Error", the COG driver's).
GDAL_WRITE_ERRORS = (RasterioError, CPLE_BaseError, OSError)


def _open(path: Path, mode: str = "r", **options) -> rasterio.io.DatasetWriter:
    """``rasterio.open``, quiet about a file without georeferencing: such an output was asked for
    (translate --allow-ungeoreferenced, classify on a picture), and rasterio's warning at each
    open reached the user's terminal as two lines of its source."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, mode, **options)


def blocks_written(path: Path, rows: int | None = None) -> bool:
    """Whether every block of ``path``'s pixels (those that hold its first ``rows`` rows; None:
    all) lies whole inside the file.

    GDAL writes the blocks its cache still holds, and the directory, when a GeoTIFF is closed, and
    rasterio raises none of their failures: on a full disk a small map was left truncated and
    reported written. The block index says so at once (2-3 us a block, 10 ms at 16384 x 16384)."""
    size = path.stat().st_size
    with _open(path) as ds:
        block_h, block_w = ds.block_shapes[0]
        for j in range(math.ceil((ds.height if rows is None else rows) / block_h)):
            for i in range(math.ceil(ds.width / block_w)):
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{i}_{j}", "TIFF", bidx=1)
                length = ds.get_tag_item(f"BLOCK_SIZE_{i}_{j}", "TIFF", bidx=1)
                if not (offset and length and int(offset) > 0 and int(offset) + int(length) <= size):
                    return False
    return True


class GeoTIFFWriter:
    """Context manager: ``write_rows`` in order, then ``commit``; leaving without commit removes everything."""

    def __init__(
        self,
        dst: str | Path,
        width: int,
        height: int,
        crs,
        transform: Affine,
        cog: bool = False,
        compress: str = "zstd",
        quality: int | None = None,
        resume_rows: int = 0,
        parallel: bool = False,
        tags: dict[str, str] | None = None,
        checkpoint: Callable[[int], None] | None = None,
        colormap: dict[int, tuple[int, ...]] | None = None,
        nodata: int | None = None,
        put_rows: int = BLOCK,
    ) -> None:
        """``compress``: one of :data:`COMPRESSIONS`; ``quality`` (1-100, for JPEG and WebP):
        :data:`DEFAULT_QUALITY` unless given. ``resume_rows``: continue the partial file of an
        interrupted run, whose first ``resume_rows`` rows are kept; rows given to
        :meth:`write_rows` above them are ignored.
        ``parallel``: GDAL compresses the blocks of each block row on every core (when the model
        runs on a GPU and the cores are free), not on the writer thread alone. ``tags``: dataset
        metadata (GDAL's default domain, which gdalinfo and QGIS's layer information show), with
        :func:`software_tags` added. ``checkpoint(rows)``: called when the partial file on disk
        holds its first ``rows`` rows intact (after a resumed run's copy, then every
        :data:`CHECKPOINT_SECONDS`), to record them for a resume after a kill. ``colormap``: one
        paletted band of class values with these colours (its overviews the most frequent class,
        never an average of two), instead of RGB; lossless compression only. ``nodata``: the
        band's nodata value, for such a band: QGIS 3.22 shows a one-band raster with a mask as two
        bands (the mask as alpha) and then draws it as RGB, not in its colours. ``put_rows``: the
        tallest rectangle :meth:`put` or :meth:`write_rows` is given (a tile row's finished rows:
        up to the tile size), which sets how many block rows are filled at once."""
        self.dst = Path(dst)
        self.width, self.height = width, height
        self.cog = cog
        check_compression(compress, quality)
        if colormap is not None and compress not in LOSSLESS:
            raise OutputError(f"class values are compressed losslessly ({', '.join(LOSSLESS)}), not with {compress}")
        self.colormap = colormap
        self.bands = 3 if colormap is None else 1
        self.overview_resampling = Resampling.average if colormap is None else Resampling.mode
        self.compress, self.quality = compress, quality
        self.copied_at_commit = cog or compress in LOSSY
        self.tmp = partial_path(self.dst)
        self.final_tmp = self.dst.with_name(f".{self.dst.name}.final.tif")  # a COG, JPEG or WebP copy
        self.prev = self.dst.with_name(f".{self.dst.name}.part.prev.tif")
        self.lock_path = self.dst.with_name(f".{self.dst.name}.lock")
        self.resume_rows = resume_rows
        self.tags = {**software_tags(), **(tags or {})}
        self._lock: int | None = None
        self._keep = False
        self._finishing = False  # commit has begun: the rows are all written
        #: The finished map is at ``dst``: a stop after this point interrupted nothing of it.
        self.committed = False
        self.profile = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": self.bands,
            "dtype": "uint8",
            "crs": crs,
            "transform": transform,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "photometric": "RGB" if colormap is None else "palette",
            "interleave": "pixel",
            "BIGTIFF": "IF_SAFER",
            "nodata": nodata,
            # A COG, and a JPEG or WebP map, is built in ZSTD and copied in its own compression at the
            # end: JPEG or WebP is then lossy once, and a resumed run copies kept rows losslessly.
            **compression_options(*(("zstd", None) if self.copied_at_commit else (compress, quality))),
        }
        self._open_options = {"num_threads": "ALL_CPUS"} if parallel else {}
        self.profile.update(self._open_options)
        self.checkpoint = checkpoint
        self._checkpointed = time.monotonic()
        self._recorded = resume_rows  # rows the last checkpoint recorded
        self._env = rasterio.Env(**GDAL_ENV)
        self._ds = None
        # Block-row buffers, block row k in buffer k % len: those a rectangle of put_rows rows can
        # span (two for 256-pixel tiles, three for 512) are being filled (the blender puts its
        # finished rectangles there, in any order) while the writer thread writes one more. With
        # none spare, a tile row's rectangles reached the buffer just handed on at every other
        # block row, and the main thread waited out that whole write (16 waits of 30-50 ms at
        # 8192 x 8192, a core idle in each).
        # Contiguous, not row-padded: rasterio copies a strided array before writing it (12.9 MB
        # more per block row at 16384 pixels wide).
        rows = min(BLOCK, height)
        self._pixels = [np.zeros((self.bands, rows, width), np.uint8) for _ in range(block_row_buffers(put_rows))]
        # The mask buffers are made at the first invalid pixel, and the mask band is created then:
        # a scene valid everywhere gets no mask, which spares writing it and halves the time GDAL
        # takes to build the overviews.
        self._masks: list[np.ndarray] | None = None
        self._holds: list[int | None] = [None] * len(self._pixels)  # block row in each buffer
        self._futures: list[Future | None] = [None] * len(self._pixels)  # its write, once handed on
        self._next_block = -(-resume_rows // BLOCK)  # first block row not yet handed to the thread
        self._received = resume_rows  # rows given to write_rows so far
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geotiff-writer")
        self._has_mask = False

    def __enter__(self) -> GeoTIFFWriter:
        self._take_lock()
        self._env.__enter__()
        try:
            # A resume killed during its copy left the kept rows in .prev and a torn copy in .tmp;
            # a run that starts afresh drops such leftovers (a later resume would copy them).
            if not self.resume_rows:
                self.prev.unlink(missing_ok=True)
            elif not self.prev.exists():
                os.replace(self.tmp, self.prev)
            self._ds = _open(self.tmp, "w", **self.profile)
            if self.colormap is None:
                self._ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            else:
                self._ds.write_colormap(1, self.colormap)
            self._ds.update_tags(**self.tags)
            if self.resume_rows:
                self._copy_previous()
        except BaseException as exc:
            self._restore_previous()
            self.__exit__(None, None, None)
            if isinstance(exc, (RasterioIOError, OSError)):
                raise OutputError(f"cannot create {self.tmp}: {exc}") from None
            raise
        return self

    def _restore_previous(self) -> None:
        """A resumed run that fails (or is interrupted) before its copy is done keeps the old partial."""
        if self.prev.exists():
            if self._ds is not None and not self._ds.closed:
                self._ds.close()
            os.replace(self.prev, self.tmp)
            self._keep = True

    def _take_lock(self) -> None:
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another geosat2map run is writing {self.dst}") from None
        except OSError:  # a file system without locks (some NFS, SMB and FUSE mounts): write unguarded
            os.close(fd)
            self.lock_path.unlink(missing_ok=True)
            return
        self._lock = fd

    def _copy_previous(self) -> None:
        """Copy the kept rows of the interrupted run's file, block row by block row."""
        with _open(self.prev) as prev:
            if (prev.width, prev.height, prev.count) != (self.width, self.height, self.bands):
                raise OutputError(f"the partial file {self.prev} does not fit this run")
            for top in range(0, self.resume_rows, BLOCK):
                window = Window(0, top, self.width, min(BLOCK, self.resume_rows - top))
                try:
                    self._write(window, prev.read(window=window), prev.read_masks(1, window=window))
                except RasterioIOError as exc:
                    raise OutputError(f"the partial file {self.prev} is unreadable: {exc}") from None
        self._make_resumable()  # before the only other copy of the kept rows goes
        self.prev.unlink()

    @property
    def rows_written(self) -> int:
        """Rows handed to the writer thread (whole block rows, or all)."""
        return min(self._next_block * BLOCK, self.height)

    def write_rows(self, top: int, pixels: np.ndarray, valid: np.ndarray | None) -> None:
        """Take whole rows ``top .. top + h``, in order (rows an interrupted run kept are skipped)."""
        end = top + pixels.shape[1]
        if end <= self.resume_rows:
            return
        if max(top, self.resume_rows) != self._received:
            raise ValueError(f"rows must arrive in order: got {top}, expected {self._received}")
        self._received = end
        self.put(top, 0, pixels, valid)
        self.advance(end)

    def put(self, top: int, left: int, pixels: np.ndarray, valid: np.ndarray | None) -> None:
        """Place a rectangle at row ``top``, column ``left``, anywhere in the block rows being
        filled (those after the last one handed on); :meth:`advance` hands them on once whole.

        ``pixels`` (bands, h, w) are cast straight into the uint8 block buffer: uint8, or any numeric
        type in [0, 256), whose integer part is kept; ``valid`` is the bool mask, None if all valid.
        """
        if top < self.resume_rows:  # rows the interrupted run wrote already
            skip = min(self.resume_rows - top, pixels.shape[1])
            top, pixels = top + skip, pixels[:, skip:]
            valid = None if valid is None else valid[skip:]
        h, w = pixels.shape[1:]
        if not h:
            return
        filled = len(self._pixels) - 1  # the block rows one rectangle may span; the last buffer is being written
        if top // BLOCK < self._next_block or (top + h - 1) // BLOCK >= self._next_block + filled:
            raise ValueError(f"rows {top}..{top + h} are not in the {filled} block rows being filled")
        if self._masks is None and valid is not None and not valid.all():
            self._masks = [np.full(p.shape[1:], 255, np.uint8) for p in self._pixels]
        r = top
        while r < top + h:
            k = r // BLOCK
            end = min(top + h, (k + 1) * BLOCK)
            i = self._slot(k)
            rows, src = slice(r - k * BLOCK, end - k * BLOCK), slice(r - top, end - top)
            np.copyto(self._pixels[i][:, rows, left : left + w], pixels[:, src], casting="unsafe")
            if self._masks is not None:
                mask = self._masks[i][rows, left : left + w]
                if valid is None:
                    mask[:] = 255
                else:
                    np.multiply(valid[src], np.uint8(255), out=mask)
            r = end

    def _slot(self, k: int) -> int:
        """The buffer for block row ``k``, once the write of the block row it held has finished."""
        i = k % len(self._pixels)
        if self._holds[i] != k:
            self._wait(i)
            self._holds[i] = k
        return i

    def advance(self, end: int) -> None:
        """Every row above ``end`` has been put: hand each whole block row to the writer thread."""
        while self.rows_written < self.height and min((self._next_block + 1) * BLOCK, self.height) <= end:
            k = self._next_block
            i = self._slot(k)
            top = k * BLOCK
            n = min(BLOCK, self.height - top)
            mask = None if self._masks is None else self._masks[i][:n]
            self._futures[i] = self._pool.submit(self._write, Window(0, top, self.width, n),
                                                 self._pixels[i][:, :n], mask)
            self._next_block += 1
        if self.checkpoint and self._recorded < self.rows_written < self.height and \
                time.monotonic() - self._checkpointed >= CHECKPOINT_SECONDS:
            self._wait()
            self._make_resumable()

    def _make_resumable(self) -> None:
        """Close the partial file (GDAL writes its block index), sync it to disk, reopen it to go
        on writing, and report the rows it now holds. No write is in flight."""
        if self.checkpoint is None:
            return
        try:
            self._ds.close()
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._check_whole(self.rows_written)  # before the record says they are kept
            self._ds = _open(self.tmp, "r+", **self._open_options)
            self.checkpoint(self.rows_written)
        except (RasterioIOError, OSError) as exc:  # a full disk, for the file or the record
            raise OutputError(f"writing {self.dst} failed: {gdal_reason(exc)}") from None
        self._checkpointed, self._recorded = time.monotonic(), self.rows_written

    def _write(self, window: Window, pixels: np.ndarray, valid: np.ndarray | None) -> None:
        """Write one block row (``valid``: uint8 0/255, None if all valid); runs on the writer thread."""
        try:
            self._ds.write(pixels, window=window)
            if not self._has_mask and valid is not None and not valid.all():
                # The first invalid pixel: every row above is valid.
                for top in range(0, window.row_off, BLOCK):
                    rows = min(BLOCK, window.row_off - top)
                    all_valid = np.full((rows, self.width), 255, np.uint8)
                    self._ds.write_mask(all_valid, window=Window(0, top, self.width, rows))
                self._has_mask = True
            if self._has_mask:  # no mask buffer yet: a resumed run whose kept rows had invalid pixels
                self._ds.write_mask(np.full(pixels.shape[1:], 255, np.uint8) if valid is None else valid,
                                    window=window)
        except (RasterioIOError, OSError) as exc:
            raise OutputError(f"writing {self.dst} failed (disk full or over a file size limit?): "
                              f"{gdal_reason(exc)}") from None

    def _wait(self, i: int | None = None) -> None:
        """Wait for the write from buffer ``i`` (all if None) and raise its error."""
        for j in range(len(self._futures)) if i is None else (i,):
            future, self._futures[j] = self._futures[j], None
            if future is not None:
                future.result()

    def commit(self) -> None:
        """Finish the file (overviews, or the COG layout; a JPEG or WebP copy) and move it to the
        destination."""
        self._wait()
        if self.rows_written != self.height:
            raise ValueError(f"only {self.rows_written} of {self.height} rows were written")
        self._finishing = True
        self._pixels, self._masks = [], None  # not needed while the overviews are built
        renaming = None
        try:
            self._ds.close()
            self._check_whole()
            if self.cog:
                rasterio.shutil.copy(
                    self.tmp, self.final_tmp, driver="COG", blocksize=BLOCK,
                    overview_resampling=self.overview_resampling.name,
                    bigtiff="IF_SAFER", num_threads="ALL_CPUS",
                    **compression_options(self.compress, self.quality, cog=True),
                )
            else:
                factors = overview_factors(self.width, self.height)
                if factors:
                    # On the file reopened: built on the handle that wrote it, GDAL computed them on
                    # one thread (0.72-0.84 s at 8192 x 8192 against 0.54-0.68 s reopened).
                    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), _open(self.tmp, "r+") as ds:
                        ds.build_overviews(factors, self.overview_resampling)  # nothing else runs now
                        ds.update_tags(ns="rio_overview", resampling=self.overview_resampling.name)
                if self.copied_at_commit:  # JPEG or WebP: the pixels, mask and overviews encoded once
                    rasterio.shutil.copy(
                        self.tmp, self.final_tmp, driver="GTiff", tiled=True, blockxsize=BLOCK,
                        blockysize=BLOCK, interleave="pixel", bigtiff="IF_SAFER", num_threads="ALL_CPUS",
                        copy_src_overviews=True, **compression_options(self.compress, self.quality),
                    )
            renaming = self.final_tmp if self.cog or self.copied_at_commit else self.tmp
            os.replace(renaming, self.dst)
            self.committed = True
        except GDAL_WRITE_ERRORS as exc:
            raise OutputError(f"finishing {self.dst} failed: {gdal_reason(exc)}") from None
        except KeyboardInterrupt:
            if renaming is not None and not renaming.exists():  # stopped once the rename was done
                self.committed = True
                raise
            # Stopped while finishing (overviews, a COG or JPEG copy: minutes for a large map): every
            # row is in the partial file, kept if whole, for a resumed run to finish instead of
            # computing the map again. GDAL's calls run to their end before Python raises the
            # interrupt, so the file is closed and its overviews (if begun) built.
            self._keep = self._ds.closed and self._whole_on_disk()
            raise
        finally:
            self._cleanup()

    def _whole_on_disk(self) -> bool:
        """The partial file is there with every block whole (False where it cannot be read)."""
        try:
            return self.tmp.exists() and blocks_written(self.tmp)
        except (RasterioIOError, OSError):
            return False

    def _check_whole(self, rows: int | None = None) -> None:
        """After a close: the file's blocks (those of its first ``rows`` rows) are all on disk."""
        if not blocks_written(self.tmp, rows):
            raise OutputError(f"writing {self.dst} failed (disk full?): not every block reached the disk")

    def keep_partial(self) -> int:
        """After an interruption: close the partial file with its whole block rows and keep it
        (and the lock's release) for a resumed run; returns the rows it holds (0: nothing kept).
        Stopped in :meth:`commit`, that kept it if it was whole."""
        if self._finishing:
            return self.height if self._keep else 0
        try:
            self._wait()
        except OutputError:
            return 0
        self._keep = self.rows_written > 0
        return self.rows_written

    def drop_partial(self) -> None:
        """Undo :meth:`keep_partial` (its progress record could not be saved)."""
        self._keep = False

    def _cleanup(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._ds is not None and not self._ds.closed:
            self._ds.close()
        for p in (self.final_tmp, self.prev) if self._keep else (self.tmp, self.final_tmp, self.prev):
            p.unlink(missing_ok=True)
        if self._lock is not None:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cleanup()
        self._env.__exit__(exc_type, exc, tb)
