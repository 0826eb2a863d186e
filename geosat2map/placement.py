"""Placing a raster north-up on the Earth: what georeferences it when it is not a north-up
geotransform (a rotated, sheared or flipped one, ground control points, RPCs, RPCs over a DEM),
and GDAL's warper to put it north-up, for scenes (:func:`~geosat2map.reader.open_scene`) and for
map rasters warped onto a scene's grid (``tiles --map``, ``evaluate --map``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import rasterio
from affine import Affine
from pyproj import CRS
from rasterio._err import CPLE_BaseError  # what GDAL's warper raises through rasterio (no public alias)
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform

from .errors import InputError, gdal_reason


def placement(path: Path | str, src: rasterio.io.DatasetReader, allow_ungeoreferenced: bool | None = None,
              rpc_dem: Path | str | None = None) -> tuple[CRS, str, dict] | None:
    """What places ``src`` on the Earth when it is not a north-up geotransform (rows from north to
    south, columns from west to east): a rotated, sheared, south-up or mirrored one, ground
    control points or RPCs, as (the CRS to warp into, a description, GDAL transformer
    options); None for a north-up scene or one with no georeferencing. RPCs are projected at their
    mean height (HEIGHT_OFF): with no DEM, ground far above or below it lands off by its height
    times the view's slant. With ``rpc_dem`` (a raster of heights) the RPCs are projected onto it,
    orthorectified as ``gdalwarp -rpc -to RPC_DEM=...`` does, even in a file that also has a
    geotransform (an approximate one often rides along with RPCs). Ground control points in no
    CRS place nothing: an error, or (a scene ``allow_ungeoreferenced``) None, pixel space; None
    for the flag means a map, which has no such option."""
    if rpc_dem is not None:
        if not src.rpcs:
            raise InputError(f"{path} has no RPCs: a DEM (--rpc-dem) places only a scene georeferenced by RPCs")
        return CRS.from_epsg(4326), f"its RPCs over the DEM {rpc_dem}", {"RPC_DEM": _checked_dem(rpc_dem)}
    if src.crs is not None and not src.transform.is_identity:
        t = src.transform
        if abs(t.b) + abs(t.d) > 1e-9 * (abs(t.a) + abs(t.e)):  # a turn by 90 degrees as well
            return src.crs, "its rotated or sheared geotransform", {}
        return None if t.a > 0 and t.e < 0 else (src.crs, "its south-up or mirrored geotransform", {})
    points, crs = src.gcps
    if points:
        if crs is None:
            if allow_ungeoreferenced:
                return None
            hint = ("" if allow_ungeoreferenced is None
                    else " (pass --allow-ungeoreferenced to translate it in pixel space)")
            raise InputError(f"{path} has {len(points)} ground control points but no CRS for them: it cannot be "
                             f"placed on a map{hint}")
        return crs, f"{len(points)} ground control points", {}
    if src.rpcs:
        height = src.rpcs.height_off
        return CRS.from_epsg(4326), f"its RPCs at their mean height ({height:g} m, no DEM)", {"RPC_HEIGHT": height}
    return None


def warp_north_up(path: Path | str, src: rasterio.io.DatasetReader, where: tuple[CRS, str, dict],
                  resampling: Resampling) -> WarpedVRT | rasterio.io.DatasetReader:
    """``src`` warped north-up by GDAL onto its suggested grid (about the scene's pixel size), as
    QGIS shows such rasters; the model, the tile grid and the map need north-up pixels. Where the
    scene has no mask an alpha band marks the ground it covers (a rotated scene's corners)."""
    crs, how, options = where
    try:
        if "RPC_DEM" in options:
            return _over_dem(src, crs, resampling, options["RPC_DEM"])
        return WarpedVRT(src, crs=crs, resampling=resampling, add_alpha=_unmasked(src), **options)
    except (RasterioError, CPLE_BaseError) as exc:
        raise InputError(f"GDAL cannot warp {path} north-up from {how}: {gdal_reason(exc)}") from None


def dem_name(dem: Path | str) -> str:
    """The name a DEM is known by, wherever the command runs: a local file's absolute path, any
    other address (a URL, /vsi...) as given. A map records it, its resume compares it, and preview
    opens it again, perhaps from another folder."""
    return str(Path(dem).resolve()) if Path(dem).exists() else str(dem)


def _checked_dem(dem: Path | str) -> str:
    """``dem`` as GDAL's name for it (``/vsicurl/`` for a URL, absolute for a local file: the
    warp's document has no folder of its own), once it opens as a one-band raster with a CRS
    (else GDAL's warper fails at every pixel, or reads the wrong band, with no word why)."""
    try:
        with rasterio.open(dem) as d:
            if d.crs is None:
                raise InputError(f"the DEM {dem} has no CRS: its heights cannot be placed under the scene")
            if d.count != 1:
                raise InputError(f"the DEM {dem} has {d.count} bands: a DEM is one band of heights")
            name = d.name
    except RasterioError as exc:
        raise InputError(f"cannot open the DEM {dem}: {gdal_reason(exc)}") from None
    return dem_name(name)


def _over_dem(src: rasterio.io.DatasetReader, crs: CRS, resampling: Resampling,
              dem: str) -> rasterio.io.DatasetReader:
    """``src`` orthorectified by its RPCs over the heights in ``dem``, as GDAL's own warped VRT.

    rasterio's WarpedVRT upper-cases every warp option's value, so a DEM's path cannot reach GDAL
    through it (rasterio's reproject and calculate_default_transform keep RPC_DEM as given). So the
    grid comes from GDAL's suggested output over the DEM (calculate_default_transform), the warp
    from a WarpedVRT at height 0, and the document GDAL serialises for that warp gets the DEM and
    the grid before GDAL opens it: GDAL's RPC transformer reads DEMPath (and the rest) from it.
    The RPCs, not a geotransform that rides along (SRC_METHOD=RPC, as ``gdalwarp -rpc``).
    Where the DEM has no height (a void, or beyond it) the RPCs' mean height stands in, as
    RPC_DEM_MISSING_VALUE does, so a hole in the DEM is no hole in the map. Exact transforms, as
    rasterio's reproject uses with RPC_DEM (an approximation along a row assumes smooth ground; on
    benchmarks/rpc_dem.py's scene it read 2-3x faster). Heights are GDAL's: ellipsoidal
    unless the DEM's CRS names a vertical datum (GDAL then shifts them)."""
    missing = repr(src.rpcs.height_off)
    transform, width, height = calculate_default_transform(None, crs, src.width, src.height, rpcs=src.rpcs,
                                                           RPC_DEM=dem, RPC_DEM_MISSING_VALUE=missing)
    with WarpedVRT(src, crs=crs, resampling=resampling, add_alpha=_unmasked(src), tolerance=0, SRC_METHOD="RPC",
                   RPC_HEIGHT=0) as vrt:
        doc = ET.fromstring(vrt.tags(ns="xml:VRT")["xml:VRT"])
    doc.set("rasterXSize", str(width))
    doc.set("rasterYSize", str(height))
    doc.find("GeoTransform").text = ",".join(repr(v) for v in transform.to_gdal())
    warp = doc.find("GDALWarpOptions/Transformer/GenImgProjTransformer")
    warp.find("DstGeoTransform").text = ",".join(repr(v) for v in transform.to_gdal())
    warp.find("DstInvGeoTransform").text = ",".join(repr(v) for v in (~transform).to_gdal())
    rpc = warp.find("SrcRPCTransformer/RPCTransformer")
    for tag, text in (("DEMPath", dem), ("DEMInterpolation", "bilinear"), ("DEMMissingValue", missing)):
        ET.SubElement(rpc, tag).text = text
    return rasterio.open(ET.tostring(doc, encoding="unicode"))


def north_up(path: Path | str, src: rasterio.io.DatasetReader) -> rasterio.io.DatasetReader | WarpedVRT:
    """A map raster as a north-up dataset: ``src`` itself, or its nearest-neighbour warp when it is
    placed otherwise (see :func:`placement`), which keeps ``src`` open (close both). Nearest
    keeps a map's flat colours; :func:`warped_onto` averages it onto the scene's grid after. (A
    WarpedVRT given a grid of its own uses the source's geotransform and ignores ground control
    points and RPCs: a map placed by them read as nodata everywhere.)"""
    where = placement(path, src)
    return src if where is None else warp_north_up(path, src, where, Resampling.nearest)


def warped_onto(src: rasterio.io.DatasetReader, crs, transform: Affine, width: int, height: int) -> WarpedVRT:
    """``src`` warped by GDAL (average) onto another grid, for a map raster compared with or cut
    beside a scene. Its dataset mask says where ``src`` reaches: a raster without a mask gets an
    alpha band, else the ground beyond it reads as valid black pixels."""
    return WarpedVRT(src, crs=crs, transform=transform, width=width, height=height, resampling=Resampling.average,
                     add_alpha=_unmasked(src))


def _unmasked(src: rasterio.io.DatasetReader) -> bool:
    """No nodata, mask or alpha: a warp of it needs an alpha band to say where it reaches."""
    return all(MaskFlags.all_valid in flags for flags in src.mask_flag_enums)
