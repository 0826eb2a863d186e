"""The area of interest: polygons that limit a translate to the ground inside them.

A city boundary, a parcel or a survey block drawn in QGIS is the usual way to say "map this part":
the map covers the source pixels under the polygons' bounding box (as ``--bounds`` would), and the
pixels whose centres fall outside every polygon are nodata (GDAL's rasterisation rule, as
``gdalwarp -cutline``). Tiles wholly outside are not computed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from pyproj.exceptions import ProjError
from rasterio.features import geometry_mask

from .errors import InputError

#: Each polygon edge is cut into this many pieces before it is carried into another CRS, where a
#: straight edge may curve (the same densification as --bounds-crs).
DENSIFY = 21


@dataclass(frozen=True)
class AreaOfInterest:
    """The union of the polygons of a vector source, in the source's CRS."""

    geometry: shapely.Geometry
    crs: CRS
    source: str

    @classmethod
    def read(cls, spec: str) -> AreaOfInterest:
        """The polygons of ``FILE`` or ``FILE:LAYER`` (whatever GDAL/OGR reads); lines and points
        in it are left out, and a source with no polygon is refused."""
        from .render import read_vectors  # here: render imports reader, which imports this module

        layer = read_vectors(spec)
        polygons = [g for g in layer.geometries if g.geom_type in ("Polygon", "MultiPolygon")]
        if not polygons:
            raise InputError(f"{spec} has no polygons to use as the area of interest")
        geometry = shapely.make_valid(shapely.union_all(shapely.make_valid(np.array(polygons))))
        return cls(geometry, layer.crs, spec)

    def in_crs(self, crs) -> shapely.Geometry:
        """The area carried into ``crs`` (each edge densified first)."""
        target = CRS.from_user_input(crs)
        if target == self.crs:
            return self.geometry
        try:
            to = Transformer.from_crs(self.crs, target, always_xy=True)
        except ProjError:
            raise InputError(f"the area of interest cannot be carried into the scene's CRS ({self.source})") from None
        x0, y0, x1, y1 = self.geometry.bounds
        step = max(x1 - x0, y1 - y0) / DENSIFY
        dense = shapely.segmentize(self.geometry, step) if step > 0 else self.geometry
        moved = shapely.transform(dense, lambda xy: np.column_stack(to.transform(xy[:, 0], xy[:, 1])))
        if not all(map(math.isfinite, moved.bounds)):
            raise InputError(f"the area of interest lies outside the scene's CRS ({self.source})")
        return shapely.make_valid(moved)


def inside(geometry: shapely.Geometry, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Which pixels of a ``shape`` window at ``transform`` have their centre inside ``geometry``
    (GDAL's rasterisation; the geometry is first cut to the window, so a long boundary costs only
    its part there)."""
    h, w = shape
    (xa, ya), (xb, yb) = transform @ (0, 0), transform @ (w, h)
    part = shapely.clip_by_rect(geometry, min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
    if part.is_empty:
        return np.zeros(shape, bool)
    return geometry_mask([part], out_shape=shape, transform=transform, invert=True)


def windows_touched(geometry: shapely.Geometry, transform: Affine,
                    windows: Iterable[tuple[int, int, int, int]]) -> np.ndarray:
    """Which ``windows`` (column, row, width, height on the grid at ``transform``) have a pixel
    centre inside ``geometry`` (a bool each): the tiles a run over the area computes at most. Only
    the windows its boundary crosses are rasterised (:func:`inside`), so a large scene's tiles are
    judged without reading it."""
    cols, rows, widths, heights = np.array(list(windows), dtype=np.float64).reshape(-1, 4).T
    corners = np.stack([np.stack(transform @ (cols + dx * widths, rows + dy * heights), axis=-1)
                        for dx, dy in ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0))], axis=1)
    boxes = shapely.polygons(corners)
    shapely.prepare(geometry)
    within = shapely.contains_properly(geometry, boxes)
    for i in np.flatnonzero(~within & shapely.intersects(geometry, boxes)):
        within[i] = inside(geometry, transform @ Affine.translation(cols[i], rows[i]),
                           (int(heights[i]), int(widths[i]))).any()
    return within


def digest(geometry: shapely.Geometry) -> str:
    """A short digest of the area (as the scene sees it), for the resume record."""
    return hashlib.sha256(shapely.to_wkb(geometry, output_dimension=2)).hexdigest()[:16]
