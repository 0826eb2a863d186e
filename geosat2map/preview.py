"""A PNG preview of a translation: the input scene beside the map, on the same footprint."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning

from .errors import InputError, OutputError, gdal_reason
from .provenance import recorded_options
from .reader import MIN_GDAL_CACHE, PNG_READ_OPTIONS, is_gdal_path, open_raster, open_scene
from .writer import GDAL_WRITE_ERRORS, PNG, check_destination


#: GDAL's block cache while the preview reads, bytes: the least (see side_by_side).
PREVIEW_GDAL_CACHE = MIN_GDAL_CACHE


def side_by_side(scene: str | Path, map_path: str | Path, png: str | Path, size: int = 512,
                 overwrite: bool = False) -> tuple[int, int]:
    """Write ``png``: the scene (left) and its map (right), each ``size`` pixels on the long side.

    Pixels outside the footprint are white. Returns the PNG's (height, width). The PNG is
    written beside ``png`` and renamed when whole, so a failure leaves nothing at ``png``.
    """
    png = Path(png)
    if size < 1:
        raise InputError(f"a preview panel is at least 1 pixel on its long side, not {size}")
    check_destination(png, None, overwrite, PNG)
    # Each source block is decoded once for the shrunk read, so GDAL's cache need not keep them: its
    # default (5 % of memory) let a 10000 x 10000 scene without overviews take 716 MB of RSS, 130 MB in 16 MiB.
    with rasterio.Env(GDAL_CACHEMAX=PREVIEW_GDAL_CACHE, **PNG_READ_OPTIONS):
        with open_raster(map_path) as dst:
            scale = size / max(dst.width, dst.height)
            h, w = max(1, round(dst.height * scale)), max(1, round(dst.width * scale))
            if dst.count < 3:
                raise InputError(f"{map_path} is not an RGB map")
            mapped = dst.read([1, 2, 3], out_shape=(3, h, w), resampling=Resampling.nearest)
            map_valid = dst.dataset_mask(out_shape=(h, w), resampling=Resampling.nearest) > 0
            # The scene under the map only: a map of part of it (--bounds, --aoi) beside the whole
            # scene would not line up. translate keeps the scene's CRS, so the box is in it.
            footprint = tuple(dst.bounds) if dst.crs is not None and not dst.transform.is_identity else None
            # A scene orthorectified over a DEM (translate --rpc-dem) is placed over it again, if
            # it is still there (else at the RPCs' mean height: a picture a few pixels off).
            rpc_dem = (recorded_options(dst.tags()) or {}).get("rpc_dem")
            if not isinstance(rpc_dem, str) or not (is_gdal_path(rpc_dem) or Path(rpc_dem).exists()):
                rpc_dem = None  # none recorded, gone, or the record edited into something else
        src = open_scene(scene, resolution="native", allow_ungeoreferenced=True, bounds=footprint, rpc_dem=rpc_dem)
        try:
            photo, photo_valid = src.read_decimated(h, w)
        finally:
            src.close()
    photo = np.clip(np.rint(photo), 0, 255).astype(np.uint8)
    photo[:, ~photo_valid] = 255
    mapped[:, ~map_valid] = 255
    gap = np.full((3, h, 8), 255, np.uint8)
    grid = np.concatenate([photo, gap, mapped], axis=2)
    tmp = png.with_name(f".{png.name}.part")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", driver="PNG", width=grid.shape[2], height=h, count=3, dtype="uint8") as out:
                out.write(grid)
        os.replace(tmp, png)
    except GDAL_WRITE_ERRORS as exc:  # GDAL's PNG driver writes the file on close
        raise OutputError(f"writing {png} failed (disk full?): {gdal_reason(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return h, grid.shape[2]

