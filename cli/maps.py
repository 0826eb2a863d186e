"""Commands around translate's inputs and outputs: mosaic sheets into a scene, preview a map
beside its scene, classify a map's colours, vectorize the classes, render vectors in map style."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from .common import expand_globs


@click.command()
@click.argument("sheets", nargs=-1)
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--index", metavar="FILE[:LAYER]",
              help="A tile index listing the sheets (gdaltindex's, QGIS's Tile Index): their paths in --index-field, "
                   "relative to the index's folder.")
@click.option("--index-field", default="location", show_default=True, help="The index's field of sheet paths.")
@click.option("--aoi", metavar="FILE[:LAYER]", help="Only the sheets whose extent meets these polygons (any CRS).")
@click.option("--crs", help="The mosaic's CRS, e.g. EPSG:32615 [default: the first sheet's]; sheets in another are "
                            "warped into it.")
@click.option("--src-nodata", type=float, default=None, metavar="VALUE",
              help="Every sheet's nodata value, in place of what the files say (as gdalbuildvrt -srcnodata): "
                   "e.g. 0 for black collars, so that the sheet below shows there.")
@click.option("--overwrite", is_flag=True)
def mosaic(sheets, dst, index, index_field, aoi, crs, src_nodata, overwrite) -> None:
    """Put raster SHEETS (an orthophoto delivered in tiles, or a quoted pattern such as
    'sheets/*.tif') together as one seamless scene DST, a GDAL VRT (.vrt), to translate or cut
    into tiles as one (what gdalbuildvrt does, for installs without GDAL's programs; sheets in
    another CRS, which it refuses, are warped, each by a VRT in the folder DST_warped beside it)."""
    from geosat2map.mosaic import build_mosaic, sheets_from_index

    listed = list(expand_globs(sheets)) + (sheets_from_index(index, index_field) if index else [])
    if not listed:
        raise click.UsageError("give SHEETS, or --index")
    result = build_mosaic(listed, dst, overwrite=overwrite, crs=crs, src_nodata=src_nodata, aoi=aoi)
    warped = f"; {result.warped} warped into it (in {result.warped_dir})" if result.warped else ""
    click.echo(f"wrote {result.dst}: {result.sheets} sheet{'' if result.sheets == 1 else 's'}, "
               f"{result.width} x {result.height} pixels ({result.crs}{warped})")


@click.command()
@click.argument("scene", type=click.Path(dir_okay=False))
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.argument("png", type=click.Path(dir_okay=False))
@click.option("--size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Long side of each panel, pixels.")
@click.option("--overwrite", is_flag=True)
def preview(scene, map_path, png, size, overwrite) -> None:
    """Write PNG: SCENE beside the MAP translated from it."""
    from geosat2map.preview import side_by_side

    h, w = side_by_side(scene, map_path, png, size=size, overwrite=overwrite)
    click.echo(f"wrote {png} ({w} x {h})")


#: The share of a map's pixels in no colour class past which classify asks whether it was given a
#: map: the default model's NAIP map leaves 2.7 %, the maps targets 7 %; a satellite scene 100 %.
UNLIKE_A_MAP = 0.5


@click.command()
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--compress", type=click.Choice(["zstd", "deflate", "lzw"]), default="zstd", show_default=True)
@click.option("--cog", is_flag=True, help="Write a Cloud Optimized GeoTIFF.")
@click.option("--json", "as_json", is_flag=True, help="Each class's pixels and area (m²) as JSON.")
@click.option("--overwrite", is_flag=True)
def classify(map_path, dst, compress, cog, as_json, overwrite) -> None:
    """Write DST: each pixel of MAP (a translated map) as its map colour class (1 land, 2 building,
    3 road, 4 highway, 5 water, 6 park; 0 unclassified: labels, edges), a paletted GeoTIFF in the
    classes' colours, with a QGIS style beside it (DST named .qml: QGIS's legend then names the
    classes); print each class's area."""
    from geosat2map.classify import classify_map, style_path

    by_class = classify_map(map_path, dst, overwrite=overwrite, compress=compress, cog=cog)
    total = sum(c.pixels for c in by_class.values())
    unclassified = by_class["unclassified"].pixels / max(total, 1)
    if unclassified > UNLIKE_A_MAP:  # a translated map leaves a few % (labels, edges) in no class
        click.echo(f"note: {100 * unclassified:.0f} % of {map_path}'s pixels are no map colour: is it a map "
                   "(translate's output), not a scene?", err=True)
    if as_json:
        click.echo(json.dumps({name: {"pixels": c.pixels, "area_m2": c.area_m2} for name, c in by_class.items()}))
        return
    click.echo(f"wrote {dst} (its QGIS style: {style_path(Path(dst)).name}): {total:,} valid pixels")
    _echo_class_areas(by_class, lambda c: f"{100 * c.pixels / max(total, 1):5.1f} %")


def _area(m2: float) -> str:
    """An area for people: hectares below 100 ha (1 km²), square kilometres above."""
    return f"{m2 / 1e4:,.2f} ha" if m2 < 1e6 else f"{m2 / 1e6:,.2f} km²"


def _echo_class_areas(by_class: dict, amount: Callable) -> None:
    """One line per class: its name, ``amount`` of it (a share, a count) and its area where known."""
    for name, c in by_class.items():
        area = "" if c.area_m2 is None else f"  {_area(c.area_m2):>12}"
        click.echo(f"  {name:<12} {amount(c)}{area}")


@click.command()
@click.argument("classes_path", metavar="CLASSES", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--classes", "names", default="building,road,highway,water,park", show_default=True,
              help="The classes made features, comma-separated (land, building, road, highway, water, park).")
@click.option("--min-pixels", type=click.IntRange(min=1), default=4, show_default=True,
              help="Merge patches of fewer pixels (a map's specks) into their largest neighbour first, as "
                   "gdal_sieve does (1: none).")
@click.option("--simplify", type=click.FloatRange(min=0), default=0, show_default=True, metavar="PIXELS",
              help="Smooth the outlines by this tolerance, in pixels of CLASSES (2 smooths the pixels' "
                   "staircase; 0: the pixels' edges exactly). Neighbours stay edge to edge: no gaps or overlaps.")
@click.option("--json", "as_json", is_flag=True, help="Each class's features and area (m²) as JSON.")
@click.option("--overwrite", is_flag=True)
def vectorize(classes_path, dst, names, min_pixels, simplify, as_json, overwrite) -> None:
    """Write DST (.gpkg, .geojson or .fgb): each patch of a class in CLASSES (classify's raster) as
    a polygon, with its class and its area on the ground, in the raster's CRS."""
    from geosat2map.vectorize import vectorize_classes

    by_class = vectorize_classes(classes_path, dst, tuple(n.strip() for n in names.split(",") if n.strip()),
                                 min_pixels=min_pixels, simplify=simplify, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps({name: {"features": c.count, "area_m2": c.area_m2} for name, c in by_class.items()}))
        return
    click.echo(f"wrote {dst}: {sum(c.count for c in by_class.values()):,} polygons")
    _echo_class_areas(by_class, lambda c: f"{c.count:>8,}")


@click.command("render-map")
@click.argument("vectors", nargs=-1, required=True)
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--like", type=click.Path(dir_okay=False), help="Take the grid (CRS, transform, size) of this raster.")
@click.option("--bounds", nargs=4, type=float, help="left bottom right top, in --crs units.")
@click.option("--crs", help="CRS of --bounds, e.g. EPSG:32633.")
@click.option("--resolution", type=float, help="Pixel size in --crs units (with --bounds).")
@click.option("--style", type=click.Path(dir_okay=False), help="Style file (default: the shipped maps style).")
@click.option("--max-pixels", type=click.IntRange(min=1),
              help="Refuse a --bounds/--resolution grid with more pixels, as a resolution in the wrong units "
                   "[default: 2^32, 65 536 x 65 536].")
@click.option("--overwrite", is_flag=True)
def render_map_cmd(vectors, dst, like, bounds, crs, resolution, style, max_pixels, overwrite) -> None:
    """Render VECTORS (FILE or FILE:LAYER) in map style onto a grid, as an RGB GeoTIFF DST."""
    from geosat2map.render import grid_from, render_map

    grid = grid_from(like=like, bounds=bounds, crs=crs, resolution=resolution, max_pixels=max_pixels)
    n = render_map(list(vectors), dst, grid, style=style, overwrite=overwrite)
    click.echo(f"wrote {dst}: {grid.width} x {grid.height}, {n} feature{'' if n == 1 else 's'} drawn")
