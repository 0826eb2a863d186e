"""Writing the map GeoTIFF: tiled, compressed, RGB, masked, with overviews, published atomically.

Rows arrive in bands of arbitrary height; they are written in whole block rows so GDAL never
has to re-read and re-compress a half-filled block. The file is built under a temporary name
beside the destination and renamed over it only when complete, so an interrupted run never
leaves a half-written file at the destination.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from .errors import OutputError

BLOCK = 256
#: GDAL settings for writing: internal masks (QGIS reads them as transparency), a bounded cache.
GDAL_ENV = {"GDAL_TIFF_INTERNAL_MASK": True, "GDAL_CACHEMAX": 256}


def check_destination(dst: Path, src: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, outputs that would lose data or cannot be written."""
    if src is not None and dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise OutputError(f"the output {dst} is the input; choose another path")
    if src is not None and dst.resolve() == src.resolve():
        raise OutputError(f"the output {dst} is the input; choose another path")
    if dst.is_dir():
        raise OutputError(f"the output {dst} is a folder")
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst} exists (pass --overwrite to replace it)")
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"the output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {folder} is not writable")


def overview_factors(width: int, height: int, smallest: int = BLOCK) -> list[int]:
    """Powers of two until the overview fits in one block."""
    factors, f = [], 2
    while max(width, height) / f >= smallest / 2 and max(width, height) > smallest:
        factors.append(f)
        f *= 2
    return factors


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
    ) -> None:
        self.dst = Path(dst)
        self.width, self.height = width, height
        self.cog = cog
        self.compress = compress
        self.tmp = self.dst.with_name(f".{self.dst.name}.{os.getpid()}.part.tif")
        self.cog_tmp = self.dst.with_name(f".{self.dst.name}.{os.getpid()}.cog.tif")
        self.profile = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": 3,
            "dtype": "uint8",
            "crs": crs,
            "transform": transform,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": compress,
            "predictor": 2,
            "photometric": "RGB",
            "interleave": "pixel",
            "BIGTIFF": "IF_SAFER",
        }
        self._env = rasterio.Env(**GDAL_ENV)
        self._ds = None
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._next_row = 0

    def __enter__(self) -> "GeoTIFFWriter":
        self._env.__enter__()
        try:
            self._ds = rasterio.open(self.tmp, "w", **self.profile)
        except (RasterioIOError, OSError) as exc:
            self._env.__exit__(None, None, None)
            raise OutputError(f"cannot create {self.tmp}: {exc}") from None
        self._ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        return self

    def write_rows(self, top: int, pixels: np.ndarray, valid: np.ndarray) -> None:
        """Queue rows ``top .. top + h`` (they must follow the previous ones); write full block rows."""
        if top != self._next_row + self._pending_rows:
            raise ValueError(f"rows must arrive in order: got {top}, expected {self._next_row + self._pending_rows}")
        self._pending.append((pixels, valid))
        self._pending_rows += pixels.shape[1]
        last = self._next_row + self._pending_rows >= self.height
        if self._pending_rows >= BLOCK or last:
            self._drain(last)

    def _drain(self, last: bool) -> None:
        pixels = np.concatenate([p for p, _ in self._pending], axis=1)
        valid = np.concatenate([v for _, v in self._pending], axis=0)
        n = pixels.shape[1] if last else (pixels.shape[1] // BLOCK) * BLOCK
        window = Window(0, self._next_row, self.width, n)
        try:
            self._ds.write(pixels[:, :n], window=window)
            self._ds.write_mask(np.where(valid[:n], 255, 0).astype(np.uint8), window=window)
        except (RasterioIOError, OSError) as exc:
            raise OutputError(f"writing {self.dst} failed: {exc}") from None
        self._next_row += n
        self._pending = [(pixels[:, n:], valid[n:])] if n < pixels.shape[1] else []
        self._pending_rows = pixels.shape[1] - n

    def commit(self) -> None:
        """Finish the file (overviews, or the COG layout) and move it to the destination."""
        if self._next_row != self.height:
            raise ValueError(f"only {self._next_row} of {self.height} rows were written")
        try:
            if self.cog:
                self._ds.close()
                rasterio.shutil.copy(
                    self.tmp, self.cog_tmp, driver="COG", compress=self.compress, predictor=2,
                    blocksize=BLOCK, overview_resampling="average", bigtiff="IF_SAFER",
                )
                os.replace(self.cog_tmp, self.dst)
            else:
                factors = overview_factors(self.width, self.height)
                if factors:
                    self._ds.build_overviews(factors, Resampling.average)
                    self._ds.update_tags(ns="rio_overview", resampling="average")
                self._ds.close()
                os.replace(self.tmp, self.dst)
        except (RasterioIOError, OSError) as exc:
            raise OutputError(f"finishing {self.dst} failed: {exc}") from None
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._ds is not None and not self._ds.closed:
            self._ds.close()
        for p in (self.tmp, self.cog_tmp):
            p.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cleanup()
        self._env.__exit__(exc_type, exc, tb)
