"""An orthophoto delivered in sheets, described as one seamless scene (a GDAL VRT).

Translated sheet by sheet, a tiled delivery shows its cuts in the map: each sheet's edge is padded
by reflection, never seen with its neighbour. Read as one raster, GDAL does the mosaicking and
every tile near a cut sees both sides. GDAL's own tools for that description (gdalbuildvrt,
gdaltindex) are command-line programs a pip install of rasterio does not bring, and rasterio has
no binding for them, so this module writes the description itself: the VRT XML of a plain mosaic,
one source per sheet and band, as gdalbuildvrt writes it. Ground no sheet covers is nodata: the
sheets' nodata value where they have one (their nodata pixels let the sheets below show, as
gdalbuildvrt -srcnodata), else a mask band made of each sheet's own mask (alpha or mask band).
(GDAL 3.10 fills only the first row of such a mask band from sheets whose mask is a nodata value
when a read spans several sheets, hence the two kinds; and its tile index, GTI, which pyogrio could
write, reads resampled windows shifted by up to a source pixel inside a sheet.)
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import rasterio
from affine import Affine
from rasterio import dtypes
from rasterio.errors import RasterioIOError

from .errors import InputError, OutputError
from .reader import is_gdal_path, open_raster
from .writer import VRT, check_destination


@dataclass
class MosaicResult:
    dst: Path
    sheets: int
    width: int
    height: int
    crs: str


@dataclass(frozen=True)
class _Sheet:
    path: str
    bounds: tuple[float, float, float, float]
    width: int
    height: int
    crs: rasterio.crs.CRS
    res: tuple[float, float]
    count: int
    dtype: str
    colours: tuple[str, ...]
    nodata: float | None
    palette: dict[int, tuple[int, ...]] | None  # a one-band paletted sheet's colour table


def _read_sheet(path: str) -> _Sheet:
    with open_raster(path, expand_palette=False) as src:  # the VRT names the file, indices and all
        if src.crs is None or src.transform.is_identity:
            raise InputError(f"{path} has no georeferencing: a mosaic places its sheets by theirs")
        if src.transform.b or src.transform.d or src.transform.e > 0:
            raise InputError(f"{path} is not north-up: mosaic sheets must be (translate warps a single such "
                             "scene itself)")
        palette = src.colormap(1) if src.colorinterp[0].name == "palette" else None
        return _Sheet(path, tuple(src.bounds), src.width, src.height, src.crs, src.res, src.count,
                      src.dtypes[0], tuple(c.name for c in src.colorinterp), src.nodata, palette)


def _source(parent: ET.Element, sheet: _Sheet, band: str, folder: Path, place: tuple[float, ...]) -> None:
    """All of ``sheet``'s ``band`` ("1", or "mask,1" for its mask) at ``place`` (xOff, yOff, xSize,
    ySize in the mosaic's pixels): a SimpleSource, or a ComplexSource that skips its nodata. A
    coarser sheet's pixels are enlarged bilinearly (its mask by nearest neighbour)."""
    source = ET.SubElement(parent, "SimpleSource" if sheet.nodata is None or band.startswith("mask") else
                           "ComplexSource")
    if not band.startswith("mask") and (abs(place[2] - sheet.width) > 1e-6 or abs(place[3] - sheet.height) > 1e-6):
        source.set("resampling", "bilinear")
    name, relative = _location(sheet.path, folder)
    ET.SubElement(source, "SourceFilename", relativeToVRT="1" if relative else "0").text = name
    ET.SubElement(source, "SourceBand").text = band
    ET.SubElement(source, "SrcRect", xOff="0", yOff="0", xSize=str(sheet.width), ySize=str(sheet.height))
    ET.SubElement(source, "DstRect", **{k: repr(v) for k, v in zip(("xOff", "yOff", "xSize", "ySize"), place)})
    if source.tag == "ComplexSource":
        ET.SubElement(source, "NODATA").text = repr(sheet.nodata)


def _is_nan(value: float | None) -> bool:
    return value is not None and math.isnan(value)


def _location(sheet: str, folder: Path) -> tuple[str, bool]:
    """The sheet's path as the VRT names it, and whether relative to the VRT's folder (so the two
    can be moved together); absolute where no relative path exists (another drive on Windows); a
    remote address or other GDAL path as given."""
    if is_gdal_path(sheet):
        return sheet, False
    try:
        return Path(os.path.relpath(Path(sheet).resolve(), folder.resolve())).as_posix(), True
    except ValueError:
        return str(Path(sheet).resolve()), False


def build_mosaic(sheets: list[str | Path], dst: str | Path, overwrite: bool = False) -> MosaicResult:
    """Describe ``sheets`` (north-up rasters of one CRS, band count and data type) as the mosaic
    ``dst`` (``.vrt``), on the finest sheet's pixel size over all of them, with the first sheet's
    colour interpretation (and colour table: paletted sheets share one). Where sheets overlap, the
    later one listed is drawn."""
    dst = Path(dst)
    check_destination(dst, None, overwrite, VRT)
    if not sheets:
        raise InputError("no sheets to put together")
    read = [_read_sheet(str(s)) for s in sheets]
    first = read[0]
    for sheet in read[1:]:
        if sheet.crs != first.crs:
            raise InputError(f"{sheet.path} is in {sheet.crs}, {first.path} in {first.crs}: a mosaic's sheets "
                             f"share one CRS, as gdalbuildvrt asks (warp them first: gdalwarp -t_srs {first.crs})")
        if (sheet.count, sheet.dtype) != (first.count, first.dtype):
            raise InputError(f"{sheet.path} has {sheet.count} {sheet.dtype} band(s), {first.path} {first.count} "
                             f"{first.dtype}: a mosaic's sheets have the same bands")
        if sheet.palette != first.palette:  # the VRT has one table for all the sheets' indices
            raise InputError(f"{sheet.path} and {first.path} do not share one colour table: expand the sheets to "
                             "RGB first (gdal_translate -expand rgb)")
        if sheet.nodata != first.nodata and not (_is_nan(sheet.nodata) and _is_nan(first.nodata)):
            raise InputError(f"{sheet.path} has nodata {sheet.nodata}, {first.path} {first.nodata}: a mosaic's "
                             "sheets share one nodata value")
    resx, resy = min(s.res[0] for s in read), min(s.res[1] for s in read)
    left, bottom = min(s.bounds[0] for s in read), min(s.bounds[1] for s in read)
    right, top = max(s.bounds[2] for s in read), max(s.bounds[3] for s in read)
    width, height = max(1, round((right - left) / resx)), max(1, round((top - bottom) / resy))
    to_pixels = ~Affine(resx, 0, left, 0, -resy, top)
    places = []
    for s in read:
        (x0, y0), (x1, y1) = to_pixels @ (s.bounds[0], s.bounds[3]), to_pixels @ (s.bounds[2], s.bounds[1])
        places.append((x0, y0, x1 - x0, y1 - y0))

    folder = dst.parent if str(dst.parent) else Path(".")
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = first.crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in (left, resx, 0.0, top, 0.0, -resy))
    gdal_type = dtypes.typename_fwd[dtypes.dtype_rev[first.dtype]]  # Byte, UInt16...
    for b in range(1, first.count + 1):
        band = ET.SubElement(root, "VRTRasterBand", dataType=gdal_type, band=str(b))
        ET.SubElement(band, "ColorInterp").text = first.colours[b - 1].capitalize()
        if first.nodata is not None:
            ET.SubElement(band, "NoDataValue").text = repr(first.nodata)
        if b == 1 and first.palette:  # without its table a Palette band is unreadable
            table = ET.SubElement(band, "ColorTable")
            for index in range(max(first.palette) + 1):
                c = first.palette.get(index, (0, 0, 0, 0))
                ET.SubElement(table, "Entry", c1=str(c[0]), c2=str(c[1]), c3=str(c[2]), c4=str(c[3]))
        for sheet, place in zip(read, places):
            _source(band, sheet, str(b), folder, place)
    if first.nodata is None:
        mask = ET.SubElement(ET.SubElement(root, "MaskBand"), "VRTRasterBand", dataType="Byte")
        for sheet, place in zip(read, places):
            _source(mask, sheet, "mask,1", folder, place)

    tmp = dst.with_name(f".{dst.name}.part")
    try:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=False)
        with rasterio.open(tmp):  # GDAL reads it back, or nothing is left at DST
            pass
        os.replace(tmp, dst)
    except RasterioIOError as exc:
        raise OutputError(f"GDAL cannot read the mosaic back: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return MosaicResult(dst, len(read), width, height, str(first.crs))
