"""A class raster's patches as polygons: the lakes, parks, buildings and roads of a map as features.

``classify`` gives each pixel of a translated map its class; GIS work (select the lakes, count the
buildings, clip or buffer by them, edit them) wants features. Each 4-connected patch of one class
becomes a polygon, with its holes (GDAL's polygonize, through :func:`rasterio.features.shapes`),
with its class and its area on the CRS's ellipsoid (:class:`pyproj.Geod`: a projected CRS's plane
is not the ground, see :class:`~geosat2map.classify.PixelAreas`), written by OGR (pyogrio) as a
GeoPackage, GeoJSON or FlatGeobuf layer in the raster's CRS.

The raster is polygonized in strips of rows, never whole. A patch that a strip's edge cuts is put
back together: its parts meet exactly on pixel edges (they are traced in pixel coordinates, carried
into the CRS only at the end), so shapely's union of the parts touching an edge is the patch.
Patches smaller than ``min_pixels`` (a GAN map's specks) are first merged into their largest
neighbour by GDAL's sieve filter (``gdal_sieve``): a speck of land in a lake leaves no hole in it.
Each strip is sieved with ``min_pixels`` rows of its neighbours on either side, which no speck
can span, so a patch that only looks small because the strip cuts it is never taken for one (which
neighbour is the largest, the strip judges by what it holds). GDAL's sieve of the whole raster at
once would judge that exactly, but rasterio returns it as one array of the whole raster, and GDAL
holds every patch before sieving, specks too (a 16384 x 16384 raster of random classes: 5.4 GB
peak); strips keep only the sieved patches.

Traced outlines follow the pixels' staircase. ``simplify`` smooths them with GEOS's coverage
simplification, which moves an edge that two features share once, for both: neighbours stay
edge to edge, with no slivers between them or overlaps. It needs each shared edge to have the
same vertices on both sides, so the outlines get one at every pixel corner first (polygonize
leaves a vertex only where an outline turns, which is not always where its neighbour's does).
"""

from __future__ import annotations

import os
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio
import shapely
import shapely.geometry
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Geod, Transformer
from rasterio.features import shapes, sieve
from rasterio.windows import Window

from .classify import CLASS_NAMES, CLASS_VALUES, CLASSES_TAG, NODATA
from .errors import InputError, OutputError, first_line
from .reader import open_raster
from .writer import BLOCK, check_destination

#: What a feature layer may be written as: single-file formats, so that the layer is written beside
#: its final name and renamed into place (a Shapefile is several files).
VECTOR_SUFFIXES = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".fgb": "FlatGeobuf"}
#: The classes made features unless asked otherwise: all but land, the background of every map.
DEFAULT_CLASSES = tuple(name for name in CLASS_VALUES if name != "land")
#: Rows polygonized at once: 8 block rows (a 100 000-pixel-wide raster: 200 MB of classes, as much
#: again for the mask of the classes asked for).
STRIP_ROWS = 8 * BLOCK


@dataclass
class Patches:
    """A class's features: their count and total area in m² (None without a CRS)."""

    count: int
    area_m2: float | None


def vectorize_classes(classes_path: str | Path, dst: str | Path, classes: tuple[str, ...] = DEFAULT_CLASSES,
                      min_pixels: int = 4, simplify: float = 0.0, overwrite: bool = False,
                      strip_rows: int = STRIP_ROWS) -> dict[str, Patches]:
    """Write ``dst``: each patch of ``classes`` in the class raster at ``classes_path`` (written by
    :func:`~geosat2map.classify.classify_map`) as a polygon with fields ``class``, ``value`` and
    ``area_m2`` (see the module); patches under ``min_pixels`` pixels merged into their largest
    neighbour first, outlines smoothed by ``simplify`` pixels (0: the pixels' edges, exactly).
    Returns each asked class's features (areas of the polygons as written)."""
    dst = Path(dst)
    wanted = _class_values(classes)
    if min_pixels < 1:
        raise InputError(f"the smallest patch kept must be at least 1 pixel, not {min_pixels}")
    if not simplify >= 0:  # NaN too
        raise InputError(f"the simplification tolerance must be 0 or more pixels, not {simplify}")
    with open_raster(classes_path, expand_palette=False) as src:
        check_destination(dst, Path(classes_path), overwrite,
                          ("the features are a GeoPackage, GeoJSON or FlatGeobuf file", tuple(VECTOR_SUFFIXES)))
        if src.count != 1 or src.dtypes[0] != "uint8" or CLASSES_TAG not in src.tags():
            raise InputError(f"{classes_path} is not a class raster (geosat2map classify MAP CLASSES writes one)")
        pixel_polygons = _traced(src, np.array(wanted, np.uint8), strip_rows, min_pixels)
        crs, transform = src.crs, src.transform
    # A patch walled in by nodata has no neighbour to merge into: left out.
    kept = [(p, value) for value, polygons in pixel_polygons.items() for p in polygons if p.area >= min_pixels]
    outlines = np.array([p for p, _ in kept], dtype=object)
    if simplify > 0 and len(outlines):
        outlines = shapely.coverage_simplify(shapely.segmentize(outlines, 1.0), simplify)
    geoms = shapely.transform(outlines, lambda xy: _apply(transform, xy))
    values = np.array([value for _, value in kept], np.uint8)
    areas = _ground_areas(geoms, crs)
    _write(dst, geoms, values, areas, crs)
    return {CLASS_NAMES[v]: Patches(int(np.sum(values == v)),
                                    None if areas is None else float(areas[values == v].sum()))
            for v in wanted}


def _class_values(classes: tuple[str, ...]) -> list[int]:
    unknown = [c for c in classes if c not in CLASS_VALUES]
    if unknown or not classes:
        raise InputError(f"unknown class {', '.join(unknown) or '(none given)'} (use {', '.join(CLASS_VALUES)})")
    return [CLASS_VALUES[c] for c in dict.fromkeys(classes)]


def _traced(src, wanted: np.ndarray, strip_rows: int, min_pixels: int) -> dict[int, list[shapely.Polygon]]:
    """Each wanted value's patches, sieved of those under ``min_pixels``, as polygons in pixel
    coordinates (x right, y down), the parts of a patch cut by a strip's edge joined again."""
    done: dict[int, list] = {int(v): [] for v in wanted}
    cut: dict[int, list] = {int(v): [] for v in wanted}
    margin = min_pixels if min_pixels > 1 else 0  # a patch of k pixels spans k rows at most
    for top in range(0, src.height, strip_rows):
        rows = min(strip_rows, src.height - top)
        above = min(margin, top)
        read = Window(0, top - above, src.width, min(rows + above + margin, src.height - top + above))
        strip = src.read(1, window=read)
        if margin:
            strip = sieve(strip, min_pixels, mask=strip != NODATA, connectivity=4)
        strip = strip[above:above + rows]
        mask = np.isin(strip, wanted)
        if not mask.any():
            continue
        for geometry, value in shapes(strip, mask=mask, connectivity=4, transform=Affine.translation(0, top)):
            polygon = shapely.geometry.shape(geometry)
            _, ymin, _, ymax = polygon.bounds
            at_edge = (ymin == top and top > 0) or (ymax == top + rows and top + rows < src.height)
            (cut if at_edge else done)[int(value)].append(polygon)
    for value, parts in cut.items():
        if parts:
            done[value] += list(shapely.get_parts(shapely.union_all(parts)))
    return done


def _apply(transform: Affine, xy: np.ndarray) -> np.ndarray:
    """Pixel coordinates (n, 2) carried into the raster's CRS."""
    a, b, c, d, e, f = transform[:6]
    return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])


def _ground_areas(geoms: np.ndarray, crs) -> np.ndarray | None:
    """Each polygon's area in m² on its CRS's ellipsoid; None without a CRS."""
    if crs is None:
        return None
    grid_crs = ProjCRS.from_wkt(crs.to_wkt())
    ellipsoid = grid_crs.geodetic_crs.ellipsoid
    geod = Geod(a=ellipsoid.semi_major_metre, b=ellipsoid.semi_minor_metre)
    to_lonlat = Transformer.from_crs(grid_crs, grid_crs.geodetic_crs, always_xy=True)
    lonlat = shapely.transform(geoms, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
    return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in lonlat], np.float64)


def _write(dst: Path, geoms: np.ndarray, values: np.ndarray, areas: np.ndarray | None, crs) -> None:
    """The features written beside ``dst`` and renamed into place: nothing half-written at ``dst``."""
    names = np.array([CLASS_NAMES[int(v)] for v in values], dtype=object)
    area_field = np.full(len(values), np.nan) if areas is None else areas
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}.part{dst.suffix}")
    try:
        try:
            with warnings.catch_warnings():  # a raster with no CRS makes features with none: no news
                warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
                pyogrio.raw.write(str(tmp), shapely.to_wkb(geoms), [names, values.astype(np.int32), area_field],
                                  ["class", "value", "area_m2"], layer=dst.stem,
                                  driver=VECTOR_SUFFIXES[dst.suffix.lower()], geometry_type="Polygon",
                                  crs=None if crs is None else crs.to_wkt())
        except Exception as exc:  # pyogrio's DataSourceError and GDAL's errors derive from Exception alone
            raise OutputError(f"writing {dst} failed: {first_line(exc)}") from None
        os.replace(tmp, dst)
    finally:
        with suppress(OSError):
            tmp.unlink()
