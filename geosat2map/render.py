"""Rendering vector layers as a map-style raster on a given grid (the targets for training).

Vectors in any CRS (read through GDAL/OGR by pyogrio) are reprojected to the grid's CRS and then
into "ground metres": the grid's pixel coordinates scaled by the ground size of a pixel along each
axis, so line widths in the style are true metres even on geographic grids. Each style rule is
rasterised at ``supersample`` times the resolution and averaged down, which anti-aliases edges,
then painted over the background in draw order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import pyogrio
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.features import rasterize

from .errors import InputError, first_line
from .reader import ground_pixel_size, is_remote, open_raster

DEFAULT_STYLE = "maps"
#: How far outside a grid a feature may lie and still be drawn on it: more than half the widest line.
DRAW_MARGIN_M = 100.0
#: A rule's fill that draws nothing: what the maps leave as land (land-use areas, tunnels, power lines).
NOT_DRAWN = "none"
#: The most pixels a grid made from bounds and a resolution may have (65 536 x 65 536, 12 GiB as
#: raw RGB): past it, a resolution given in the wrong units (metres for degrees) or a typo is far
#: likelier than a wanted map, and rendering it would run for days before anyone noticed.
MAX_PIXELS = 2**32
_KINDS = {"Polygon": "polygon", "MultiPolygon": "polygon", "LineString": "line", "MultiLineString": "line",
          "LinearRing": "line", "Point": "point", "MultiPoint": "point"}


def _colour(value: str) -> np.ndarray:
    v = value.lstrip("#")
    if len(v) != 6:
        raise InputError(f"colours are #rrggbb, not {value!r}")
    return np.array([int(v[i : i + 2], 16) for i in (0, 2, 4)], np.float32)


@dataclass(frozen=True)
class Rule:
    """How features of one geometry kind (optionally of one layer, with given attribute values) look."""

    geometry: str
    fill: str  # "#rrggbb", or "none": matched features are not drawn (land-use areas, tunnels)
    z: float = 0
    layer: str | None = None
    where: dict[str, list[str]] = field(default_factory=dict)
    width_m: float | None = None  # lines and points: drawn this wide
    outline: str | None = None  # polygons: an outline of this colour
    outline_width_m: float = 1.0

    def matches(self, layer: str, kind: str, props: dict) -> bool:
        """``where`` lists each attribute's values; ``["*"]`` matches any value (the attribute set)."""
        if kind != self.geometry or (self.layer is not None and self.layer != layer):
            return False
        return all(props.get(k) not in (None, "") if vals == ["*"] else str(props.get(k)) in {str(v) for v in vals}
                   for k, vals in self.where.items())


@dataclass(frozen=True)
class Style:
    name: str
    background: str
    rules: tuple[Rule, ...]
    supersample: int = 4

    @classmethod
    def load(cls, path: str | Path | None = None) -> Style:
        """A style file, or the shipped default (``geosat2map/styles/maps.json``) when ``path`` is None."""
        if path is None:
            path = Path(str(resources.files("geosat2map") / "styles" / f"{DEFAULT_STYLE}.json"))
        try:
            doc = json.loads(Path(path).read_text())
            rules = tuple(Rule(**r) for r in doc["rules"])
            style = cls(doc.get("name", Path(path).stem), doc["background"], rules, int(doc.get("supersample", 4)))
        except FileNotFoundError:
            raise InputError(f"style file not found: {path}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"style file {path} is not valid: {exc}") from None
        for r in rules:
            if r.fill == NOT_DRAWN:
                continue
            _colour(r.fill)
            if r.geometry in ("line", "point") and not r.width_m:
                raise InputError(f"style {path}: {r.geometry} rules need width_m")
        return style


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, north-up transform and size."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        x0, y0 = t.c, t.f
        x1, y1 = t.c + t.a * self.width, t.f + t.e * self.height
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


@dataclass
class VectorLayer:
    name: str
    geometries: np.ndarray  # shapely geometries in the layer's CRS
    properties: list[dict]
    crs: CRS
    source: str = ""  # the file or address read (FILE of FILE:LAYER), for paths relative to it


def read_vectors(spec: str, near: Grid | None = None) -> VectorLayer:
    """Read ``FILE`` or ``FILE:LAYER`` (GeoJSON, GeoPackage, Shapefile: whatever GDAL/OGR reads),
    or a URL or /vsi path (``https://...``, ``/vsizip/...``): its first layer, or ``URL:LAYER``
    when the address as given is not a vector source (a URL's own colons, in its port or query,
    stay part of it). With ``near``, only the features whose extent meets the grid's, widened by
    :data:`DRAW_MARGIN_M` (GDAL's spatial filter: a country's OSM extract for a town's scene is
    not read whole)."""
    tries: list[tuple[str, str | None]] = [(spec, None)]
    if is_remote(spec):
        head, _, tail = spec.rpartition(":")
        if head and "/" not in tail:
            tries.append((head, tail))  # URL:LAYER
    else:
        if not Path(spec).exists() and ":" in spec:
            tries = [tuple(spec.rsplit(":", 1))]
        if not Path(tries[0][0]).exists():
            raise InputError(f"vector file not found: {tries[0][0]}")
    failed = None
    for path, layer in tries:
        try:
            info = pyogrio.read_info(path, layer=layer)
            break
        except Exception as exc:  # pyogrio raises its own DataSourceError/DataLayerError types
            failed = failed or exc  # the address as given says best what is wrong
    else:
        raise InputError(f"cannot read vectors from {spec}: {first_line(failed)}")
    if info.get("crs") is None:
        raise InputError(f"{spec} has no coordinate reference system")
    crs = CRS.from_user_input(info["crs"])
    try:
        meta, _, wkb, fields = pyogrio.raw.read(path, layer=layer, bbox=None if near is None else _reach(near, crs))
    except Exception as exc:
        raise InputError(f"cannot read vectors from {spec}: {first_line(exc)}") from None
    names = list(meta["fields"])
    props = [{n: fields[i][k] for i, n in enumerate(names)} for k in range(len(wkb))]
    # A malformed feature (a one-point line, as real OSM extracts hold now and then) is left out,
    # as gdal_rasterize leaves it, rather than failing the whole layer. A polygon whose ring is not
    # closed (GDAL reads it with a warning) is closed: it was left out, as if it were not there.
    geoms = shapely.from_wkb(wkb, on_invalid="fix")
    keep = ~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)
    layer_name = layer or Path(path).stem
    return VectorLayer(layer_name, geoms[keep], [p for p, k in zip(props, keep) if k], crs, str(path))


def _reach(grid: Grid, crs: CRS) -> tuple[float, float, float, float]:
    """The grid's extent widened by :data:`DRAW_MARGIN_M` on the ground, in ``crs`` (densified)."""
    gx, gy = ground_pixel_size(grid.crs, grid.transform, grid.width, grid.height)
    mx, my = DRAW_MARGIN_M / gx * abs(grid.transform.a), DRAW_MARGIN_M / gy * abs(grid.transform.e)
    left, bottom, right, top = grid.bounds
    return Transformer.from_crs(grid.crs, crs, always_xy=True).transform_bounds(
        left - mx, bottom - my, right + mx, top + my, densify_pts=21)


class GroundFrame:
    """Maps a grid's CRS to 'ground metres': pixel coordinates times the ground size of a pixel."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.gx, self.gy = ground_pixel_size(grid.crs, grid.transform, grid.width, grid.height)
        self.inverse = ~grid.transform

    def from_crs(self, geoms: np.ndarray, crs: CRS) -> np.ndarray:
        to_grid = Transformer.from_crs(crs, self.grid.crs, always_xy=True)
        inv, gx, gy = self.inverse, self.gx, self.gy

        def project(coords: np.ndarray) -> np.ndarray:
            x, y = to_grid.transform(coords[:, 0], coords[:, 1])
            col = inv.a * x + inv.b * y + inv.c
            row = inv.d * x + inv.e * y + inv.f
            return np.column_stack([col * gx, row * gy])

        return shapely.transform(geoms, project)

    def window_transform(self, x0: int, y0: int, supersample: int) -> Affine:
        """Supersampled pixel -> ground metres, for a window whose top-left pixel is (x0, y0)."""
        return Affine(self.gx / supersample, 0, x0 * self.gx, 0, self.gy / supersample, y0 * self.gy)

    def window_box(self, x0: int, y0: int, w: int, h: int) -> shapely.Geometry:
        return shapely.box(x0 * self.gx, y0 * self.gy, (x0 + w) * self.gx, (y0 + h) * self.gy)


@dataclass
class _Paint:
    colour: np.ndarray
    z: float
    shapes: np.ndarray  # in ground metres, already buffered to their drawn width
    tree: shapely.STRtree


class MapRenderer:
    """Vector layers prepared for one grid and style; renders any window of the grid."""

    def __init__(self, layers: list[VectorLayer], grid: Grid, style: Style | None = None) -> None:
        self.style = style or Style.load()
        self.grid = grid
        self.frame = GroundFrame(grid)
        self.layer_names = [layer.name for layer in layers]
        buckets: dict[tuple[int, bool], list] = {}
        #: Features a rule draws (a polygon's fill and outline are one feature).
        self.feature_count = 0
        for layer in layers:
            ground = self.frame.from_crs(layer.geometries, layer.crs)
            for geom, props in zip(ground, layer.properties):
                kind = _KINDS.get(geom.geom_type)
                rule_i, rule = next(((i, r) for i, r in enumerate(self.style.rules)
                                     if r.matches(layer.name, kind, props)), (None, None))
                if rule is None or rule.fill == NOT_DRAWN:
                    continue
                self.feature_count += 1
                if kind == "polygon":
                    buckets.setdefault((rule_i, False), []).append(geom)
                    if rule.outline:
                        buckets.setdefault((rule_i, True), []).append(geom.boundary.buffer(rule.outline_width_m / 2))
                else:
                    buckets.setdefault((rule_i, False), []).append(geom.buffer(rule.width_m / 2, cap_style="flat"))
        self.paints: list[_Paint] = []
        for (rule_i, outline), shapes in buckets.items():
            rule = self.style.rules[rule_i]
            arr = np.array(shapes, dtype=object)
            colour = _colour(rule.outline if outline else rule.fill)
            self.paints.append(_Paint(colour, rule.z + (0.5 if outline else 0), arr, shapely.STRtree(arr)))
        self.paints.sort(key=lambda p: p.z)
        self.background = _colour(self.style.background)

    def require_features(self) -> None:
        """One clear error when no drawable feature falls on the grid (checked on the prepared shapes)."""
        if not self.extent_has_features(0, 0, self.grid.width, self.grid.height):
            names = ", ".join(self.layer_names)
            raise InputError(f"no vector feature of {names} falls within the raster's extent")

    def extent_has_features(self, x0: int, y0: int, w: int, h: int) -> bool:
        box = self.frame.window_box(x0, y0, w, h)
        return any(len(p.tree.query(box, predicate="intersects")) for p in self.paints)

    def render(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, float]:
        """(uint8 RGB (3, h, w), share of pixels covered by any feature) of a window of the grid."""
        ss = self.style.supersample
        canvas = np.empty((3, h, w), np.float32)
        canvas[:] = self.background[:, None, None]
        covered = np.zeros((h, w), np.float32)
        box = self.frame.window_box(x0, y0, w, h)
        transform = self.frame.window_transform(x0, y0, ss)
        for paint in self.paints:
            hits = paint.shapes[paint.tree.query(box, predicate="intersects")]
            if not len(hits):
                continue
            mask = rasterize(hits, out_shape=(h * ss, w * ss), transform=transform, fill=0, default_value=1,
                             dtype="uint8")
            alpha = mask.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)
            canvas *= 1 - alpha
            canvas += paint.colour[:, None, None] * alpha
            np.maximum(covered, alpha, out=covered)
        return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), float((covered > 0).mean())

    def bands(self, rows: int = 256) -> Iterator[tuple[int, np.ndarray]]:
        """Full-width bands of ``rows`` rows, top to bottom (for streaming to a GeoTIFF)."""
        for y in range(0, self.grid.height, rows):
            h = min(rows, self.grid.height - y)
            pixels, _ = self.render(0, y, self.grid.width, h)
            yield y, pixels


def grid_from(like: str | Path | None = None, bounds=None, crs: str | None = None,
              resolution: float | None = None, max_pixels: int | None = None) -> Grid:
    """A grid copied from a reference raster, or made from bounds + CRS + resolution (refused over
    ``max_pixels``, default :data:`MAX_PIXELS`; a reference raster's grid is not: it exists already)."""
    if like is not None:
        with open_raster(like, expand_palette=False) as ref:  # a missing file or a folder said as such
            if ref.crs is None:
                raise InputError(f"{like} has no georeferencing")
            return Grid(ref.crs, ref.transform, ref.width, ref.height)
    if not bounds or not crs or not resolution:
        raise InputError("give --like RASTER, or --bounds with --crs and --resolution")
    left, bottom, right, top = bounds
    if not all(math.isfinite(v) for v in bounds) or right <= left or top <= bottom:
        raise InputError("bounds must be left bottom right top with right > left and top > bottom, "
                         f"not {tuple(bounds)}")
    if not 0 < resolution < math.inf:  # NaN too
        raise InputError(f"the resolution must be a positive number of --crs units, not {resolution}")
    width, height = math.ceil((right - left) / resolution), math.ceil((top - bottom) / resolution)
    grid_crs = CRS.from_user_input(crs)
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    if width * height > max_pixels:
        unit = grid_crs.axis_info[0].unit_name if grid_crs.axis_info else "unknown"
        raise InputError(f"the grid would be {width:,} x {height:,} pixels, more than {max_pixels:,} (the resolution "
                         f"is in the CRS's unit, {unit}; raise the pixel limit for a grid that large)")
    return Grid(grid_crs, Affine(resolution, 0, left, 0, -resolution, top), width, height)


def render_map(
    vectors: list[str],
    dst: str | Path,
    grid: Grid,
    style: str | Path | None = None,
    overwrite: bool = False,
) -> int:
    """Render vector files onto ``grid`` as a uint8 RGB GeoTIFF at ``dst``; returns the feature count."""
    from .writer import GEOTIFF, GeoTIFFWriter, check_destination

    dst = Path(dst)
    check_destination(dst, None, overwrite, GEOTIFF)
    renderer = MapRenderer([read_vectors(v, near=grid) for v in vectors], grid, Style.load(style))
    renderer.require_features()
    valid = np.ones((256, grid.width), bool)
    with GeoTIFFWriter(dst, grid.width, grid.height, grid.crs, grid.transform) as writer:
        for y, pixels in renderer.bands():
            writer.write_rows(y, pixels, valid[: pixels.shape[1]])
        writer.commit()
    return renderer.feature_count
