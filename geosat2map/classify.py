"""A map's colours as classes: land, buildings, roads, highways, water and parks, and their areas.

A translated map is a picture; for analysis (how much of a scene is water or parkland, a layer
to clip or to take zonal statistics of) each pixel is given the map colour class nearest its
colour, as ``evaluate --classes`` scores them (:data:`metrics.MAP_CLASSES`, within
:data:`metrics.CLASS_TOLERANCE`; value 0, unclassified, for the rest: labels, icons, the edges
between two colours). The result is a paletted uint8 GeoTIFF on the map's grid, drawn in the
classes' own colours and naming them in its metadata, with the map's nodata as the value
:data:`NODATA` (a nodata value, not a mask band: see :class:`writer.GeoTIFFWriter`), and each
class's area on the ground. Beside it, the classes' QGIS style (:func:`style_path`). The map is
read block row by block row, never whole.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from rasterio.windows import Window

from .errors import InputError, OutputError
from .metrics import MAP_CLASSES, colour_classes
from .reader import open_raster
from .writer import BLOCK, GEOTIFF_SUFFIXES, GeoTIFFWriter, check_destination

#: The value of pixels in no class; the classes follow from 1 in :data:`MAP_CLASSES`' order.
UNCLASSIFIED = 0
CLASS_VALUES = {name: k + 1 for k, name in enumerate(MAP_CLASSES)}
#: Each value's name, unclassified first (the tag, the QGIS legend, the areas).
CLASS_NAMES = {UNCLASSIFIED: "unclassified", **{v: k for k, v in CLASS_VALUES.items()}}
#: Unclassified pixels are drawn mid grey, apart from every class colour.
UNCLASSIFIED_COLOUR = (128, 128, 128)
#: The class raster's tag naming each value; it also tells a class raster from other rasters.
CLASSES_TAG = "GEOSAT2MAP_CLASSES"
#: Where the map has no data: see-through in the colour table, and the band's nodata value.
NODATA = 255
#: Columns read, classified and measured at once: the distances to every class colour of 256 x 2048
#: pixels take 12 MB, their areas 4 MB (a whole row band of a 100 000-pixel-wide map: 200 MB).
CHUNK_COLUMNS = 2048


@dataclass
class ClassArea:
    """One class's share of a map's valid pixels: their count, and their area in square metres
    (None for a map with no CRS)."""

    pixels: int
    area_m2: float | None


def class_tags() -> dict[str, str]:
    """The class raster's metadata naming each value (gdalinfo, QGIS's layer information)."""
    names = {**CLASS_NAMES, NODATA: "nodata"}
    return {CLASSES_TAG: ", ".join(f"{v}={name}" for v, name in sorted(names.items()))}


def colormap() -> dict[int, tuple[int, ...]]:
    """Each class value drawn in its class's map colour (QGIS shows the raster as the map)."""
    return {UNCLASSIFIED: UNCLASSIFIED_COLOUR, **{CLASS_VALUES[k]: rgb for k, rgb in MAP_CLASSES.items()},
            NODATA: (0, 0, 0, 0)}


def style_path(dst: Path) -> Path:
    """The classes' QGIS style beside the class raster ``dst`` (its name, ``.qml``). QGIS loads a
    raster's same-named ``.qml`` as its default style: the layer's legend then lists the classes by
    name, where the colour table alone gives 256 entries numbered 0 to 255 (a GeoTIFF palette has
    one per byte value)."""
    return dst.with_suffix(".qml")


def qgis_style() -> str:
    """A QGIS paletted renderer of the classes (:func:`colormap` without nodata, which the raster's
    nodata value already hides), each labelled with its name."""
    qgis = ET.Element("qgis", version="3.22", styleCategories="Symbology")
    renderer = ET.SubElement(ET.SubElement(qgis, "pipe"), "rasterrenderer", type="paletted", band="1",
                             opacity="1", alphaBand="-1", nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for value, rgb in colormap().items():
        if value != NODATA:
            ET.SubElement(palette, "paletteEntry", value=str(value), color="#{:02x}{:02x}{:02x}".format(*rgb[:3]),
                          alpha="255", label=CLASS_NAMES[value])
    ET.indent(qgis)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(qgis, encoding="unicode") + "\n"


def classes_of(rgb: np.ndarray) -> np.ndarray:
    """The class value (:data:`CLASS_VALUES`, 0 for none) of each pixel of ``rgb`` (3, h, w) uint8."""
    # colour_classes gives each pixel an index into MAP_CLASSES, len(MAP_CLASSES) for none.
    values = np.array([*CLASS_VALUES.values(), UNCLASSIFIED], np.uint8)
    return values[colour_classes(torch.from_numpy(np.ascontiguousarray(rgb))).numpy()]


class PixelAreas:
    """The ground area, m², of a grid's pixels on its CRS's ellipsoid, a band of rows at a time.

    A projected CRS's plane is not the ground: Web Mercator (EPSG:3857, OpenAerialMap's and most
    web tiles' CRS) draws a pixel at 60 degrees north on four times its ground area, UTM 0.1 %
    off, and a degree of longitude shrinks towards the poles. So each pixel's area is measured on
    the ellipsoid: its sides carried to longitude and latitude (PROJ), their cross product times
    the ellipsoid's area element there (M N cos(latitude)); taken at the centre of every
    256-pixel stretch of each row, where it barely changes. No CRS: no areas (:attr:`known`).
    """

    def __init__(self, crs, transform: Affine, width: int) -> None:
        self.transform, self.width = transform, width
        self.known = crs is not None and not transform.is_identity
        if not self.known:
            return
        grid_crs = ProjCRS.from_wkt(crs.to_wkt())
        geodetic = grid_crs.geodetic_crs
        self.to_lonlat = Transformer.from_crs(grid_crs, geodetic, always_xy=True)
        self.a = geodetic.ellipsoid.semi_major_metre
        self.e2 = 1.0 - (geodetic.ellipsoid.semi_minor_metre / self.a) ** 2

    def of(self, top: int, rows: int, left: int, columns: int) -> np.ndarray:
        """The areas of the pixels of rows ``top .. top + rows`` and columns ``left .. left +
        columns`` (``left`` a multiple of 256), shaped (rows, columns)."""
        right = min(left + columns, self.width)
        cols = np.arange(left + BLOCK // 2, right + BLOCK // 2, BLOCK).clip(max=right - 0.5)
        col, row = np.meshgrid(cols, top + np.arange(rows) + 0.5)

        def lonlat(c: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return self.to_lonlat.transform(*(self.transform @ (c, r)))

        def apart(first: tuple, second: tuple) -> tuple[np.ndarray, np.ndarray]:
            """(longitude, latitude) from ``second`` to ``first``, radians (across the antimeridian too)."""
            dlon = (first[0] - second[0] + 180.0) % 360.0 - 180.0
            return np.radians(dlon), np.radians(first[1] - second[1])

        along_row = apart(lonlat(col + 0.5, row), lonlat(col - 0.5, row))
        along_col = apart(lonlat(col, row + 0.5), lonlat(col, row - 0.5))
        lat = np.radians(lonlat(col, row)[1])
        w = 1.0 - self.e2 * np.sin(lat) ** 2
        element = self.a**2 * (1.0 - self.e2) / w**2 * np.cos(lat)  # M * N * cos(latitude)
        area = element * np.abs(along_row[0] * along_col[1] - along_row[1] * along_col[0])
        return np.repeat(area, BLOCK, axis=1)[:, : right - left]


def classify_map(map_path: str | Path, dst: str | Path, overwrite: bool = False, compress: str = "zstd",
                 cog: bool = False) -> dict[str, ClassArea]:
    """Write ``dst``: the class of each pixel of the RGB map at ``map_path`` (see the module),
    tiled, compressed (``compress``, lossless), :data:`NODATA` where the map has none, with
    overviews (or a COG), and its QGIS style beside it (:func:`style_path`); returns each class's
    pixels and area, ``unclassified`` first, over the map's valid pixels."""
    dst = Path(dst)
    style = style_path(dst)
    counts = np.zeros(len(CLASS_VALUES) + 1, np.int64)
    area = np.zeros(len(CLASS_VALUES) + 1)
    with open_raster(map_path) as src:
        check_destination(dst, Path(map_path), overwrite, ("the classes are a GeoTIFF", GEOTIFF_SUFFIXES))
        if style.exists() and not overwrite:
            raise OutputError(f"{style} exists (pass --overwrite to replace it with the classes' QGIS style)")
        if src.count < 3 or src.dtypes[0] != "uint8":
            raise InputError(f"{map_path} is not an RGB map of 8-bit colours ({src.count} band(s) of {src.dtypes[0]})")
        ground = PixelAreas(src.crs, src.transform, src.width)
        # The map's scene and model come along, so `info` on the classes says where they came from.
        lineage = {k: v for k, v in src.tags().items() if k in ("GEOSAT2MAP_SOURCE", "GEOSAT2MAP_MODEL_SHA256")}
        tags = {**lineage, **class_tags(), "GEOSAT2MAP_CLASSIFIED_MAP": Path(str(map_path)).name}
        with GeoTIFFWriter(dst, src.width, src.height, src.crs, src.transform, cog=cog, compress=compress,
                           tags=tags, colormap=colormap(), nodata=NODATA) as writer:
            for top in range(0, src.height, BLOCK):
                rows = min(BLOCK, src.height - top)
                values = np.empty((rows, src.width), np.uint8)
                for left in range(0, src.width, CHUNK_COLUMNS):
                    window = Window(left, top, min(CHUNK_COLUMNS, src.width - left), rows)
                    part = classes_of(src.read([1, 2, 3], window=window))
                    valid = src.dataset_mask(window=window) > 0
                    counts += np.bincount(part[valid], minlength=len(counts))
                    if ground.known:
                        pixel_area = ground.of(top, rows, left, window.width)
                        area += np.bincount(part[valid], weights=pixel_area[valid], minlength=len(area))
                    part[~valid] = NODATA
                    values[:, left : left + window.width] = part
                writer.write_rows(top, values[None], None)
            style_tmp = style.with_name(f".{style.name}.{os.getpid()}.part")
            try:  # written whole before the raster is committed, renamed into place (its folder) after it
                try:
                    style_tmp.write_text(qgis_style())
                except OSError as exc:
                    raise OutputError(f"writing the QGIS style {style} failed: {exc.strerror or exc}") from None
                writer.commit()
                os.replace(style_tmp, style)
            finally:
                with suppress(OSError):
                    style_tmp.unlink()
    return {name: ClassArea(int(counts[v]), float(area[v]) if ground.known else None)
            for v, name in CLASS_NAMES.items()}

