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

Sheets in another CRS than the mosaic's (a delivery that spans two UTM zones, which gdalbuildvrt
refuses) are each described by a warped VRT in a folder beside the mosaic, written by GDAL itself
(a rasterio WarpedVRT copied with the VRT driver), and the mosaic takes them as sheets.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from rasterio import dtypes
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import CRSError, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds

from .aoi import AreaOfInterest
from .errors import InputError, OutputError, gdal_reason
from .reader import is_gdal_path, open_raster
from .writer import GDAL_WRITE_ERRORS, VRT, check_destination


@dataclass
class MosaicResult:
    dst: Path
    sheets: int
    width: int
    height: int
    crs: str
    warped: int = 0  # sheets warped from another CRS (their VRTs in warped_dir)
    warped_dir: Path | None = None


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


def _warp_grid(read: list[_Sheet], crs: CRS) -> tuple[float, float, float, float]:
    """The pixel grid sheets are warped onto (x and y pixel size, an origin on it): that of the
    sheets already in ``crs`` (their finest pixels, the first one's corner), so a warped sheet
    lands on whole pixels of the mosaic and is resampled once; with none, GDAL's suggested pixel
    size for each (the finest) on a grid through 0, 0."""
    native = [s for s in read if s.crs == crs]
    if native:
        return (min(s.res[0] for s in native), min(s.res[1] for s in native), native[0].bounds[0],
                native[0].bounds[3])
    sizes = [calculate_default_transform(s.crs, crs, s.width, s.height, *s.bounds)[0] for s in read]
    return min(t.a for t in sizes), min(-t.e for t in sizes), 0.0, 0.0


def _warped(sheet: _Sheet, crs: CRS, grid: tuple[float, float, float, float], path: Path, final: Path) -> _Sheet:
    """``sheet`` carried into ``crs`` by GDAL's warper onto ``grid`` (:func:`_warp_grid`), over the
    whole pixels that cover it, described as the VRT ``path`` (which names the sheet relative to
    itself), and returned as the sheet the mosaic reads once that VRT is moved to ``final`` (a
    folder beside ``path``'s, so the relative name holds). Its pixels are interpolated
    bilinearly (a paletted sheet's indices by nearest neighbour); what lies outside it is nodata,
    or transparent through an alpha band GDAL adds after the sheet's bands (the mosaic reads only
    those, and the alpha as their mask)."""
    resampling = Resampling.nearest if sheet.palette else Resampling.bilinear
    has_alpha = ColorInterp.alpha.name in sheet.colours
    resx, resy, x0, y0 = grid
    left, bottom, right, top = transform_bounds(sheet.crs, crs, *sheet.bounds, densify_pts=21)
    left, right = x0 + math.floor((left - x0) / resx) * resx, x0 + math.ceil((right - x0) / resx) * resx
    bottom, top = y0 + math.floor((bottom - y0) / resy) * resy, y0 + math.ceil((top - y0) / resy) * resy
    with open_raster(sheet.path, expand_palette=False) as src, \
            WarpedVRT(src, crs=crs, transform=Affine(resx, 0, left, 0, -resy, top),
                      width=max(1, round((right - left) / resx)), height=max(1, round((top - bottom) / resy)),
                      resampling=resampling, src_nodata=sheet.nodata, nodata=sheet.nodata,
                      add_alpha=sheet.nodata is None and not has_alpha) as vrt:
        try:
            rasterio.shutil.copy(vrt, path, driver="VRT")
        except (*GDAL_WRITE_ERRORS, SystemError) as exc:  # a full disk: rasterio's SystemError, no reason
            reason = "GDAL gives no reason" if isinstance(exc, SystemError) else gdal_reason(exc)
            raise OutputError(f"writing the warped sheet {path.name} failed (disk full?): {reason}") from None
        bounds, width, height, res = tuple(vrt.bounds), vrt.width, vrt.height, vrt.res
    tree = ET.parse(path)
    for source in tree.iter("SourceDataset"):  # GDAL writes the sheet's absolute path
        name, relative = _location(sheet.path, path.parent)
        source.text, source.attrib["relativeToVRT"] = name, "1" if relative else "0"
    try:
        tree.write(path, encoding="utf-8", xml_declaration=False)
    except OSError as exc:
        raise OutputError(f"writing the warped sheet {path.name} failed: {exc.strerror}") from None
    return _Sheet(str(final), bounds, width, height, crs, res, sheet.count, sheet.dtype, sheet.colours,
                  sheet.nodata, sheet.palette)


def _source(parent: ET.Element, sheet: _Sheet, band: str, folder: Path, place: tuple[float, ...],
            over: bool) -> None:
    """All of ``sheet``'s ``band`` ("1", or "mask,1" for its mask) at ``place`` (xOff, yOff, xSize,
    ySize in the mosaic's pixels). Drawn ``over`` an earlier sheet, a ComplexSource that skips
    what the sheet does not cover, so the one below shows through: its nodata value, or where
    its mask (alpha band, mask band) is 0 (and in the mask, its zeros). Else a SimpleSource
    (but a sheet with a nodata value always skips it): compositing by mask everywhere doubled the
    read time of a 4096 x 4096 mosaic of four sheets side by side (0.32-0.38 s against
    0.14-0.18 s). A coarser sheet's pixels are enlarged bilinearly (its mask by nearest
    neighbour)."""
    composite = over or (sheet.nodata is not None and not band.startswith("mask"))
    source = ET.SubElement(parent, "ComplexSource" if composite else "SimpleSource")
    if not band.startswith("mask") and (abs(place[2] - sheet.width) > 1e-6 or abs(place[3] - sheet.height) > 1e-6):
        source.set("resampling", "bilinear")
    name, relative = _location(sheet.path, folder)
    ET.SubElement(source, "SourceFilename", relativeToVRT="1" if relative else "0").text = name
    ET.SubElement(source, "SourceBand").text = band
    ET.SubElement(source, "SrcRect", xOff="0", yOff="0", xSize=str(sheet.width), ySize=str(sheet.height))
    ET.SubElement(source, "DstRect", **{k: repr(v) for k, v in zip(("xOff", "yOff", "xSize", "ySize"), place)})
    if not composite:
        return
    if band.startswith("mask"):
        ET.SubElement(source, "NODATA").text = "0"
    elif sheet.nodata is not None:
        ET.SubElement(source, "NODATA").text = repr(sheet.nodata)
    else:
        ET.SubElement(source, "UseMaskBand").text = "true"


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


def sheets_from_index(index: str, field: str = "location") -> list[str]:
    """The sheets a tile index lists (gdaltindex's, QGIS's Tile Index, a delivery's index layer;
    ``FILE`` or ``FILE:LAYER``, or a URL): each feature's ``field``, a path relative to the
    index's folder (as GDAL's GTI driver reads one) unless absolute or an address GDAL reads."""
    from .render import read_vectors  # here: render imports reader, as this module does

    layer = read_vectors(index)
    if not layer.properties:
        raise InputError(f"{index} lists no sheets")
    if field not in layer.properties[0]:
        raise InputError(f"{index} has no field {field!r} (its fields: {', '.join(layer.properties[0])}); "
                         "name the one that holds the sheets' paths")
    blank = [n for n, p in enumerate(layer.properties, 1) if p.get(field) in (None, "")]
    if blank:  # a feature drawn by hand, or a sheet left out of the delivery
        more = f" (and {len(blank) - 1} more)" if len(blank) > 1 else ""
        raise InputError(f"{index}: feature {blank[0]}{more} has no sheet path in its {field!r} field")
    file = layer.source
    paths = [str(p[field]) for p in layer.properties]
    if is_gdal_path(file):  # a URL or /vsi path: its sheets beside it, at that address
        return [p if is_gdal_path(p) else posixpath.join(posixpath.dirname(file), p) for p in paths]
    return [p if is_gdal_path(p) or Path(p).is_absolute() else str(Path(file).parent / p) for p in paths]


def build_mosaic(sheets: list[str | Path], dst: str | Path, overwrite: bool = False,
                 crs: str | None = None, src_nodata: float | None = None, aoi: str | None = None) -> MosaicResult:
    """Describe ``sheets`` (north-up rasters of one band count and data type) as the mosaic ``dst``
    (``.vrt``) in ``crs`` (default: the first sheet's), on the finest sheet's pixel size over all
    of them, with the first sheet's colour interpretation (and colour table: paletted sheets share
    one). Where sheets overlap, the later one listed is drawn. Sheets in another CRS are warped
    into it: their warped VRTs go in the folder ``<dst's name>_warped`` beside ``dst``.
    ``src_nodata``: every sheet's nodata value, in place of what the files say (as gdalbuildvrt
    -srcnodata): black collars the files do not mark then let the sheet below show. ``aoi``
    (``FILE`` or ``FILE:LAYER`` of polygons, any CRS): only the sheets whose extent meets them."""
    dst = Path(dst)
    check_destination(dst, None, overwrite, VRT)
    if not sheets:
        raise InputError("no sheets to put together")
    read = [_read_sheet(str(s)) for s in sheets]
    if aoi is not None:
        area = AreaOfInterest.read(aoi)
        carried = {key: area.in_crs(c) for key, c in {s.crs.to_wkt(): s.crs for s in read}.items()}  # once a CRS
        read = [s for s in read if shapely.intersects(carried[s.crs.to_wkt()], shapely.box(*s.bounds))]
        if not read:
            raise InputError(f"no sheet meets the area of interest {aoi}")
    if src_nodata is not None:
        misfit = next((s for s in read if not rasterio.dtypes.in_dtype_range(src_nodata, s.dtype)), None)
        if misfit is not None:
            raise InputError(f"nodata {src_nodata:g} is outside the range of {misfit.path}'s {misfit.dtype} values")
        read = [replace(s, nodata=src_nodata) for s in read]
    first = read[0]
    try:
        target = first.crs if crs is None else CRS.from_user_input(crs)
    except CRSError:
        raise InputError(f"unknown CRS for the mosaic: {crs}") from None
    for sheet in read[1:]:
        if (sheet.count, sheet.dtype) != (first.count, first.dtype):
            raise InputError(f"{sheet.path} has {sheet.count} {sheet.dtype} band(s), {first.path} {first.count} "
                             f"{first.dtype}: a mosaic's sheets have the same bands")
        if sheet.palette != first.palette:  # the VRT has one table for all the sheets' indices
            raise InputError(f"{sheet.path} and {first.path} do not share one colour table: expand the sheets to "
                             "RGB first (gdal_translate -expand rgb)")
        if sheet.nodata != first.nodata and not (_is_nan(sheet.nodata) and _is_nan(first.nodata)):
            raise InputError(f"{sheet.path} has nodata {sheet.nodata}, {first.path} {first.nodata}: a mosaic's "
                             "sheets share one nodata value")
    warped_dir = dst.with_name(f"{dst.stem}_warped")
    moving = [i for i, sheet in enumerate(read) if sheet.crs != target]
    if warped_dir.exists() and (moving or overwrite):
        if not overwrite:
            raise OutputError(f"{warped_dir} exists (pass --overwrite to replace it)")
        if not _holds_warped_sheets(warped_dir):  # --overwrite replaces a mosaic's files, nothing else
            raise OutputError(f"{warped_dir} is in the way and holds more than a mosaic's warped sheets: move it")
    part = dst.with_name(f".{warped_dir.name}.part")
    shutil.rmtree(part, ignore_errors=True)
    try:
        if moving:
            part.mkdir()
        grid = _warp_grid(read, target) if moving else None
        for i in moving:
            name = f"{i + 1:03d}_{Path(read[i].path).stem}.vrt"  # numbered: sheets of one name in two folders
            read[i] = _warped(read[i], target, grid, part / name, warped_dir / name)
        root, width, height = _mosaic_xml(read, target, dst.parent if str(dst.parent) else Path("."))
        _publish(root, dst, part if moving else None, warped_dir, overwrite)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return MosaicResult(dst, len(read), width, height, str(target), len(moving), warped_dir if moving else None)


def _mosaic_xml(read: list[_Sheet], crs: CRS, folder: Path) -> tuple[ET.Element, int, int]:
    """The VRT of ``read`` (sheets of one CRS, checked alike) and its width and height."""
    first = read[0]
    resx, resy = min(s.res[0] for s in read), min(s.res[1] for s in read)
    left, bottom = min(s.bounds[0] for s in read), min(s.bounds[1] for s in read)
    right, top = max(s.bounds[2] for s in read), max(s.bounds[3] for s in read)
    width, height = max(1, round((right - left) / resx)), max(1, round((top - bottom) / resy))
    to_pixels = ~Affine(resx, 0, left, 0, -resy, top)
    places = []
    for s in read:
        (x0, y0), (x1, y1) = to_pixels @ (s.bounds[0], s.bounds[3]), to_pixels @ (s.bounds[2], s.bounds[1])
        places.append((x0, y0, x1 - x0, y1 - y0))
    # Which sheets are drawn over an earlier one (their rectangles overlap by more than rounding).
    over = [any(min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]) > 1e-6 and
                min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]) > 1e-6 for b in places[:i])
            for i, a in enumerate(places)]

    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = crs.to_wkt()
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
        for sheet, place, on in zip(read, places, over):
            _source(band, sheet, str(b), folder, place, on)
    if first.nodata is None:
        mask = ET.SubElement(ET.SubElement(root, "MaskBand"), "VRTRasterBand", dataType="Byte")
        for sheet, place, on in zip(read, places, over):
            _source(mask, sheet, "mask,1", folder, place, on)
    return root, width, height


def _holds_warped_sheets(folder: Path) -> bool:
    """Whether ``folder`` holds only files named as :func:`build_mosaic` names warped sheets."""
    return folder.is_dir() and all(p.is_file() and re.fullmatch(r"\d{3,}_.*\.vrt", p.name) for p in folder.iterdir())


def _publish(root: ET.Element, dst: Path, warped: Path | None, warped_dir: Path, overwrite: bool) -> None:
    """Put the mosaic at ``dst`` and its warped sheets (the folder ``warped``, if any) at
    ``warped_dir``, once GDAL reads the mosaic back; on failure nothing new is left and an older
    mosaic's folder is back in place. A mosaic replaced by one without warped sheets takes its
    stale folder with it."""
    tmp, old = dst.with_name(f".{dst.name}.part"), dst.with_name(f".{warped_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    try:
        if overwrite and warped_dir.exists():
            warped_dir.rename(old)
        if warped is not None:
            warped.rename(warped_dir)
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=False)
        with rasterio.open(tmp):  # GDAL reads it back, or nothing is left
            pass
        os.replace(tmp, dst)
    except (RasterioIOError, OSError) as exc:
        if warped is not None:
            shutil.rmtree(warped_dir, ignore_errors=True)
        if old.exists():
            old.rename(warped_dir)
        what = "GDAL cannot read the mosaic back" if isinstance(exc, RasterioIOError) else f"cannot write {dst}"
        raise OutputError(f"{what}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)
